"""construct: a constructed training set, built by the set builder its spec's ``kind`` names
(``pipeline.sets``): at once, or shard by shard (PGD sets: any worker, any order, resumable; the
flow fans the shards out). What every set shares lives here: the attack summary of its records,
its integrity check (every shard against its marker's checksum) and its label."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.common import Context
from pipeline.kinds import Sharded, StageKind, StageSpec, declare
from pipeline.sets import builder
from storage import arrays as A
from storage.store import Store


def attack_summary(rec: dict[str, np.ndarray]) -> dict[str, Any]:
    """Fooling rate (the source predicts the target on the stored image) over all rows and over
    the rows whose target differs from the true label (for rand, ~1/C of rows have t = y and are
    "fooled" for free), with the perturbation norms and target losses."""
    differ = rec["y_target"] != rec["y_true"]
    return {"n": int(len(differ)), "attack_success": float(rec["fooled"].mean()),
            "attack_success_t_ne_y": float(rec["fooled"][differ].mean()) if differ.any() else float("nan"),
            "n_t_ne_y": int(differ.sum()), "mean_norm": float(rec["norm"].mean()),
            "max_norm": float(rec["norm"].max()), "mean_target_loss": float(rec["loss"].mean()),
            "share_target_is_true": float(1 - differ.mean())}


def sharded(spec: StageSpec) -> Sharded | None:
    return builder(spec.config["kind"]).sharded


def generate(store: Store, spec: StageSpec, rt: Any, log: Any = None) -> str:
    """A sharded set in this process, shard after shard (the flow fans the same calls out)."""
    steps = sharded(spec)
    for i in steps.prepare(store, spec) or []:
        steps.shard(store, spec, i, rt, log) if log is not None else steps.shard(store, spec, i, rt)
    return steps.finalize(store, spec)


def execute(store: Store, spec: StageSpec, ctx: Context) -> str:
    b = builder(spec.config["kind"])
    if b.sharded is not None:
        return generate(store, spec, ctx.runtime, ctx.log)
    return b.build(store, spec, ctx)


def verify_set(store: Store, key: str, man: dict[str, Any]) -> tuple[list[str], list[int]]:
    """Every shard's rows against its marker's checksum."""
    found = A.verify_shards(store.path("constructed", key), man["shards"])
    return ([f"shard {p['shard']} rows {p['start']}:{p['stop']}: {p['problem']}" for p in found],
            [p["shard"] for p in found])


def label(spec: dict[str, Any], labels: dict[str, str]) -> str:
    return spec["config"].get("name") or spec["config"]["kind"]


def summary(man: dict[str, Any]) -> str:
    """``ls``: the set, its rows and, for an attacked set, the attack."""
    c = man["stage"]["config"]
    att = c.get("attack", {})
    extra = f", {att.get('norm')} eps {att.get('eps')} x {att.get('steps')} steps" if att else ""
    return f"{c.get('name') or c.get('kind')}, {man.get('summary', {}).get('n', '?')} rows{extra}"


# Bumps: 2: records (fooled, loss, norm, and the new target margin) computed on the stored float16
# images; per-row random start; amp in the key; shard_size/chunk_size out of the key.
KIND = declare(StageKind("construct", 2, "constructed", execute,
                         "a constructed training set, built by its kind's set builder (pipeline.sets)",
                         label=label, verify=verify_set, sharded=lambda spec: sharded(spec), task_name="build-set",
                         summary=summary,
                         events=("pgd_set", "pgd_batch", "shard_done")))  # emitted by the sharded (PGD) builder
