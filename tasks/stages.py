"""Prefect tasks: thin adapters around ``advfeatures.stages``. Each takes keys/specs/configs, calls
one library function, and returns a key (or a small dict). No tensors cross a task boundary.

Cache: a task's Prefect cache key is its stage key once the store holds the artifact, and None
(run it) before, so Prefect's records are only ever read for finished artifacts and the UI shows a
reused stage as Cached. One writer per stage across concurrent runs comes from the store's lock
(``Store.lock``), not from Prefect. The store is the truth: the flow re-runs a task whose record
outlived its artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from advfeatures import stages
from advfeatures.config import DataConfig, RuntimeConfig
from advfeatures.plan import StageSpec
from storage.arrays import shard_done
from storage.store import Store


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


@task(name="train-student", task_run_name="train-student-{spec.key}", **_cached)
def train_student(spec: StageSpec, store_root: str, runtime: RuntimeConfig) -> str:
    return stages.train_student(Store(store_root), spec, runtime, _log)
