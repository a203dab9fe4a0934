"""Prefect tasks, generated from the registry of stage kinds (``pipeline.kinds``): one task per
kind (per set builder for constructed sets), each calling its kind's executor and returning a key.
No tensors cross a task boundary.

The store is the truth, checked once per stage by the executor under the artifact's lock; Prefect
keeps no cache records of its own. A stage the store held already ends in a Completed state named
Cached, so the UI shows reuse. One writer per stage across concurrent runs comes from the store's
lock (``Store.lock``), not from Prefect; a store at a URL gets it from Prefect (``prefect_lock``):
leased and renewed while held, so a dead holder's slot is released when its lease runs out.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import ExitStack, contextmanager, suppress
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.states import Completed

from advfeatures.config import DataConfig, RuntimeConfig
from pipeline import kinds, progress
from pipeline.common import Context, last_outcome
from pipeline.kinds import StageSpec
from pipeline.sets import builder
from storage.store import Store
from tasks.progress import SINK as PREFECT_PROGRESS

LOCK_LEASE_SECONDS = 60.0
_ONE_WRITE = threading.Lock()  # this process's lock writes to the server, one at a time


@contextmanager
def prefect_lock(name: str) -> Iterator[None]:
    """Mutual exclusion across hosts: a Prefect global concurrency limit of 1 named after the
    artifact, created on first use. Needs a Prefect server shared by the contenders (PREFECT_API_URL);
    an ephemeral server only serialises one process's own threads. A free slot is taken in one
    request, one at a time per process: on SQLite (Prefect's default) two concurrent increments fail
    (503) and Prefect's client retries after 2 s, then 4 s. A held slot is waited for as Prefect waits."""
    limit, kw = f"advfeatures-{name}", dict(occupy=1, strict=True, lease_duration=LOCK_LEASE_SECONDS)
    with ExitStack() as held:
        with _ONE_WRITE, get_client(sync_client=True) as client:
            try:
                free = client.read_global_concurrency_limit_by_name(limit).active_slots == 0
            except ObjectNotFound:
                with suppress(ObjectAlreadyExists):  # created by a contender since our read
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
                free = True
            if free:
                try:  # one try: a slot taken between our read and this try is waited for below
                    held.enter_context(concurrency(limit, max_retries=0, **kw))
                except ConcurrencySlotAcquisitionError:
                    free = False
        if not free:
            held.enter_context(concurrency(limit, **kw))
        yield


Store.use_remote_lock(prefect_lock)
progress.add_sink(PREFECT_PROGRESS)  # epochs, shards and stages as progress artifacts of the run


def _log(msg: str) -> None:
    get_run_logger().info(msg)


def _outcome(key: Any, what: str) -> Any:
    """The task's state: Cached when the store held the artifact already (checked once, under its
    lock, by the executor), else the key."""
    if last_outcome() == "cached":
        return Completed(name="Cached", message=f"{what} is in the store already", data=key)
    return key


def _run_stage(spec: StageSpec, store_root: str, runtime: RuntimeConfig, data: DataConfig | None = None) -> str:
    """Any stage: its kind's executor (``pipeline.kinds``)."""
    key = kinds.execute(Store(store_root), spec, Context(runtime=runtime, data=data, log=_log))
    return _outcome(key, f"{spec.stage} {spec.key}")


@functools.lru_cache(maxsize=None)
def _task(name: str) -> Task:
    return task(_run_stage, name=name, task_run_name=f"{name}-{{spec.key}}", persist_result=False)


def task_name(spec: StageSpec) -> str:
    """The Prefect task name of a stage: its kind's (a set's: its builder's)."""
    if spec.stage == "construct":
        return builder(spec.config["kind"]).task_name
    k = kinds.kind(spec.stage)
    return k.task_name or k.name


def task_for(spec: StageSpec) -> Task:
    """The task that runs a stage of this kind, generated from the registry (sharded sets are
    fanned out by the flow instead: ``prepare_set``, ``generate_shard``, ``finalize_set``)."""
    if kinds.sharded(spec) is not None:
        raise ValueError(f"{spec.stage} {spec.key} is built shard by shard: prepare-set, generate-shard and "
                         "finalize-set tasks")
    return _task(task_name(spec))


@task(name="prepare-set", task_run_name="prepare-{spec.key}", persist_result=False)
def prepare_set(spec: StageSpec, store_root: str) -> list[int] | None:
    """The unfinished shards of a sharded set (None when the set is complete: Cached)."""
    pending = kinds.sharded(spec).prepare(Store(store_root), spec)
    if pending is None:
        return Completed(name="Cached", message=f"set {spec.key} is in the store already", data=None)
    return pending


@task(name="generate-shard", task_run_name="shard-{spec.key}-{shard}", persist_result=False)
def generate_shard(spec: StageSpec, store_root: str, shard: int, runtime: RuntimeConfig) -> dict[str, Any]:
    out = kinds.sharded(spec).shard(Store(store_root), spec, shard, runtime, _log)
    if out.get("skipped"):
        return Completed(name="Cached", message=f"shard {shard} of {spec.key} is in the store already", data=out)
    return out


@task(name="finalize-set", task_run_name="finalize-{spec.key}", persist_result=False)
def finalize_set(spec: StageSpec, store_root: str) -> str:
    return _outcome(kinds.sharded(spec).finalize(Store(store_root), spec), f"set {spec.key}")


WAITING: dict[str, Future] = {}
"""ticket -> the outcome of one shard's Dask task, set by the flow that submitted it
(``flows.replicate._dask_shards``)."""


@task(name="dask-shard", task_run_name="shard-{set_key}-{shard}", persist_result=False, cache_policy=NO_CACHE)
def dask_shard(set_key: str, shard: int, ticket: str) -> dict[str, Any]:
    """One shard of a set written on a Dask worker, as seen from the flow that submitted it: waits
    for the shard's outcome (raising its failure), logs the worker that wrote it and those that
    died under it. Its state is reported by this process, so a lost worker leaves no run Running."""
    out = WAITING[ticket].result()
    for w in out.get("lost_workers", []):
        get_run_logger().warning(f"Dask worker {w} died while holding this shard (running or queued); it was run "
                                 "again")
    where = f"Dask worker {out.get('worker')} (host {out.get('host')}, pid {out.get('pid')})"
    if out.get("skipped"):
        return Completed(name="Cached", message=f"shard {shard} of {set_key} was in the store already ({where})",
                         data=out)
    _log(f"shard {shard} of {set_key} written by {where}, try {out.get('tries', 1)}")
    return out
