"""What a remote worker runs (``fanout.executor=dask``): plain functions of plain arguments, a
stage spec as a dict (checked against its key), a store root, a shard number and the runtime as a
dict. No tensors travel; a shard's result is its marker in the store, and what comes back is a
small summary."""

from __future__ import annotations

import os
import socket
from typing import Any


_MALLOC_TUNED = False


def tune_malloc() -> None:
    """Undo Dask's MALLOC_TRIM_THRESHOLD_=65536 for this worker (once). A nanny sets it for the
    worker process so that freed memory returns to the OS; glibc then also stops raising its mmap
    threshold, so every tensor over 128 KiB is mmap'ed and unmapped, and a PGD shard ran 2.2x
    slower (36.3 against 16.9 s, small_cnn, 1 thread; measured with benchmarks/bench_workers.py).
    mallopt sets both thresholds back up: 32 MiB for mmap, 64 MiB before trimming. glibc only;
    elsewhere nothing happens."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _open(spec: dict[str, Any], store_root: str) -> tuple[Any, Any]:
    """What both entry points do first on a worker: (the store, the spec checked against its key)."""
    from pipeline import kinds
    from storage.store import Store

    tune_malloc()
    store = Store(store_root)
    if store.remote:
        import tasks.stages  # noqa: F401 - installs the URL store's cross-host lock (needs PREFECT_API_URL)
    kinds.discover()
    return store, kinds.spec_from_dict(spec)


def run_shard(spec: dict[str, Any], store_root: str, shard: int, runtime: dict[str, Any]) -> dict[str, Any]:
    """Compute one shard of a sharded set (skipped when its marker is there) and return its
    summary, with the worker's host and pid. Under the store's per-shard lock, as everywhere."""
    from advfeatures.config import RuntimeConfig, build_config
    from pipeline import kinds

    store, s = _open(spec, store_root)
    rt = build_config(RuntimeConfig, runtime, "runtime")
    out = kinds.sharded(s).shard(store, s, shard, rt, lambda _m: None)
    return {**out, "shard": shard, "host": socket.gethostname(), "pid": os.getpid(), "worker": _worker_address()}


def _worker_address() -> str | None:
    """The Dask worker running this (its address), None outside one."""
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return None


def run_stage(spec: dict[str, Any], store_root: str, runtime: dict[str, Any], data: dict[str, Any] | None
              ) -> tuple[str, str]:
    """Run any stage that is not built shard by shard (a model, a student, an evaluation, a set built
    whole) through its kind's executor: (its key, 'cached' or 'computed')."""
    from advfeatures.config import DataConfig, RuntimeConfig, build_config
    from pipeline import kinds
    from pipeline.common import Context, last_outcome

    store, s = _open(spec, store_root)
    ctx = Context(runtime=build_config(RuntimeConfig, runtime, "runtime"),
                  data=build_config(DataConfig, data, "data") if data is not None else None)
    key = kinds.execute(store, s, ctx)
    return key, last_outcome()


def warm() -> int:
    """Import what a shard needs (torch, zarr, every stage kind) once, ahead of the first shard; the
    worker's pid (``client.run(warm)``: benchmarks, clusters started before a run)."""
    from pipeline import kinds

    kinds.discover()
    return os.getpid()
