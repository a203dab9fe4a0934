"""The stage graph of an experiment and every stage's cache key.

    dataset ─► source ─► construct(rand|other|det) ─► student(set, seed) ─► eval ─► table
       │        └─ eval                                                       ▲
       └──────► teacher ─► construct(errors) ─► student(errors, seed) ─► eval ┘

key = stage_key(stage, SCHEMA[stage], own config, upstream keys). Runtime settings (device,
threads, store path, batch sizes of inference) are never in a key: they do not change results.
Bump a stage's schema number when its semantics change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from advfeatures.config import ExperimentConfig, ModelStageConfig, to_plain
from storage.hashing import stage_key

SCHEMA = {"dataset": 1, "model": 1, "construct": 1, "student": 1, "eval": 1, "run": 1}
# store folder of each stage
FOLDER = {"dataset": "datasets", "model": "models", "construct": "constructed", "student": "models",
          "eval": "evals", "run": "runs"}


@dataclass(frozen=True)
class StageSpec:
    stage: str
    config: dict[str, Any]
    inputs: tuple[str, ...] = ()
    key: str = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "key", stage_key(self.stage, SCHEMA[self.stage], self.config, self.inputs))

    @property
    def folder(self) -> str:
        return FOLDER[self.stage]

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "schema": SCHEMA[self.stage], "key": self.key,
                "config": self.config, "inputs": list(self.inputs)}


@dataclass(frozen=True)
class StudentPlan:
    kind: str
    seed: int
    construct: StageSpec
    student: StageSpec
    eval: StageSpec


@dataclass(frozen=True)
class Plan:
    dataset: StageSpec
    source: StageSpec
    source_eval: StageSpec
    teacher: StageSpec | None
    teacher_eval: StageSpec | None
    constructs: dict[str, StageSpec]
    students: list[StudentPlan]
    run: StageSpec

    def stages(self) -> list[StageSpec]:
        """Every stage once, in an order that respects dependencies."""
        out = [self.dataset, self.source, self.source_eval]
        if self.teacher is not None:
            out += [self.teacher, self.teacher_eval]
        out += list(self.constructs.values())
        for s in self.students:
            out += [s.student, s.eval]
        out.append(self.run)
        return out


def dataset_spec(source_sha256: str) -> StageSpec:
    return StageSpec("dataset", {"source_sha256": source_sha256})


def model_spec(cfg: ModelStageConfig, dataset_key: str) -> StageSpec:
    return StageSpec("model", to_plain(cfg), (dataset_key,))


def construct_config(cfg: ExperimentConfig, kind: str) -> dict[str, Any]:
    c = cfg.construct
    if kind == "errors":  # the whole training set through the teacher; images are not modified
        return {"kind": "errors"}
    return {"kind": kind, "attack": to_plain(cfg.attack), "n_images": c.n_images, "seed": c.seed,
            "shard_size": c.shard_size, "chunk_size": c.chunk_size, "dtype": c.dtype}


def make_plan(cfg: ExperimentConfig, source_sha256: str) -> Plan:
    ds = dataset_spec(source_sha256)
    source = model_spec(cfg.source, ds.key)
    source_eval = StageSpec("eval", {"labels": "clean"}, (source.key, ds.key))
    teacher = teacher_eval = None
    if "errors" in cfg.construct.sets:
        teacher = model_spec(cfg.teacher, ds.key)
        teacher_eval = StageSpec("eval", {"labels": "clean"}, (teacher.key, ds.key))
    constructs: dict[str, StageSpec] = {}
    for kind in cfg.construct.sets:
        upstream = teacher.key if kind == "errors" else source.key
        constructs[kind] = StageSpec("construct", construct_config(cfg, kind), (ds.key, upstream))
    students = []
    for kind, cspec in constructs.items():
        for seed in cfg.student.seeds:
            train = cfg.student.train_for(kind, seed)
            sspec = StageSpec("student", {"model": to_plain(cfg.student.model), "train": to_plain(train)},
                              (cspec.key,))
            espec = StageSpec("eval", {"labels": "clean"}, (sspec.key, ds.key))
            students.append(StudentPlan(kind, seed, cspec, sspec, espec))
    evals = [source_eval.key] + ([teacher_eval.key] if teacher_eval else []) + [s.eval.key for s in students]
    run = StageSpec("run", {"name": cfg.name}, tuple(evals))
    return Plan(ds, source, source_eval, teacher, teacher_eval, constructs, students, run)


def labels(plan: Plan) -> dict[str, str]:
    """A readable name for every stage key."""
    out = {plan.dataset.key: "data", plan.source.key: "source", plan.source_eval.key: "source",
           plan.run.key: "table"}
    if plan.teacher is not None:
        out[plan.teacher.key] = out[plan.teacher_eval.key] = "teacher"
    out.update({s.key: kind for kind, s in plan.constructs.items()})
    for s in plan.students:
        out[s.student.key] = out[s.eval.key] = f"{s.kind} seed={s.seed}"
    return out


def plan_summary(plan: Plan) -> list[dict[str, Any]]:
    """One line per stage: its name, what it is and its key (for `advfeatures show-config`)."""
    names = labels(plan)
    return [{"stage": s.stage, "what": names[s.key], "key": s.key} for s in plan.stages()]
