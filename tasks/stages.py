"""Prefect tasks: thin adapters around ``pipeline.stages``. Each takes keys/specs/configs, calls
one library function, and returns a key (or a small dict). No tensors cross a task boundary.

Cache: a task's Prefect cache key is its stage key once the store holds the artifact, and None
(run it) before, so Prefect's records are only ever read for finished artifacts and the UI shows a
reused stage as Cached. One writer per stage across concurrent runs comes from the store's lock
(``Store.lock``), not from Prefect. The store is the truth: the flow re-runs a task whose record
outlived its artifact.

Shared storage: result records live in the store (``<store>/.prefect/results``), so a cache record
written by one worker is found by every other worker that sees the store (``for_store``). A store
at a URL gets its per-artifact lock from Prefect: a global concurrency limit of 1 per artifact,
leased and renewed while held, so it is shared by every worker of one server and a dead holder's
slot is released when its lease runs out (``prefect_lock``).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists
from prefect.filesystems import RemoteFileSystem

from advfeatures.config import PGD_KINDS, DataConfig, RuntimeConfig
from pipeline import progress, stages
from pipeline.plan import StageSpec
from storage.arrays import shard_done
from storage.store import Store
from tasks.progress import SINK as PREFECT_PROGRESS

LOCK_LEASE_SECONDS = 60.0


@contextmanager
def prefect_lock(name: str) -> Iterator[None]:
    """Mutual exclusion across hosts: a Prefect global concurrency limit of 1 named after the
    artifact, created on first use. Needs a Prefect server shared by the contenders (PREFECT_API_URL);
    an ephemeral server only serialises one process's own threads."""
    limit = f"advfeatures-{name}"
    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(limit, 1)
        except ObjectAlreadyExists:  # created by a contender between our read and our create
            pass
    with concurrency(limit, occupy=1, strict=True, lease_duration=LOCK_LEASE_SECONDS):
        yield


Store.use_remote_lock(prefect_lock)
progress.add_sink(PREFECT_PROGRESS)  # epochs, shards and stages as progress artifacts of the run


@functools.lru_cache(maxsize=16)
def result_storage(store_root: str) -> Any:
    """Prefect result storage inside the store: a folder for local (and file://) stores; for other
    URLs a RemoteFileSystem block, saved under a name derived from the URL (Prefect keeps only
    saved blocks as a task's result storage)."""
    st = Store(store_root)
    if not st.remote or st.root.protocol in ("file", "local"):
        return Path(st.root.path if st.remote else st.root) / ".prefect" / "results"
    name = f"advfeatures-results-{hashlib.sha256(st.url.encode()).hexdigest()[:12]}"
    block = RemoteFileSystem(basepath=f"{st.url.rstrip('/')}/.prefect/results")
    try:
        block.save(name, overwrite=True)
    except Exception:  # noqa: BLE001 - a worker saving the same block at the same moment
        block = RemoteFileSystem.load(name)
    return block


def for_store(t: Task, store_root: str) -> Task:
    """The task with its result records kept in the store at ``store_root``."""
    return t.with_options(result_storage=result_storage(store_root))


def _stage_cache_key(_ctx, params: dict[str, Any]) -> str | None:
    spec: StageSpec = params["spec"]
    if Store(params["store_root"]).is_complete(spec.folder, spec.key):
        return f"{spec.stage}-{spec.key}"
    return None


def _shard_cache_key(_ctx, params: dict[str, Any]) -> str | None:
    spec: StageSpec = params["spec"]
    if shard_done(Store(params["store_root"]).path(spec.folder, spec.key), params["shard"]):
        return f"shard-{spec.key}-{params['shard']}"
    return None


def _log(msg: str) -> None:
    get_run_logger().info(msg)


_cached = dict(cache_key_fn=_stage_cache_key, persist_result=True)


@task(name="ingest", **_cached)
def ingest(spec: StageSpec, store_root: str, data: DataConfig) -> str:
    return stages.ingest(Store(store_root), data, spec, _log)


@task(name="train-model", task_run_name="train-model-{spec.key}", **_cached)
def train_model(spec: StageSpec, store_root: str, runtime: RuntimeConfig) -> str:
    return stages.train_model(Store(store_root), spec, runtime, _log)


@task(name="evaluate", task_run_name="evaluate-{spec.key}", **_cached)
def evaluate(spec: StageSpec, store_root: str, runtime: RuntimeConfig) -> str:
    return stages.evaluate(Store(store_root), spec, runtime, _log)


@task(name="prepare-set", task_run_name="prepare-{spec.key}")
def prepare_set(spec: StageSpec, store_root: str) -> list[int]:
    return stages.prepare_construct(Store(store_root), spec)


@task(name="generate-shard", task_run_name="shard-{spec.key}-{shard}",
      cache_key_fn=_shard_cache_key, persist_result=True)
def generate_shard(spec: StageSpec, store_root: str, shard: int, runtime: RuntimeConfig) -> dict[str, Any]:
    return stages.run_shard(Store(store_root), spec, shard, runtime, _log)


@task(name="finalize-set", task_run_name="finalize-{spec.key}", **_cached)
def finalize_set(spec: StageSpec, store_root: str) -> str:
    return stages.finalize_construct(Store(store_root), spec)


@task(name="build-errors", task_run_name="errors-{spec.key}", **_cached)
def build_errors(spec: StageSpec, store_root: str, runtime: RuntimeConfig) -> str:
    return stages.build_errors(Store(store_root), spec, runtime, _log)


@task(name="build-control", task_run_name="control-{spec.config[kind]}-{spec.key}", **_cached)
def build_control(spec: StageSpec, store_root: str, runtime: RuntimeConfig) -> str:
    return stages.build_control(Store(store_root), spec, runtime, _log)


@task(name="import-released", task_run_name="released-{spec.config[name]}-{spec.key}", **_cached)
def import_released(spec: StageSpec, store_root: str, runtime: RuntimeConfig) -> str:
    return stages.import_released(Store(store_root), spec, runtime, _log)


@task(name="select-set", task_run_name="select-{spec.key}", **_cached)
def select_set(spec: StageSpec, store_root: str, runtime: RuntimeConfig) -> str:
    return stages.select_rows(Store(store_root), spec, runtime, _log)


@task(name="train-student", task_run_name="train-student-{spec.key}", **_cached)
def train_student(spec: StageSpec, store_root: str, runtime: RuntimeConfig) -> str:
    return stages.train_student(Store(store_root), spec, runtime, _log)


def task_for(spec: StageSpec) -> Task:
    """The task that runs a stage of this kind (PGD sets are fanned out by the flow instead)."""
    if spec.stage == "construct":
        if spec.config["kind"] in PGD_KINDS:
            raise ValueError("PGD sets run as prepare-set, generate-shard and finalize-set tasks")
        return {"errors": build_errors, "released": import_released}.get(spec.config["kind"], build_control)
    tasks = {"model": train_model, "student": train_student, "eval": evaluate, "select": select_set}
    if spec.stage not in tasks:
        raise ValueError(f"no task for stage kind {spec.stage!r}; known: {sorted(tasks)}, construct, dataset")
    return tasks[spec.stage]
