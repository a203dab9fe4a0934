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

Clusters: ``dask.address`` (an existing scheduler), else ``dask.cluster`` started for the run,
with ``dask.cluster_kwargs``, ``dask.scale`` or ``dask.adapt``, and closed at the run's end
(``close_all``). ``distributed`` is imported only here (the ``dask`` extra).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import weakref
from collections.abc import Callable
from typing import Any

from advfeatures.config import ConfigError, to_plain
from advfeatures.cpus import split_threads
from pipeline.kinds import StageSpec

_CLIENTS: dict[str, tuple[Any, Any]] = {}  # the settings, as JSON -> (the cluster this run started or None, client)


def _distributed() -> Any:
    try:
        import distributed
    except ImportError as e:
        raise ConfigError("fanout.executor=dask needs Dask: pip install -e '.[dask]' (distributed, dask-jobqueue), "
                          "or choose fanout.executor=local") from e
    return distributed


def cluster_class(path: str) -> type:
    """``dask.cluster`` by its dotted path (module.Class), with an error naming what is missing."""
    module, _, name = path.rpartition(".")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        hint = {"dask_jobqueue": "pip install dask-jobqueue", "dask_kubernetes": "pip install dask-kubernetes"}
        extra = hint.get(module.split(".")[0], "check the module's name and that it is installed")
        raise ConfigError(f"dask.cluster={path!r} cannot be imported ({e}); {extra}") from e
    if not isinstance(getattr(mod, name, None), type):
        raise ConfigError(f"dask.cluster={path!r}: {module} has no class {name} (e.g. distributed.LocalCluster, "
                          "dask_jobqueue.SLURMCluster, dask_kubernetes.operator.KubeCluster)")
    return getattr(mod, name)


def cluster_kwargs(dc: Any, rt: Any, cls: type) -> dict[str, Any]:
    """``dask.cluster_kwargs``, with LocalCluster's defaults: runtime.shard_workers worker processes
    of one thread each, no dashboard, and each worker holding ``dask.resources`` (else a shard
    that asks for them would wait forever)."""
    kwargs = dict(dc.cluster_kwargs)
    if cls is _distributed().LocalCluster:
        kwargs.setdefault("n_workers", rt.shard_workers)
        kwargs.setdefault("threads_per_worker", 1)
        kwargs.setdefault("processes", True)
        kwargs.setdefault("dashboard_address", None)
        if dc.resources:
            kwargs.setdefault("resources", dict(dc.resources))
        api = _api_url()
        if api:  # a URL store's locks are on this server: the workers must talk to it too
            kwargs.setdefault("env", {"PREFECT_API_URL": api})
    return kwargs


def _api_url() -> str | None:
    """The Prefect API this process talks to (set in its environment or settings), if any."""
    try:
        from prefect.settings import get_current_settings
    except ImportError:
        return None
    return get_current_settings().api.url or None


def worker_runtime(dc: Any, rt: Any) -> Any:
    """The runtime the shards run with: on a LocalCluster started here (workers sharing this
    machine), torch's CPU threads split between its workers unless runtime.threads is set;
    elsewhere each worker uses what its job or pod has (runtime.threads=0)."""
    if rt.threads or dc.address:
        return rt
    cls = cluster_class(dc.cluster)
    if cls is not _distributed().LocalCluster:
        return rt
    kw = cluster_kwargs(dc, rt, cls)
    workers = int(kw["n_workers"]) * int(kw["threads_per_worker"])
    return dataclasses.replace(rt, threads=split_threads(max(1, workers))) if workers > 1 else rt


def check_scheduler(address: str, timeout: float = 5.0) -> None:
    """Before any work: a ``tcp://host:port`` scheduler accepts a connection within ``timeout``
    seconds (other protocols are left to the client). Raises ConfigError in one line."""
    import socket
    from urllib.parse import urlsplit

    from advfeatures.config import ConfigError

    url = urlsplit(address)
    if url.scheme != "tcp":
        return
    try:
        host, port = url.hostname or "localhost", url.port or 8786
    except ValueError as e:
        raise ConfigError(f"dask.address={address!r}: {e}; give the scheduler as tcp://host:8786") from None
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise ConfigError(f"no Dask scheduler answers at dask.address={address} ({e.strerror or e}); start one "
                          "(`dask scheduler`) or fix the address, or leave dask.address empty to start a cluster "
                          "for the run") from None


def client_for(dc: Any, rt: Any) -> Any:
    """The Dask client of these settings: connected to ``dask.address``, or to a cluster started
    now (once per run and settings; ``close_all`` ends it)."""
    distributed = _distributed()
    key = json.dumps([to_plain(dc), rt.shard_workers], sort_keys=True)
    if key in _CLIENTS and _CLIENTS[key][1].status == "running":
        return _CLIENTS[key][1]
    if dc.address:
        try:
            client = distributed.Client(dc.address, timeout=dc.timeout)
        except OSError as e:
            raise RuntimeError(f"no Dask scheduler answered at dask.address={dc.address} within "
                               f"{dc.timeout:g} s ({e}); start one (dask scheduler) or fix the address") from e
        _CLIENTS[key] = (None, client)
        return client
    import dask

    cls = cluster_class(dc.cluster)
    with dask.config.set({"distributed.scheduler.allowed-failures": dc.allowed_failures}):
        cluster = cls(**cluster_kwargs(dc, rt, cls))
    if dc.scale:
        cluster.scale(dc.scale)
    elif dc.adapt:
        cluster.adapt(**dc.adapt)
    client = distributed.Client(cluster, timeout=dc.timeout)
    _CLIENTS[key] = (cluster, client)
    wanted = dc.scale or int(dc.adapt.get("minimum", 0))
    if wanted:
        try:
            client.wait_for_workers(1, timeout=dc.timeout)
        except TimeoutError as e:
            raise RuntimeError(f"{dc.cluster}: no worker joined within dask.timeout={dc.timeout:g} s (asked for "
                               f"{wanted}); check the cluster's jobs or pods and their logs") from e
    return client


def close_all() -> None:
    """Close every client, and every cluster this process started (their workers with them)."""
    while _CLIENTS:
        _, (cluster, client) = _CLIENTS.popitem()
        _LISTENING.pop(client, None)
        try:
            client.close()
            if cluster is not None:
                cluster.close()
        except Exception as e:  # noqa: BLE001 - closing is best effort: the run's results are in the store
            print(f"closing a Dask cluster failed ({type(e).__name__}: {e}); its workers may linger")


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

    distributed = _distributed()
    client = client_for(dc, rt)
    args = (spec.as_dict(), store_root, to_plain(worker_runtime(dc, rt)), to_plain(data) if data else None)
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

    distributed = _distributed()
    client = client or client_for(dc, rt)
    rt = worker_runtime(dc, rt)
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
    listeners = _listeners(client)
    listeners.append(removed)
    done: dict[int, dict[str, Any]] = {}
    queue = distributed.as_completed(list(live), timeout=fo.timeout or None)  # the deadline counts from here
    try:
        while live:
            try:
                fut = next(queue)
            except TimeoutError:
                out = ", ".join(str(s) for s in sorted(live.values()))
                raise TimeoutError(f"set {spec.key}: shards {out} not done after fanout.timeout={fo.timeout:g} s on "
                                   f"Dask; are workers alive (dask.resources they lack?)") from None
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
        listeners.remove(removed)
        if not listeners:  # subscribed, a closing client gets the scheduler's 'remove-client' event (a CRITICAL log)
            _LISTENING.pop(client, None)
            try:
                client.unsubscribe_topic("all")
            except Exception:  # noqa: BLE001 - a client already closed has nothing to unsubscribe
                pass
    return done


_LISTENING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _listeners(client: Any) -> list[Callable[[Any], None]]:
    """The listeners of the scheduler's 'all' event topic on this client (one subscription per
    client, shared by the sets that run at once)."""
    if client not in _LISTENING:
        calls: list[Callable[[Any], None]] = []
        client.subscribe_topic("all", lambda event: [f(event) for f in list(calls)])
        _LISTENING[client] = calls
    return _LISTENING[client]


def _shards(shards: list[int]) -> str:
    return f"shard {shards[0]}" if len(shards) == 1 else "shards " + ", ".join(map(str, shards))
