"""Prefect tasks: thin adapters around ``advfeatures.stages``. Each takes keys/specs/configs, calls
one library function, and returns a key (or a small dict). No tensors cross a task boundary.

Cache: a task's Prefect cache key is its stage key, under SERIALIZABLE isolation with a file
lock manager: two runs reaching the same stage at once compute it once; the second waits for the
lock, then reads the first's committed record (Cached in the UI). The store stays the truth: the
flow checks the artifact after each call and refreshes the task if a record outlived it.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import CachePolicy
from prefect.locking.filesystem import FileSystemLockManager
from prefect.settings import get_current_settings

from advfeatures import stages
from advfeatures.config import DataConfig, RuntimeConfig
from advfeatures.plan import StageSpec
from storage.store import Store


def _stage_cache_key(_ctx, params: dict[str, Any]) -> str:
    spec: StageSpec = params["spec"]
    return f"{spec.stage}-{spec.key}"


def _shard_cache_key(_ctx, params: dict[str, Any]) -> str:
    return f"shard-{params['spec'].key}-{params['shard']}"


def _locked(key_fn) -> CachePolicy:
    """Cache on ``key_fn`` with one writer per key across processes sharing PREFECT_HOME."""
    locks = FileSystemLockManager(lock_files_directory=get_current_settings().home / "locks")
    return CachePolicy.from_cache_key_fn(key_fn).configure(lock_manager=locks, isolation_level="SERIALIZABLE")


def _log(msg: str) -> None:
    get_run_logger().info(msg)


_cached = dict(cache_policy=_locked(_stage_cache_key), persist_result=True)


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
      cache_policy=_locked(_shard_cache_key), persist_result=True)
def generate_shard(spec: StageSpec, store_root: str, shard: int, runtime: RuntimeConfig) -> dict[str, Any]:
    return stages.run_shard(Store(store_root), spec, shard, runtime, _log)


@task(name="finalize-set", task_run_name="finalize-{spec.key}", **_cached)
def finalize_set(spec: StageSpec, store_root: str) -> str:
    return stages.finalize_construct(Store(store_root), spec)


@task(name="build-errors", task_run_name="errors-{spec.key}", **_cached)
def build_errors(spec: StageSpec, store_root: str, runtime: RuntimeConfig) -> str:
    return stages.build_errors(Store(store_root), spec, runtime, _log)


@task(name="train-student", task_run_name="train-student-{spec.key}", **_cached)
def train_student(spec: StageSpec, store_root: str, runtime: RuntimeConfig) -> str:
    return stages.train_student(Store(store_root), spec, runtime, _log)
