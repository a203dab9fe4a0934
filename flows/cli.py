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
from pathlib import Path

import yaml


def profile_summaries() -> dict[str, str]:
    """Every bundled profile (advfeatures/profiles/*.yaml) and the first sentence of its header comment."""
    import re

    from advfeatures.config import PROFILE_DIR

    out = {}
    for path in sorted(PROFILE_DIR.glob("*.yaml")):
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "# (no header)")
        first = re.sub(r"\s*\((`advfeatures|measured).*$", "", first.lstrip("# ").strip())  # a run line, a pointer
        out[path.stem] = first.rstrip(".:;,")
    return out


def _listing() -> str:
    """The epilog of `run --help` / `show-config --help`: profiles and experiments from their registries."""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="advfeatures", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("experiments", help="list the experiments, one line each")
    argv = sys.argv[1:] if argv is None else argv
    # the experiments' registry imports torch (seconds): only a help that shows it pays for it
    wants_help = bool({"-h", "--help"} & set(argv)) and bool({"run", "show-config"} & set(argv))
    epilog = dict(epilog=_listing(), formatter_class=argparse.RawDescriptionHelpFormatter) if wants_help else {}
    _common(sub.add_parser("run", help="run an experiment's flow (local ephemeral Prefect server)", **epilog))
    _common(sub.add_parser("show-config", help="print the resolved config and every stage's key", **epilog))
    ver = sub.add_parser("verify", help="check a stored artifact against its recorded checksums")
    ver.add_argument("key", help="an artifact key (see show-config)")
    ver.add_argument("--store", default=None,
                     help="artifact store root (default: $ADVFEATURES_STORE, else .advstore)")
    ver.add_argument("--repair", action="store_true",
                     help="unseal what is corrupt so the next run recomputes exactly that")
    srv = sub.add_parser("serve", help="serve the replicate and experiment deployments from this process; "
                                       "their shards go to Dask")
    srv.add_argument("--port", type=int, default=4200, help="the Prefect server started here (no PREFECT_API_URL)")
    srv.add_argument("--dask-address", default="", metavar="tcp://HOST:8786",
                     help="the Dask scheduler of the runs' shards (default: a LocalCluster per run)")
    srv.add_argument("--limit", type=int, default=None, help="flow runs at once (default: no limit)")
    _heartbeat_args(srv)
    dep = sub.add_parser("deploy", help="create the work pool and register prefect.yaml's deployments "
                                        "on the server at PREFECT_API_URL (`prefect worker start --pool "
                                        "advfeatures` runs them)")
    dep.add_argument("--pool-limit", type=int, default=None, help="work pool concurrency limit")
    _heartbeat_args(dep)
    rep = sub.add_parser("report", help="write a run folder's report (report.html, report.md, figures/)")
    rep.add_argument("run", help="a run or sweep folder (runs/<key>/), or a run key with --store")
    rep.add_argument("--store", default=None, help="artifact store root (default: the folder's store)")
    rep.add_argument("--device", default="cpu", help="for det confusion matrices of evaluations stored without one")
    ls = sub.add_parser("ls", help="list the store's artifacts: stage, key, what, size, date, complete")
    ls.add_argument("--store", default=None, help="artifact store root (default: $ADVFEATURES_STORE, else .advstore)")
    ls.add_argument("--stage", default=None, help="only this stage kind (dataset, model, construct, select, "
                    "student, eval, run)")
    ls.add_argument("--incomplete", action="store_true", help="only unfinished artifacts (no manifest)")
    ls.add_argument("--key", default=None, help="only keys starting with this prefix")
    ls.add_argument("--run", dest="runs", action="append", default=None, help="only what this run reaches")
    gc = sub.add_parser("gc", help="remove artifacts no run reaches (dry run unless --yes)")
    gc.add_argument("runs", nargs="*", help="keep what these runs reach (folders or keys; default: every run)")
    gc.add_argument("--store", default=None, help="artifact store root (default: $ADVFEATURES_STORE, else .advstore)")
    gc.add_argument("--yes", "--delete", dest="delete", action="store_true", help="delete (default: only list)")
    gc.add_argument("--min-age-hours", type=float, default=1.0,
                    help="keep anything modified more recently (a run in progress writes its plan only at its end)")
    syn = sub.add_parser("synth", help="write a tiny synthetic CIFAR-like data set (a zip of PNGs) for smoke runs")
    syn.add_argument("path", help="the zip to write")
    syn.add_argument("--train", type=int, default=200, help="training images")
    syn.add_argument("--test", type=int, default=100, help="test images")
    args = parser.parse_args(argv)
    if args.command == "experiments":
        from pipeline.experiments import all_experiments

        for name, e in all_experiments().items():
            print(f"{name:<14} {e.summary}")
        return 0
    if args.command == "synth":
        from advfeatures import synthetic

        out = Path(args.path)
        out.parent.mkdir(parents=True, exist_ok=True)
        synthetic.write_image_zip(out, synthetic.make_arrays(args.train, args.test))
        print(f"wrote {out} ({args.train} train, {args.test} test images)")
        return 0
    if args.command == "verify":
        return _verify(args)
    if args.command in ("report", "ls", "gc"):
        from flows.store_cli import gc, ls, report
        from storage.store import StoreError

        try:
            return {"report": report, "ls": ls, "gc": gc}[args.command](args)
        except StoreError as e:
            print(f"advfeatures: error: {e}", file=sys.stderr)
            return 2
    if args.command in ("deploy", "serve"):
        from flows.serve import deploy, serve

        beat = dict(heartbeat=args.heartbeat, heartbeat_multiple=args.heartbeat_multiple)
        try:
            if args.command == "serve":
                return serve(port=args.port, dask_address=args.dask_address, limit=args.limit, **beat)
            deploy(pool_limit=args.pool_limit, **beat)
        except (ValueError, RuntimeError, TimeoutError) as e:
            print(f"advfeatures: error: {e}", file=sys.stderr)
            return 2
        print(f"deployed to {os.environ.get('PREFECT_API_URL', '(no PREFECT_API_URL)')}")
        return 0

    from advfeatures.config import ConfigError, resolve
    from advfeatures.data import DataSourceError
    from storage.store import StoreError

    try:
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
            from pipeline.kinds import SCHEMA

            if args.until not in SCHEMA:
                raise ConfigError(f"--until {args.until}: not a stage kind; choose one of {sorted(SCHEMA)}")
            if args.sweeps:
                raise ConfigError("--until and --sweep together are not supported; run each point with --until")
        if args.command == "show-config":
            return _show(cfg, args.experiment, args.until)
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
        from flows.replicate import replicate, run_experiment, sweep
        from pipeline.stages import locate_source

        locate_source(cfg.data)  # a torchvision download fails here (exit 3), before a flow starts
        from flows.console import display, print_last

        kwargs = dict(profile=args.profile, overrides=args.overrides, data=args.data, store=args.store)
        print_last(None)  # before Prefect starts a temporary server, whose stop at exit logs a line
        with display(args.progress):
            if args.sweeps:
                out = sweep(experiment=args.experiment, sweeps=args.sweeps, **kwargs)
            elif args.until:
                out = run_experiment(experiment=args.experiment, until=args.until, **kwargs)
            elif args.experiment == "replicate":
                out = replicate(**kwargs)  # the flow name the deployments and the UI know
            else:
                out = run_experiment(experiment=args.experiment, **kwargs)
        if out.get("report"):
            print_last(f"report: {out['report']}")
        return 0
    except (ConfigError, DataSourceError, StoreError) as e:
        print(f"advfeatures: error: {e}", file=sys.stderr)
        from advfeatures.data import DownloadError

        return 3 if isinstance(e, DownloadError) else 2  # 3: `make demo` falls back to the tiny path


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
        from flows.dask_shards import check_scheduler

        check_scheduler(cfg.dask.address)


def _in_store_already(cfg, experiment: str) -> int | None:
    """A rerun with nothing to do: every stage of the plan and the run folder complete in a local
    store, and its report (if written) drawn from them by this code. Prints the table and the
    report's path as the flow would, without starting Prefect (a temporary server's start is most of
    a cached rerun's time); None: the flow has work, or the store is a URL (its server records runs)."""
    from storage.store import Store

    st = Store(cfg.runtime.store)
    if st.remote or not st.root.is_dir():
        return None
    from pipeline.experiments import plan_for
    from pipeline.report_data import report_is_current

    plan = plan_for(cfg, experiment)
    if not all(st.is_complete(s.folder, s.key) for s in plan.stages()):
        return None
    folder = st.path(plan.run.folder, plan.run.key)
    if cfg.report.write and not report_is_current(folder):
        return None
    print((folder / "table.md").read_text().rstrip())
    print(f"\nrun folder: {folder}")
    print(f"every stage of this run is in the store ({len(plan.stages())} stages): nothing computed, Prefect not "
          "started (--record runs the flow anyway, to record the run on the Prefect server)")
    if cfg.report.write:
        print(f"report: {folder / 'report.html'}")
    return 0


def _verify(args) -> int:
    from pipeline.stages import find, verify
    from storage.store import Store, StoreError

    from advfeatures.config import default_store

    store = Store(args.store or default_store())
    try:
        folder = find(store, args.key)
        problems = verify(store, args.key, repair=args.repair)
    except StoreError as e:
        print(f"advfeatures: error: {e}", file=sys.stderr)
        return 2
    if not problems:
        print(f"{folder}/{args.key}: OK")
        return 0
    for p in problems:
        print(f"{folder}/{args.key}: {p}")
    print(f"{folder}/{args.key}: " + ("unsealed; the next run recomputes the broken parts" if args.repair
                                       else "CORRUPT; rerun with --repair, then run the pipeline again"))
    return 1


def _show(cfg, experiment: str, until: str | None = None) -> int:
    from advfeatures.data import DataSourceError
    from pipeline.experiments import plan_for
    from pipeline.plan import plan_summary

    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
    try:
        plan = plan_for(cfg, experiment, until)
    except DataSourceError as e:
        print(f"\n# stage keys need the data source: {e}")
        return 0
    print("\n# the plan: every stage, its key and the stages it reads" + (f" (until {until})" if until else ""))
    rows = plan_summary(plan)
    width = max(len(r["what"]) for r in rows)
    for row in rows:
        print(f"{row['stage']:<10} {row['what']:<{width}} {row['key']}  <- {row['inputs'] or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
