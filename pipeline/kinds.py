"""Stage kinds, declared once: name, schema number, store folder, executor; and the stage spec.

    key = stage_key(kind, SCHEMA[kind], own config, upstream keys)

Bump a kind's schema number when what it computes for the same config changes (every key of that
kind, and so of everything downstream, changes); the history of bumps is kept below. A setting
added later whose default reproduces the old result is keyed only when set away from its default
(construct.augment_copies), so existing keys stay valid without a bump.

Executors have one signature, ``execute(store, spec, ctx) -> key``, and live one module per kind
in ``pipeline.stages``; they are imported on first use, so declaring a plan needs no torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from storage.hashing import stage_key


@dataclass(frozen=True)
class StageKind:
    name: str
    schema: int
    folder: str
    executor: str
    """'module:function' of ``execute(store, spec, ctx) -> key``."""
    doc: str


KINDS: dict[str, StageKind] = {}


def declare(name: str, schema: int, folder: str, executor: str, doc: str) -> StageKind:
    if name in KINDS:
        raise ValueError(f"stage kind {name!r} is declared twice")
    KINDS[name] = StageKind(name, schema, folder, executor, doc)
    return KINDS[name]


declare("dataset", 1, "datasets", "pipeline.stages.dataset:execute", "a data source ingested as Zarr arrays")
declare("model", 2, "models", "pipeline.stages.model:execute", "a source or teacher trained on clean data")
declare("construct", 2, "constructed", "pipeline.stages.construct:execute",
        "a constructed training set: targeted PGD (rand, other, det; sharded) or a teacher's errors")
declare("select", 1, "constructed", "pipeline.stages.select:execute",
        "the rows of a PGD set with the largest target margin under the source")
declare("student", 2, "models", "pipeline.stages.student:execute", "a fresh model trained on a constructed set")
declare("eval", 1, "evals", "pipeline.stages.evaluation:execute", "clean test accuracy of a model")
declare("run", 2, "runs", "pipeline.stages.run:execute", "the table of a plan's evaluations")
# Bumps:
#   model 2, student 2: initial weights and data order seeded from the model's role and seed (no
#     student shares the source's init); random numbers drawn on the CPU; amp in the key.
#   construct 2: records (fooled, loss, norm, and the new target margin) computed on the stored
#     float16 images; per-row random start; amp in the key; shard_size/chunk_size out of the key.
#   run 2: the table gains init, attack_success_t!=y and share_t=y.

SCHEMA = {k.name: k.schema for k in KINDS.values()}
FOLDER = {k.name: k.folder for k in KINDS.values()}


@dataclass(frozen=True)
class StageSpec:
    stage: str
    config: dict[str, Any]
    inputs: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict, compare=False)
    """How to execute the stage, not what it computes (e.g. a PGD set's shard and chunk sizes):
    never in the key."""
    key: str = field(init=False)

    def __post_init__(self):
        if self.stage not in KINDS:
            raise ValueError(f"unknown stage kind {self.stage!r}; declared: {sorted(KINDS)}")
        object.__setattr__(self, "key", stage_key(self.stage, SCHEMA[self.stage], self.config, self.inputs))

    @property
    def folder(self) -> str:
        return FOLDER[self.stage]

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "schema": SCHEMA[self.stage], "key": self.key,
                "config": self.config, "inputs": list(self.inputs), "options": dict(self.options)}


def spec_from_dict(d: dict[str, Any]) -> StageSpec:
    """A spec sent as JSON (``as_dict``), checked against its key."""
    spec = StageSpec(d["stage"], d["config"], tuple(d["inputs"]), options=d.get("options") or {})
    if spec.key != d["key"]:
        raise ValueError(f"stage spec key {d['key']} does not match its config (recomputed {spec.key}): "
                         "the worker runs different advfeatures code than the flow that sent it")
    return spec


def executor(kind: str) -> Callable[..., str]:
    module, _, name = KINDS[kind].executor.partition(":")
    return getattr(importlib.import_module(module), name)


def execute(store: Any, spec: StageSpec, ctx: Any) -> str:
    """Run ``spec``'s executor (it returns at once if the artifact is complete)."""
    return executor(spec.stage)(store, spec, ctx)


def run_all(store: Any, plan: Any, ctx: Any) -> str:
    """Every stage of ``plan`` in order, in this process, without Prefect (tests, notebooks,
    benchmarks); ``ctx`` must carry the plan and config for the run stage. Returns the run key."""
    for spec in plan.stages():
        execute(store, spec, ctx)
    return plan.run.key


def waves(stages: list[StageSpec]) -> list[list[StageSpec]]:
    """The stages in dependency levels: each stage's inputs (those in the list) lie in earlier
    levels, so the stages of one level are independent and may run at once; the order within a
    level is the list's."""
    level: dict[str, int] = {}
    for spec in stages:  # a plan lists every stage after its inputs
        level[spec.key] = 1 + max((level[k] for k in spec.inputs if k in level), default=-1)
    out: list[list[StageSpec]] = [[] for _ in range(1 + max(level.values(), default=-1))]
    for spec in stages:
        out[level[spec.key]].append(spec)
    return out
