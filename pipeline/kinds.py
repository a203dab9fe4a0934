"""The registry of stage kinds, and the stage spec.

    key = stage_key(kind, schema, own config, upstream keys)

Each kind is declared once, by the module that owns it (``pipeline/stages/<kind>.py``), with
``declare(StageKind(...))``: its schema number, store folder, executor, label, integrity check,
``ls`` summary and Prefect task name. The registry is filled on first use by importing every
module of ``pipeline.stages`` (and, for constructed sets, every set builder: ``pipeline.sets``), so
adding a kind is one new module; nothing else lists kinds. ``run_all`` (no Prefect),
``tasks.stages`` (the Prefect tasks, generated from this registry) and the flow dispatch through it.

Bump a kind's schema number when what it computes for the same config changes (every key of that
kind, and so of everything downstream, changes); the history of bumps is kept beside each
declaration. A setting added later whose default reproduces the old result is keyed only when set
away from its default (construct.augment_copies), so existing keys stay valid without a bump.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from storage.hashing import stage_key


@dataclass(frozen=True)
class Sharded:
    """The three steps of a kind computed shard by shard (any worker, any order, resumable)."""
    prepare: Callable[..., list[int]]
    """(store, spec) -> indices of the unfinished shards (creates the arrays)."""
    shard: Callable[..., dict[str, Any]]
    """(store, spec, shard, runtime, log) -> the shard's marker."""
    finalize: Callable[..., str]
    """(store, spec) -> key: checks every marker and writes the manifest last."""
    event: Callable[..., dict[str, Any]] | None = None
    """(spec, marker, total shards, shards done) -> the progress event of a shard finished elsewhere."""


@dataclass(frozen=True)
class StageKind:
    name: str
    schema: int
    folder: str
    execute: Callable[..., str]
    """``execute(store, spec, ctx) -> key``; returns at once when the artifact is complete."""
    doc: str
    label: Callable[[dict[str, Any], dict[str, str]], str] | None = None
    """(spec as a dict, labels of the stages before it) -> a readable name, for plans read back
    from ``plan.json`` (reports, ``ls``); None: the kind's name."""
    verify: Callable[..., tuple[list[str], list[int]]] | None = None
    """(store, key, manifest) -> (problems, bad shards) against the manifest's checksums; None:
    nothing to check beyond the manifest."""
    sharded: Callable[[Any], Sharded | None] | None = None
    """spec -> its shard steps when this spec is built shard by shard (the flow fans them out)."""
    task_name: str = ""
    """The Prefect task's name (default: the kind's name)."""
    events: tuple[str, ...] = ()
    """The progress events (``pipeline.progress``) its executor emits."""
    summary: Callable[[dict[str, Any]], str] | None = None
    """manifest -> a few words on an artifact of this kind (``advfeatures ls``); None: none."""


KINDS: dict[str, StageKind] = {}
_DISCOVERED = False


def declare(kind: StageKind) -> StageKind:
    if kind.name in KINDS and KINDS[kind.name] is not kind:
        raise ValueError(f"stage kind {kind.name!r} is declared twice")
    KINDS[kind.name] = kind
    return kind


def discover() -> None:
    """Import every module that declares stage kinds, set builders and experiments (once)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for package in ("pipeline.stages", "pipeline.sets", "pipeline.experiments"):
        pkg = importlib.import_module(package)
        for mod in pkgutil.iter_modules(pkg.__path__, prefix=f"{package}."):
            importlib.import_module(mod.name)


def kind(name: str) -> StageKind:
    if name not in KINDS:
        discover()
    if name not in KINDS:
        raise ValueError(f"unknown stage kind {name!r}; declared: {sorted(KINDS)}")
    return KINDS[name]


def all_kinds() -> dict[str, StageKind]:
    """Every stage kind, by name (discovered on first use)."""
    discover()
    return KINDS


def folders() -> list[str]:
    """The store folders the stage kinds write to, each once, sorted."""
    return sorted({k.folder for k in all_kinds().values()})


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
        object.__setattr__(self, "key", stage_key(self.stage, kind(self.stage).schema, self.config, self.inputs))

    @property
    def folder(self) -> str:
        return KINDS[self.stage].folder

    @property
    def kind(self) -> StageKind:
        return KINDS[self.stage]

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "schema": KINDS[self.stage].schema, "key": self.key,
                "config": self.config, "inputs": list(self.inputs), "options": dict(self.options)}


def spec_from_dict(d: dict[str, Any]) -> StageSpec:
    """A spec sent as JSON (``as_dict``), checked against its key."""
    spec = StageSpec(d["stage"], d["config"], tuple(d["inputs"]), options=d.get("options") or {})
    if spec.key != d["key"]:
        raise ValueError(f"stage spec key {d['key']} does not match its config (recomputed {spec.key}): "
                         "the worker runs different advfeatures code than the flow that sent it")
    return spec


def executor(name: str) -> Callable[..., str]:
    return kind(name).execute


def sharded(spec: StageSpec) -> Sharded | None:
    """The shard steps of ``spec`` when it is built shard by shard, else None."""
    k = kind(spec.stage)
    return k.sharded(spec) if k.sharded is not None else None


def execute(store: Any, spec: StageSpec, ctx: Any) -> str:
    """Run ``spec``'s executor (it returns at once if the artifact is complete)."""
    return kind(spec.stage).execute(store, spec, ctx)


def run_all(store: Any, plan: Any, ctx: Any) -> str:
    """Every stage of ``plan`` in order, in this process, without Prefect (tests, notebooks,
    benchmarks); ``ctx`` must carry the plan and config for the run stage. Returns the run key."""
    for spec in plan.stages():
        execute(store, spec, ctx)
    return plan.run.key


def label(spec: dict[str, Any], labels: dict[str, str]) -> str:
    """A readable name of a stage read back from a plan.json (its kind's label)."""
    k = KINDS.get(spec["stage"]) or (discover() or KINDS.get(spec["stage"]))
    if k is None or k.label is None:
        return spec["stage"]
    return k.label(spec, labels)


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
