"""The Dask cluster that ``fanout.executor=dask`` sends a run's shards (and, with ``dask.stages``,
its stages) to: ``dask.address`` (an existing scheduler), else ``dask.cluster`` started for the run,
with ``dask.cluster_kwargs``, ``dask.scale`` or ``dask.adapt``, one per run and settings, and closed
at the run's end (``close_all``); and the runtime its shards run with there.

No Prefect here: ``flows.dask_shards`` submits the shards and reports each as a Prefect task run.
``distributed`` is imported only when a cluster is used (the ``dask`` extra).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from advfeatures.config import ConfigError, to_plain
from advfeatures.cpus import split_threads

_CLIENTS: dict[str, tuple[Any, Any]] = {}  # the settings, as JSON -> (the cluster this run started or None, client)


def load_distributed() -> Any:
    """``distributed``, or a ConfigError saying how to install it."""
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


def cluster_kwargs(dc: Any, rt: Any, cls: type, api_url: str | None = None) -> dict[str, Any]:
    """``dask.cluster_kwargs``, with LocalCluster's defaults: runtime.shard_workers worker processes
    of one thread each, no dashboard, each worker holding ``dask.resources`` (else a shard that
    asks for them would wait forever) and told ``api_url``, the Prefect API of the run, if any."""
    kwargs = dict(dc.cluster_kwargs)
    if cls is load_distributed().LocalCluster:
        kwargs.setdefault("n_workers", rt.shard_workers)
        kwargs.setdefault("threads_per_worker", 1)
        kwargs.setdefault("processes", True)
        kwargs.setdefault("dashboard_address", None)
        if dc.resources:
            kwargs.setdefault("resources", dict(dc.resources))
        if api_url and kwargs["processes"]:  # a URL store's locks are on this server: the workers must talk to
            kwargs.setdefault("env", {"PREFECT_API_URL": api_url})  # it too (threads share this process's)
    return kwargs


def worker_runtime(dc: Any, rt: Any) -> Any:
    """The runtime the shards run with: on a LocalCluster started here (workers sharing this
    machine), torch's CPU threads split between its workers unless runtime.threads is set;
    elsewhere each worker uses what its job or pod has (runtime.threads=0)."""
    if rt.threads or dc.address:
        return rt
    cls = cluster_class(dc.cluster)
    if cls is not load_distributed().LocalCluster:
        return rt
    kw = cluster_kwargs(dc, rt, cls)
    workers = int(kw["n_workers"]) * int(kw["threads_per_worker"])
    return dataclasses.replace(rt, threads=split_threads(max(1, workers))) if workers > 1 else rt


def check_scheduler(address: str, timeout: float = 5.0) -> None:
    """Before any work: a ``tcp://host:port`` scheduler accepts a connection within ``timeout``
    seconds (other protocols are left to the client). Raises ConfigError in one line."""
    import socket
    from urllib.parse import urlsplit

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


def client_for(dc: Any, rt: Any, api_url: str | None = None) -> Any:
    """The Dask client of these settings: connected to ``dask.address``, or to a cluster started
    now (once per run and settings; ``close_all`` ends it; ``api_url``: see ``cluster_kwargs``)."""
    distributed = load_distributed()
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
        cluster = cls(**cluster_kwargs(dc, rt, cls, api_url))
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


_LISTENING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # client -> the listeners of its 'all' topic


@contextmanager
def listening(client: Any, listener: Callable[[Any], None]) -> Iterator[None]:
    """``listener`` gets the scheduler's 'all' events on ``client`` for the duration: one
    subscription per client, shared by the sets that run at once, left with the last of them
    (subscribed, a closing client gets the scheduler's 'remove-client' event: a CRITICAL log)."""
    if client not in _LISTENING:
        calls: list[Callable[[Any], None]] = []
        client.subscribe_topic("all", lambda event: [f(event) for f in list(calls)])
        _LISTENING[client] = calls
    calls = _LISTENING[client]
    calls.append(listener)
    try:
        yield
    finally:
        calls.remove(listener)
        if not calls:
            _LISTENING.pop(client, None)
            try:
                client.unsubscribe_topic("all")
            except Exception:  # noqa: BLE001 - a client already closed has nothing to unsubscribe
                pass
