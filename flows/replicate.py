"""One flow runs any experiment's plan; `replicate` is that flow for the replication.

An experiment (``pipeline.experiments``) turns the resolved config into a plan: stage specs in
dependency order. The flow runs each stage through its kind's task (PGD sets fanned out by shard,
on local threads or a Dask cluster), then the experiment's writer makes the tables (CSV,
Markdown, Parquet, and a Prefect table artifact). Every stage is cached in the store under its
configuration hash.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from prefect import flow, tags, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import wait
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner

from advfeatures.config import ExperimentConfig, resolve
from advfeatures.cpus import split_threads
from flows.liveness import heartbeats_unless_asked
from pipeline import progress
from pipeline.experiments import get as get_experiment
from pipeline.experiments import plan_for  # noqa: F401 - flows.replicate.plan_for, as the docs and benchmarks call it
from pipeline.kinds import StageSpec, sharded, waves
from pipeline.orchestration import FanoutConfig
from pipeline.runs import report_for, stage_timings, timings_md
from pipeline.sets.shards import report_done
from storage.store import Store, StoreError
from tasks import stages as T


def run_stage(task, spec: StageSpec, store_root: str, *args: Any) -> Any:
    """Call a stage task; its executor checks the store (once, under the artifact's lock). Returns
    its final state (Completed, named Cached when the store held the artifact already)."""
    state = task(spec, store_root, *args, return_state=True)
    state.result()  # raises the stage's failure
    return state


def run_shards(spec: StageSpec, store_root: str, runtime_cfg: Any, shards: list[int]) -> None:
    """Shard tasks on the flow's task runner; each shard's executor skips a shard whose marker is
    there. Every shard is tried even if one fails; then the first failure is raised."""
    futures = [T.generate_shard.submit(spec, store_root, shard, runtime_cfg) for shard in shards]
    wait(futures)
    for f in futures:
        f.result()  # raises the first shard failure


@flow(name="generate-set", flow_run_name="generate-{spec.config[kind]}-{spec.key}")
def generate_set(spec: StageSpec, store_root: str, runtime_cfg: Any, pending: list[int] | None = None,
                 fanout: Any = None, dask: Any = None) -> str:
    """One sharded set: create its arrays (unless the caller did and passes its ``pending``
    shards), run every unfinished shard, then seal it with a manifest.

    Each shard writes only its own chunks, so different shards never coordinate; the store's
    per-shard lock only stops two runs from computing the same shard. The flow's task
    runner (runtime.shard_workers threads) or the work pool bounds how many run at once. A failed
    shard fails the set; a rerun redoes only the shards without a marker. ``fanout``: where the
    shards go (``pipeline.orchestration.FanoutConfig``; default: this flow's threads); ``dask``: the
    cluster for fanout.executor=dask (``pipeline.orchestration.DaskConfig``).
    """
    fanout = fanout or FanoutConfig()
    if pending is None:
        pending = T.prepare_set(spec, store_root, return_state=True).result() or []
    if fanout.executor == "dask":
        from pipeline.orchestration import DaskConfig

        _dask_shards(spec, store_root, runtime_cfg, fanout, dask or DaskConfig(), pending)
    else:
        run_shards(spec, store_root, runtime_cfg, pending)
    return T.finalize_set(spec, store_root, return_state=True).result()


def _dask_shards(spec: StageSpec, store_root: str, rt: Any, fo: Any, dc: Any, pending: list[int]) -> None:
    """Each pending shard as a task of the Dask cluster and as its own Prefect task run
    (``tasks.stages.dask_shard``), whose state this process reports: the run waits here for its
    shard's Dask task and logs the worker that wrote it and any worker lost under it, so a worker
    killed mid-shard leaves no task run Running. Lost workers are logged as they go."""
    import uuid
    from concurrent.futures import Future

    from prefect import get_run_logger

    from flows import dask_shards

    path = Store(store_root).path(spec.folder, spec.key)
    tickets = {s: f"{spec.key}-{s}-{uuid.uuid4().hex[:8]}" for s in pending}
    waits = {s: T.WAITING.setdefault(t, Future()) for s, t in tickets.items()}
    runs = [T.dask_shard.submit(spec.key, s, tickets[s]) for s in pending]
    logger = get_run_logger()

    def done(shard: int, out: dict[str, Any]) -> None:
        waits[shard].set_result(out)
        report_done(path, spec, shard)

    try:
        dask_shards.run_shards(spec, store_root, rt, fo, dc, pending, on_done=done, log=logger.warning)
    except BaseException as e:
        for w in waits.values():
            if not w.done():
                w.set_exception(e)
        raise
    finally:
        wait(runs)  # every shard's task run reported before the set ends, whatever happened
        for t in tickets.values():
            T.WAITING.pop(t, None)


def _generate(spec: StageSpec, store_root: str, rt: Any, fanout: Any = None, dask: Any = None) -> Any:
    """A sharded set: prepared here (a complete one ends Cached, without a generation subflow),
    then its shards and seal in the ``generate-set`` subflow. Returns the final state."""
    prepared = T.prepare_set(spec, store_root, return_state=True)
    if prepared.name == "Cached":
        return prepared
    workers = rt.shard_workers
    local = fanout is None or fanout.executor == "local"
    if local and workers > 1 and rt.threads == 0:  # split the cores between concurrent shards
        rt = dataclasses.replace(rt, threads=split_threads(workers))
    if not local:  # a thread per shard's task run, waiting for its Dask task (no work here)
        workers = max(1, len(prepared.result() or []))
    runner = ThreadPoolTaskRunner(max_workers=workers)
    state = generate_set.with_options(task_runner=runner)(spec, store_root, rt, prepared.result(), fanout, dask,
                                                           return_state=True)
    state.result()  # raises the set's failure
    return state


@task(name="stage-on-dask", task_run_name="{spec.stage}-{spec.key}", persist_result=False)
def dask_stage(spec: StageSpec, store_root: str, runtime: Any, data: Any, fanout: Any, dask: Any) -> Any:
    """A stage run as a task of the Dask cluster (``dask.stages``); Cached when the store held it."""
    from flows import dask_shards

    key, outcome = dask_shards.run_stage(spec, store_root, runtime, data, fanout, dask)
    if outcome == "cached":
        return Completed(name="Cached", message=f"{spec.stage} {spec.key} is in the store already", data=key)
    return key


def _stage_call(spec: StageSpec, cfg: ExperimentConfig) -> tuple[Any, tuple]:
    """The task that runs a non-sharded stage, and its arguments after (spec, store root, runtime,
    data): on the Dask cluster with fanout.executor=dask and dask.stages (ingestion stays here: the
    data source need not be visible to the workers), else in this process."""
    if cfg.fanout.executor == "dask" and cfg.dask.stages and spec.stage != "dataset":
        return dask_stage, (cfg.fanout, cfg.dask)
    return T.task_for(spec), ()


def run_plan(plan: Any, cfg: ExperimentConfig, st: Store) -> None:
    """Every stage of ``plan`` through its kind's task, once: one after another in the plan's
    order, or with runtime.stage_workers > 1, level by level (``waves``), the independent stages
    of a level submitted together. Sharded sets fan out by shard either way."""
    root, rt = st.url, cfg.runtime
    stages = [s for s in plan.stages() if s.stage != "run"]
    labels = plan.labels()
    counter = progress.PlanCounter(labels, len(stages), 0)

    def tell(current: StageSpec | None = None, states: list[Any] = ()) -> None:
        for state in states:  # a stage the store held already ends in a state named Cached
            if state is not None and state.name == "Cached":
                counter.cached += 1
            else:
                counter.done += 1
        now = f"{current.stage} {labels.get(current.key, current.key)}" if current else None
        progress.emit({**counter.event(now), "run": plan.run.key if plan.run is not None else ""})

    def one(spec: StageSpec) -> None:
        tell(spec)
        if sharded(spec) is not None:
            tell(states=[_generate(spec, root, rt, cfg.fanout, cfg.dask)])
        else:
            task, extra = _stage_call(spec, cfg)
            tell(states=[run_stage(task, spec, root, rt, cfg.data, *extra)])

    tell()
    try:
        with heartbeats_unless_asked():  # the subflows of any run: sets, levels
            _run_stages(stages, cfg, root, one, tell)
    finally:
        if cfg.fanout.executor == "dask":
            from pipeline import dask_cluster

            dask_cluster.close_all()  # the cluster this run started, if any, and its workers


def _run_stages(stages: list[StageSpec], cfg: ExperimentConfig, root: str, one: Any, tell: Any) -> None:
    if cfg.runtime.stage_workers == 1:
        for spec in stages:
            one(spec)
        return
    for level in waves(stages):
        rest = [s for s in level if sharded(s) is None]
        if len(rest) > 1:
            tell(states=_run_level(rest, cfg, root))
        for spec in level:
            if sharded(spec) is not None or len(rest) == 1:
                one(spec)


def _run_level(specs: list[StageSpec], cfg: ExperimentConfig, root: str) -> list[Any]:
    """Submit independent stages together on a pool of runtime.stage_workers threads, splitting
    torch's CPU threads between them unless runtime.threads is set; their final states."""
    rt = cfg.runtime
    workers = min(rt.stage_workers, len(specs))
    remote = _stage_call(specs[0], cfg)[0] is dask_stage  # the stages run on the cluster's workers, not here
    if rt.threads == 0 and not remote:
        rt = dataclasses.replace(rt, threads=split_threads(workers))
    runner = ThreadPoolTaskRunner(max_workers=workers)

    @flow(name="stage-level", flow_run_name=f"level-{len(specs)}-stages")
    def level() -> list[Any]:
        futures = []
        for spec in specs:
            task, extra = _stage_call(spec, cfg)
            futures.append(task.submit(spec, root, rt, cfg.data, *extra))
        wait(futures)
        for f in futures:
            f.result()  # raises the first failure
        return [f.state for f in futures]

    return level.with_options(task_runner=runner)()


def check_shared_locks(st: Store) -> None:
    """Refuse a URL store when this process has no Prefect server to talk to: Prefect would start a
    temporary one, and the store's artifact locks (global concurrency limits on that server) would
    then be private to this process, so a run elsewhere could write the same artifact at once."""
    from prefect.settings import get_current_settings

    if st.remote and not get_current_settings().api.url:
        raise StoreError(f"the store {st.url} is a URL, and without PREFECT_API_URL this run would use a "
                         "temporary Prefect server whose artifact locks no other run sees: start a server "
                         "(`advfeatures serve`, or `prefect server start`), set PREFECT_API_URL to it for "
                         "every run writing to this store, or use a local folder")


def _run_tags() -> list[str]:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return list(ctx.flow_run.tags) if ctx is not None and ctx.flow_run is not None else []


def run_experiment_body(experiment: str, profile: str, overrides: list[str] | None, data: str | None,
                        store: str | None, until: str | None = None) -> dict[str, Any]:
    t_start = time.time()
    cfg = resolve(profile, overrides or [], data=data, store=store)
    st = Store(cfg.runtime.store)
    check_shared_locks(st)
    st.ensure_writable()
    plan = plan_for(cfg, experiment, until)
    with tags(*_run_tags()):  # subflows carry the run's tags (the zombie automation's, see flows.liveness)
        run_plan(plan, cfg, st)
    if until:  # part of a plan: its stages are in the store, there is no table yet
        timings = stage_timings(st, plan, t_start)
        print(timings_md(timings))
        print(f"\nstages up to {until} are in {st.url}; run without --until (anywhere that sees this store) to "
              "go on from there")
        return {"run_key": None, "run_dir": None, "timings": timings, "experiment": experiment, "report": None,
                "until": until}

    from pipeline import report  # pandas: imported here, not at the start of every shard worker's flow run

    run_dir = get_experiment(experiment).write(st, plan, cfg)
    df = report.read_table(run_dir)
    table_md = (run_dir / "table.md").read_text()
    create_table_artifact(table=df.drop(columns=[c for c in df.columns if c.endswith("_key")]).to_dict("records"),
                          key=f"{experiment}-table",
                          description=f"{cfg.name}: clean test accuracy (%), run {plan.run.key}")
    timings = stage_timings(st, plan, t_start)
    create_markdown_artifact(markdown=timings_md(timings), key=f"{experiment}-timings",
                             description="seconds per stage; computed in this run or cached")
    print(f"\n{table_md}\nrun folder: {run_dir}\n")
    print(timings_md(timings))
    # a report drawn from the same tables and stages by the same code is kept (report.json beside it
    # says what it was drawn from; drawing the tiny profile's took 3.9 CPU-s on 2 cores)
    path = publish_report(st, run_dir, f"{experiment}-report", f"{cfg.name}: report of run {plan.run.key}",
                          write=cfg.report.write)
    return {"run_key": plan.run.key, "run_dir": str(run_dir), "timings": timings, "experiment": experiment,
            "report": str(path) if path else None}


def publish_report(st: Store, folder: Any, key: str, description: str, write: bool = True) -> Any:
    """Write the folder's report, or keep the one drawn from the same files by this code
    (``pipeline.runs.report_for``), publish its Markdown as a Prefect artifact (figures named by
    path: the UI cannot show local files) and print its path."""
    import re

    path = report_for(st, folder, write)
    if path is None:
        return None
    md = re.sub(r"!\[([^]]*)\]\((figures/[^)]+)\)", lambda m: f"(figure: `{folder}/{m.group(2)}`)",
                (folder / "report.md").read_text())
    create_markdown_artifact(markdown=f"HTML report: `{path}`\n\n{md}", key=key, description=description)
    print(f"report: {path}")
    return path


@flow(name="experiment", flow_run_name="{experiment}", log_prints=True)
def run_experiment(experiment: str = "replicate", profile: str = "demo", overrides: list[str] | None = None,
                   data: str | None = None, store: str | None = None, until: str | None = None) -> dict[str, Any]:
    """Run any experiment (`advfeatures experiments` lists them) for a profile with overrides;
    ``until`` (a stage kind, e.g. construct) runs only those stages and what they need."""
    return run_experiment_body(experiment, profile, overrides, data, store, until)


@flow(name="sweep", log_prints=True)
def sweep(experiment: str = "replicate", profile: str = "demo", overrides: list[str] | None = None,
          sweeps: list[str] | None = None, data: str | None = None, store: str | None = None) -> dict[str, Any]:
    """Run ``experiment`` at every point of the sweep axes (``section.key=V1,V2``; cartesian product),
    each point cached like any run, then write one long-format table over all points."""
    from pipeline import sweep as S

    ax = S.axes(list(sweeps or []))
    runs = []
    for i, point in enumerate(S.points(ax)):
        print(f"sweep point {i + 1}: {' '.join(point)}")
        out = run_experiment_body(experiment, profile, list(overrides or []) + point, data, store)
        runs.append((point, out["run_dir"]))
    cfg = resolve(profile, list(overrides or []), data=data, store=store)
    st = Store(cfg.runtime.store)
    path = S.write_sweep(st, experiment, ax, runs, cfg)
    print(f"\n{(path / 'sweep.md').read_text()}\nsweep folder: {path}")
    report = publish_report(st, path, "sweep-report", f"sweep of {experiment} over {', '.join(k for k, _ in ax)}",
                            write=cfg.report.write)
    return {"sweep_dir": str(path), "points": [{"overrides": p, "run_dir": str(d)} for p, d in runs],
            "report": str(report) if report else None}


@flow(name="replicate", log_prints=True)
def replicate(profile: str = "demo", overrides: list[str] | None = None, data: str | None = None,
              store: str | None = None) -> dict[str, Any]:
    """Run the replication for a profile (name or YAML path) with `section.key=value` overrides."""
    return run_experiment_body("replicate", profile, overrides, data, store)
