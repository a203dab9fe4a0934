"""The `generate-shard` flow: a batch of shards of one PGD set as one flow run, so a deployment's
workers (processes, containers, GPUs) can each take shards. Parameters are plain JSON."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from advfeatures.config import RuntimeConfig, build_config
from flows.replicate import run_shards
from pipeline.kinds import spec_from_dict


def _run_name() -> str:
    """shard-<set key>-<i> for one shard, shard-<set key>-<i>+<j>+... for a batch."""
    p = flow_run.parameters
    return f"shard-{p['spec']['key']}-{'+'.join(map(str, p['shards']))}"


@flow(name="generate-shard", flow_run_name=_run_name)
def generate_shard(spec: dict[str, Any], store_root: str, shards: list[int], runtime: dict[str, Any]) -> dict[str, Any]:
    """Attack and write each shard of the batch in turn (one skipped if its marker exists), each
    with its own marker, so a run that dies midway loses only the shard it was on. The store's
    per-shard lock keeps two runs of one shard (two parents at once) from writing it twice."""
    rt = build_config(RuntimeConfig, runtime, "runtime")
    run_shards(spec_from_dict(spec), store_root, rt, list(shards), one_by_one=True)
    return {"shards": list(shards), "set": spec["key"]}
