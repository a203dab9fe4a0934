"""`advfeatures` command line.

    advfeatures experiments                list the experiments, one line each
    advfeatures run [--experiment NAME] --profile demo [--settings FILE] [--set attack.steps=50 ...] [--data PATH]
                    [--store PATH] [--sweep construct.n_images=2000,8000 --sweep attack.steps=5,20 ...] [--seeds N] [--until KIND]
    advfeatures show-config [--experiment NAME] --profile demo [--set ...] [--data PATH] [--until KIND]
    advfeatures verify KEY [--store PATH] [--repair]
    advfeatures report RUN [--store PATH]  the run folder's report.html + report.md (figures, tables, timings)
    advfeatures ls [--store PATH] [--stage S] [--incomplete] [--key PREFIX] [--run RUN ...]
    advfeatures gc [RUN ...] [--store PATH] [--yes] [--min-age-hours H]   dry run unless --yes
    advfeatures serve [--dask-address A]   the deployments served from this process (a server + UI if no PREFECT_API_URL)
    advfeatures deploy                     work pool + deployments on the server at PREFECT_API_URL (stock workers run them)
    advfeatures synth PATH                 a tiny synthetic data set, for smoke runs
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


def _listing() -> str:
    """The epilog of `run --help` / `show-config --help`: profiles and experiments from their registries."""
    from advfeatures.config import profile_summaries
    from pipeline.experiments import all_experiments

    profiles = profile_summaries()
    experiments = {name: e.summary for name, e in all_experiments().items()}
    w = max(map(len, [*profiles, *experiments]))
    lines = ["profiles (--profile NAME, or a YAML path; advfeatures/profiles/):"]
    lines += [f"  {name:<{w}}  {text}" for name, text in profiles.items()]
    lines += ["", "experiments (--experiment NAME):"]
    lines += [f"  {name:<{w}}  {text}" for name, text in experiments.items()]
    return "\n".join(lines)


def _common(p: argparse.ArgumentParser) -> None:
    from advfeatures.config import profile_summaries

    p.add_argument("--experiment", default="replicate",
                   help="which experiment (listed below, and by `advfeatures experiments`)")
    bundled = ", ".join(profile_summaries())
    p.add_argument("--profile", default="demo", help=f"bundled profile name ({bundled}) or a YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. attack.steps=50 (repeatable)")
    p.add_argument("--settings", dest="settings", action="append", default=[], metavar="FILE",
                   help="a YAML file of settings applied after the profile, before --set (repeatable), e.g. "
                        "examples/slurm.yaml: where shards run")
    p.add_argument("--data", default=None, help="data source: a zip/folder of train/ and test/, "
                   "cifar-10-python.tar.gz or its folder, or 'torchvision' to download")
    p.add_argument("--store", default=None, help="artifact store root (default: runtime.store)")
    p.add_argument("--sweep", dest="sweeps", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                   help="run: one point per value (axes multiply), then a long-format table over all points")
    p.add_argument("--seeds", type=int, default=None, help="student seeds 0..N-1 (student.seeds)")
    p.add_argument("--until", default=None, metavar="KIND",
                   help="only the stages of this kind and what they need, e.g. construct: build the sets here, "
                        "train the students elsewhere with a run without --until on the same store")
    p.add_argument("--progress", default="auto", choices=["auto", "rich", "plain", "none"],
                   help="run: live bars (rich) on a terminal, plain lines in logs (auto picks by stdout)")
    p.add_argument("--record", action="store_true",
                   help="run: start the flow even when every stage, the table and the report are in the store "
                        "already (by default such a rerun prints them without starting Prefect)")


def _heartbeat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--heartbeat", type=int, default=30, metavar="SECONDS",
                   help="heartbeat period of the deployments' flow runs (Prefect's minimum, 30, by default)")
    p.add_argument("--heartbeat-multiple", type=float, default=3.0, metavar="K",
                   help="the zombie-run automation marks a run Crashed after K periods without a heartbeat")


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=None, help="artifact store root (default: $ADVFEATURES_STORE, else .advstore)")


def _error(e: Exception, code: int = 2) -> int:
    print(f"advfeatures: error: {e}", file=sys.stderr)
    return code


def _experiments(args) -> int:
    from pipeline.experiments import all_experiments

    for name, e in all_experiments().items():
        print(f"{name:<14} {e.summary}")
    return 0


def _resolve(args):
    """The resolved config of a run or show-config, every override applied, and checked before any
    work: every sweep point's config, the experiment's own check, --until."""
    from advfeatures.config import ConfigError, resolve
    from pipeline.experiments import get as get_experiment

    experiment = get_experiment(args.experiment)  # an unknown name fails here, with the list
    if args.settings:
        from advfeatures.config import settings_overrides

        args.overrides = [o for f in args.settings for o in settings_overrides(f)] + args.overrides
    if args.seeds is not None:
        from pipeline.sweep import seeds_override

        args.overrides = args.overrides + [seeds_override(args.seeds)]
    if args.sweeps:
        from pipeline.sweep import axes, points

        for point in points(axes(args.sweeps)):  # every point's config is valid before anything runs
            resolve(args.profile, args.overrides + point, data=args.data, store=args.store)
    cfg = resolve(args.profile, args.overrides, data=args.data, store=args.store)
    if experiment.check is not None:
        experiment.check(cfg)  # folders and files the settings name, before any work
    if args.until is not None:
        from pipeline.plan import check_until

        check_until(args.until)
        if args.sweeps:
            raise ConfigError("--until and --sweep together are not supported; run each point with --until")
    return cfg


def _config_errors(handler):
    """``handler`` with a config, data or store error as one line on stderr: exit 2 (3: a failed
    download, on which `make demo` falls back to the tiny path)."""
    def run(args) -> int:
        from advfeatures.config import ConfigError
        from advfeatures.data import DataSourceError, DownloadError
        from storage.store import StoreError

        try:
            return handler(args)
        except (ConfigError, DataSourceError, StoreError) as e:
            return _error(e, 3 if isinstance(e, DownloadError) else 2)
    return run


@_config_errors
def _show_config(args) -> int:
    """The resolved config, then every stage of the plan: its key and the stages it reads."""
    from advfeatures.data import DataSourceError
    from pipeline.experiments import plan_for
    from pipeline.plan import plan_summary

    cfg = _resolve(args)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
    try:
        plan = plan_for(cfg, args.experiment, args.until)
    except DataSourceError as e:
        print(f"\n# stage keys need the data source: {e}")
        return 0
    until = f" (until {args.until})" if args.until else ""
    print(f"\n# the plan: every stage, its key and the stages it reads{until}")
    rows = plan_summary(plan)
    width = max(len(r["what"]) for r in rows)
    for row in rows:
        print(f"{row['stage']:<10} {row['what']:<{width}} {row['key']}  <- {row['inputs'] or '-'}")
    return 0


@_config_errors
def _run(args) -> int:
    """Checked inputs, then the flow; a rerun with nothing to do printed without starting Prefect."""
    cfg = _resolve(args)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's 20-s default for the temporary server's start fails on a busy 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from storage.store import Store

    store = Store(cfg.runtime.store)  # nothing is created: a URL store is refused without PREFECT_API_URL
    if store.remote:  # a URL store needs a shared server: refused before the data are read
        from flows.replicate import check_shared_locks

        check_shared_locks(store)
    _check_inputs(cfg)  # a data source or Dask scheduler that fails, in one line before any work
    if not (args.record or args.sweeps or args.until):
        done = _in_store_already(cfg, args.experiment)
        if done is not None:
            return done
    return _start_flow(args, cfg)


def _start_flow(args, cfg) -> int:
    """The run's flow, with its progress shown as ``--progress`` says."""
    from flows import liveness, replicate as R
    from flows.console import display, print_last
    from pipeline.stages import locate_source

    locate_source(cfg.data)  # a torchvision download fails here (exit 3), before a flow starts
    kwargs = dict(profile=args.profile, overrides=args.overrides, data=args.data, store=args.store)
    print_last(None)  # before Prefect starts a temporary server, whose stop at exit logs a line
    with display(args.progress), liveness.heartbeats_unless_asked():
        if args.sweeps:
            out = R.sweep(experiment=args.experiment, sweeps=args.sweeps, **kwargs)
        elif args.until:
            out = R.run_experiment(experiment=args.experiment, until=args.until, **kwargs)
        elif args.experiment == "replicate":
            out = R.replicate(**kwargs)  # the flow name the deployments and the UI know
        else:
            out = R.run_experiment(experiment=args.experiment, **kwargs)
    if out.get("report"):
        print_last(f"report: {out['report']}")
    return 0


def _check_inputs(cfg) -> None:
    """The data source opens, lists the same classes in both splits and decodes one image per
    class; every model named by a string that is not a registered name builds and runs on one
    image of the data's size, and every checkpoint loads into its architecture; with
    ``fanout.executor=dask`` and ``dask.address``, the scheduler accepts a connection."""
    from pipeline.stages.dataset import check_source
    from pipeline.stages.model import check_models

    classes = check_source(cfg.data)
    check_models(cfg, len(classes) or 10)
    if cfg.fanout.executor == "dask" and cfg.dask.address:
        from pipeline.dask_cluster import check_scheduler

        check_scheduler(cfg.dask.address)


def _in_store_already(cfg, experiment: str) -> int | None:
    """A rerun with nothing to do (``pipeline.runs.finished``): prints the table and the report's
    path as the flow would, without starting Prefect (a temporary server's start is most of a
    cached rerun's time); None: the flow has work."""
    from pipeline.runs import finished

    done = finished(cfg, experiment)
    if done is None:
        return None
    folder, n_stages = done
    print((folder / "table.md").read_text().rstrip())
    print(f"\nrun folder: {folder}")
    print(f"every stage of this run is in the store ({n_stages} stages): nothing computed, Prefect not "
          "started (--record runs the flow anyway, to record the run on the Prefect server)")
    if cfg.report.write:
        print(f"report: {folder / 'report.html'}")
    return 0


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("key", help="an artifact key (see show-config)")
    _store_arg(p)
    p.add_argument("--repair", action="store_true",
                   help="unseal what is corrupt so the next run recomputes exactly that")


@_config_errors
def _verify(args) -> int:
    from advfeatures.config import default_store
    from pipeline.stages import find, verify
    from storage.store import Store

    store = Store(args.store or default_store())
    folder = find(store, args.key)
    problems = verify(store, args.key, repair=args.repair)
    if not problems:
        print(f"{folder}/{args.key}: OK")
        return 0
    for p in problems:
        print(f"{folder}/{args.key}: {p}")
    print(f"{folder}/{args.key}: " + ("unsealed; the next run recomputes the broken parts" if args.repair
                                       else "CORRUPT; rerun with --repair, then run the pipeline again"))
    return 1


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=4200, help="the Prefect server started here (no PREFECT_API_URL)")
    p.add_argument("--dask-address", default="", metavar="tcp://HOST:8786",
                   help="the Dask scheduler of the runs' shards (default: a LocalCluster per run)")
    p.add_argument("--limit", type=int, default=None, help="flow runs at once (default: no limit)")
    _heartbeat_args(p)


def _deploy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool-limit", type=int, default=None, help="work pool concurrency limit")
    _heartbeat_args(p)


def _serve_or_deploy(args) -> int:
    from flows.serve import deploy, serve

    beat = dict(heartbeat=args.heartbeat, heartbeat_multiple=args.heartbeat_multiple)
    try:
        if args.command == "serve":
            return serve(port=args.port, dask_address=args.dask_address, limit=args.limit, **beat)
        deploy(pool_limit=args.pool_limit, **beat)
    except (ValueError, RuntimeError, TimeoutError) as e:
        return _error(e)
    print(f"deployed to {os.environ.get('PREFECT_API_URL', '(no PREFECT_API_URL)')}")
    return 0


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run or sweep folder (runs/<key>/), or a run key with --store")
    p.add_argument("--store", default=None, help="artifact store root (default: the folder's store)")
    p.add_argument("--device", default="cpu", help="for det confusion matrices of evaluations stored without one")


def _ls_args(p: argparse.ArgumentParser) -> None:
    _store_arg(p)
    p.add_argument("--stage", default=None, help="only this stage kind (dataset, model, construct, select, "
                   "student, eval, run)")
    p.add_argument("--incomplete", action="store_true", help="only unfinished artifacts (no manifest)")
    p.add_argument("--key", default=None, help="only keys starting with this prefix")
    p.add_argument("--run", dest="runs", action="append", default=None, help="only what this run reaches")


def _gc_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="*", help="keep what these runs reach (folders or keys; default: every run)")
    _store_arg(p)
    p.add_argument("--yes", "--delete", dest="delete", action="store_true", help="delete (default: only list)")
    p.add_argument("--min-age-hours", type=float, default=1.0,
                   help="keep anything modified more recently (a run in progress writes its plan only at its end)")


@_config_errors
def _store_command(args) -> int:
    """report, ls, gc (``flows.store_cli``); a store error in one line, exit 2."""
    from flows import store_cli

    return getattr(store_cli, args.command)(args)


def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="the zip to write")
    p.add_argument("--train", type=int, default=200, help="training images")
    p.add_argument("--test", type=int, default=100, help="test images")


def _synth(args) -> int:
    from advfeatures import synthetic

    out = Path(args.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    synthetic.write_image_zip(out, synthetic.make_arrays(args.train, args.test))
    print(f"wrote {out} ({args.train} train, {args.test} test images)")
    return 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[Any], int]]] = {
    "experiments": ("list the experiments, one line each", lambda p: None, _experiments),
    "run": ("run an experiment's flow (local ephemeral Prefect server)", _common, _run),
    "show-config": ("print the resolved config and every stage's key", _common, _show_config),
    "verify": ("check a stored artifact against its recorded checksums", _verify_args, _verify),
    "serve": ("serve the replicate and experiment deployments from this process; their shards go to Dask",
              _serve_args, _serve_or_deploy),
    "deploy": ("create the work pool and register prefect.yaml's deployments on the server at PREFECT_API_URL "
               "(`prefect worker start --pool advfeatures` runs them)", _deploy_args, _serve_or_deploy),
    "report": ("write a run folder's report (report.html, report.md, figures/)", _report_args, _store_command),
    "ls": ("list the store's artifacts: stage, key, what, size, date, complete", _ls_args, _store_command),
    "gc": ("remove artifacts no run reaches (dry run unless --yes)", _gc_args, _store_command),
    "synth": ("write a tiny synthetic CIFAR-like data set (a zip of PNGs) for smoke runs", _synth_args, _synth),
}
"""name -> (help, the function adding its arguments, the handler of its parsed arguments: the exit status)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="advfeatures", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=text))
    argv = sys.argv[1:] if argv is None else argv
    # the experiments' registry imports torch (seconds): only a help that shows it pays for it
    if {"-h", "--help"} & set(argv) and {"run", "show-config"} & set(argv):
        listing = _listing()
        for p in (sub.choices["run"], sub.choices["show-config"]):
            p.epilog, p.formatter_class = listing, argparse.RawDescriptionHelpFormatter
    args = parser.parse_args(argv)
    return COMMANDS[args.command][2](args)


if __name__ == "__main__":
    sys.exit(main())
