"""The `generate-shard` flow: one shard of one PGD set as its own flow run, so a deployment's
workers (processes, containers, GPUs) can each take shards. Parameters are plain JSON."""

from __future__ import annotations

from typing import Any

from prefect import flow

from advfeatures.config import RuntimeConfig, build_config
from flows.replicate import run_shards
from pipeline.kinds import spec_from_dict


@flow(name="generate-shard", flow_run_name="shard-{spec[key]}-{shard}")
def generate_shard(spec: dict[str, Any], store_root: str, shard: int, runtime: dict[str, Any]) -> dict[str, Any]:
    """Attack and write one shard (skipped if its marker exists). The store's per-shard lock keeps
    two runs of one shard (two parents at once) from writing it twice."""
    rt = build_config(RuntimeConfig, runtime, "runtime")
    run_shards(spec_from_dict(spec), store_root, rt, [shard])
    return {"shard": shard, "set": spec["key"]}
