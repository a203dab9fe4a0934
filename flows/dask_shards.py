"""``fanout.executor=dask``: a sharded set's shards as tasks of a Dask cluster.

The flow (the controller) submits one Dask task per pending shard, ``tasks.remote.run_shard`` with
the set's spec, the store root and the shard number, and waits for them as they complete. Dask
places them (``dask.resources``, e.g. one per GPU), and when a worker dies mid-shard it runs the
shard again on another worker, up to ``dask.allowed_failures`` deaths; past that it raises
``KilledWorker``, and the controller submits the shard again as a new task, up to
``fanout.retries`` times, then fails the set with an error naming the shard. A shard that runs
twice is harmless: rows are a pure function of the spec, each shard writes only its own chunks
under its own lock, and its marker is written last (the shard protocol, DESIGN.md).

Each shard is its own Prefect task run (``flows.replicate``), but reported by the controller, not
by the workers: prefect-dask's task runner would report each shard's task run from its worker,
and a worker killed mid-shard leaves that run Running for good (prefect issues 17384 and 21638).
Here every Prefect state is reported by the controller, which outlives its workers: a shard's task
run waits in the controller for its Dask task and logs the worker that wrote it and the workers
lost under it. A lost worker is logged as soon as the scheduler removes it (its ``remove-worker``
event), naming the shards that Dask runs again.

The cluster (started from ``dask.*`` or an existing scheduler, closed at the run's end) is
``pipeline.dask_cluster``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from advfeatures.config import to_plain
from pipeline import dask_cluster as C
from pipeline.kinds import StageSpec


def _api_url() -> str | None:
    """The Prefect API this process talks to (set in its environment or settings), if any."""
    try:
        from prefect.settings import get_current_settings
    except ImportError:
        return None
    return get_current_settings().api.url or None


def client_for(dc: Any, rt: Any) -> Any:
    """The run's Dask client (``pipeline.dask_cluster.client_for``), a started LocalCluster's workers
    told this process's Prefect API."""
    return C.client_for(dc, rt, _api_url())


def _killed(e: Exception, what: str, tries: int, dc: Any, fo: Any) -> None:
    """Raise the error of a task whose workers kept dying once ``fanout.retries`` is used up."""
    if tries > fo.retries:
        raise RuntimeError(
            f"{what}: its Dask worker died while running it {dc.allowed_failures + 1} time(s) in each of {tries} "
            f"tries (KilledWorker: {e}); fanout.retries={fo.retries} used up. Look at the workers' logs (memory, "
            "walltime), or raise dask.allowed_failures or fanout.retries") from e
    print(f"{what}: its Dask worker died (KilledWorker); resubmitting (try {tries + 1})")


def run_stage(spec: StageSpec, store_root: str, rt: Any, data: Any, fo: Any, dc: Any) -> tuple[str, str]:
    """One stage that is not sharded, as a task of the cluster (``dask.stages``): (key, outcome)."""
    from tasks.remote import run_stage as remote

    distributed = C.load_distributed()
    client = client_for(dc, rt)
    args = (spec.as_dict(), store_root, to_plain(C.worker_runtime(dc, rt)), to_plain(data) if data else None)
    what = f"{spec.stage} {spec.key}"
    for tries in range(fo.retries + 1):
        fut = client.submit(remote, *args, key=f"{spec.stage}-{spec.key}-try{tries}", pure=False,
                            resources=dict(dc.resources) or None)
        try:
            return fut.result()
        except distributed.KilledWorker as e:
            _killed(e, what, tries + 1, dc, fo)
    raise AssertionError("unreachable")


def run_shards(spec: StageSpec, store_root: str, rt: Any, fo: Any, dc: Any, pending: list[int],
               on_done: Callable[[int, dict[str, Any]], None] | None = None,
               client: Any = None, log: Callable[[str], None] = print) -> dict[int, dict[str, Any]]:
    """Every pending shard of ``spec`` as a Dask task; each shard's summary, by shard, once all are
    done (with ``worker``: the worker that wrote it, and ``lost_workers``: those that died under
    it). A ``KilledWorker`` resubmits the shard, at most ``fanout.retries`` times; an error in a
    shard's own code, or the ``fanout.timeout`` deadline, fails the set (the other shards are
    cancelled; those done keep their markers, and a rerun does only the rest). ``log`` gets one
    line per lost worker, naming the shards it was running."""
    from tasks.remote import run_shard

    distributed = C.load_distributed()
    client = client or client_for(dc, rt)
    rt = C.worker_runtime(dc, rt)
    body, runtime = spec.as_dict(), to_plain(rt)
    tries = dict.fromkeys(pending, 0)
    lost: dict[int, list[str]] = {s: [] for s in pending}
    prefix = f"shard-{spec.key}-"

    def submit(shard: int) -> Any:
        return client.submit(run_shard, body, store_root, shard, runtime, key=f"{prefix}{shard}-try{tries[shard]}",
                             pure=False, resources=dict(dc.resources) or None)

    def removed(event: Any) -> None:  # the scheduler's 'all' topic, on the client's event loop
        msg = event[1] if isinstance(event, tuple) else event
        if not isinstance(msg, dict) or msg.get("action") != "remove-worker":
            return
        mine = sorted(int(str(k)[len(prefix):].split("-")[0]) for k in msg.get("processing-tasks", ())
                      if str(k).startswith(prefix))
        for shard in mine:
            if shard in lost:
                lost[shard].append(str(msg.get("worker")))
        if mine:
            log(f"Dask worker {msg.get('worker')} lost while holding {_shards(mine)} of set {spec.key} (running or "
                f"queued there): Dask runs {'it' if len(mine) == 1 else 'them'} again on another worker (up to "
                f"dask.allowed_failures={dc.allowed_failures} deaths each, then fanout.retries={fo.retries} "
                "resubmissions)")

    live = {submit(s): s for s in pending}
    print(f"set {spec.key}: {len(pending)} shards submitted to Dask ({client.scheduler.address})")
    done: dict[int, dict[str, Any]] = {}
    with C.listening(client, removed):
        queue = distributed.as_completed(list(live), timeout=fo.timeout or None)  # the deadline counts from here
        try:
            while live:
                try:
                    fut = next(queue)
                except TimeoutError:
                    out = ", ".join(str(s) for s in sorted(live.values()))
                    raise TimeoutError(f"set {spec.key}: shards {out} not done after fanout.timeout={fo.timeout:g} "
                                       "s on Dask; are workers alive (dask.resources they lack?)") from None
                shard = live.pop(fut)
                try:
                    done[shard] = {**fut.result(), "lost_workers": lost[shard], "tries": tries[shard] + 1}
                except distributed.KilledWorker as e:
                    tries[shard] += 1
                    _killed(e, f"shard {shard} of set {spec.key}", tries[shard], dc, fo)
                    nxt = submit(shard)
                    live[nxt] = shard
                    queue.add(nxt)
                    continue
                except Exception as e:
                    raise RuntimeError(f"shard {shard} of set {spec.key} failed on a Dask worker: "
                                       f"{type(e).__name__}: {e}") from e
                if on_done is not None:
                    on_done(shard, done[shard])
        finally:
            for fut in live:
                fut.cancel()
    return done


def _shards(shards: list[int]) -> str:
    return f"shard {shards[0]}" if len(shards) == 1 else "shards " + ", ".join(map(str, shards))
