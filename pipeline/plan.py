"""The stage graph of an experiment and every stage's cache key.

    dataset ─► source ─► construct(rand|other|det) ─► student(set, seed) ─► eval ─► table
       │        └─ eval                                                       ▲
       └──────► teacher ─► construct(errors) ─► student(errors, seed) ─► eval ┘

key = stage_key(stage, SCHEMA[stage], own config, upstream keys) (``pipeline.kinds``). A key holds every setting that
can change a result and nothing else:

- models and students: their role in the plan, architecture, training recipe, the seeds derived
  from role and seed (initial weights; data order + augmentation), and ``runtime.amp``;
- PGD sets: kind, attack, subset size, seed, storage dtype, ``runtime.amp`` and, when on, the
  number of augmented copies per image. How a set is cut
  into shards and chunks (``construct.shard_size``/``chunk_size``) is an execution option
  (``StageSpec.options``), not in the key: a row's content does not depend on it.

The device, threads, store, batch sizes, channels_last and compile change at most floating-point
rounding (random numbers are drawn on the CPU), so they are not in keys; every manifest records
them. Bump a stage's schema number (``pipeline.kinds``) when what it computes for the same config
changes; the history of bumps is kept there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from advfeatures.config import ConfigError, ExperimentConfig, ModelStageConfig, to_plain
from advfeatures.seeds import model_seeds
from pipeline.kinds import FOLDER, SCHEMA, StageSpec  # noqa: F401 - re-exported for plans


@dataclass(frozen=True)
class StudentPlan:
    kind: str
    seed: int
    construct: StageSpec
    """The set the student trains on: the PGD or errors set, or its margin selection."""
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
    selections: dict[str, StageSpec] = field(default_factory=dict)
    """kind -> the margin selection of that PGD set (construct.select < 1)."""
    robust: dict[str, list[StageSpec]] = field(default_factory=dict)
    """model key -> its robust-accuracy evaluations (evaluate.robust_eps), one per radius."""

    def stages(self) -> list[StageSpec]:
        """Every stage once, in an order that respects dependencies."""
        out = [self.dataset, self.source, self.source_eval, *self.robust.get(self.source.key, [])]
        if self.teacher is not None:
            out += [self.teacher, self.teacher_eval, *self.robust.get(self.teacher.key, [])]
        out += list(self.constructs.values()) + list(self.selections.values())
        for s in self.students:
            out += [s.student, s.eval, *self.robust.get(s.student.key, [])]
        out.append(self.run)
        return out

    def labels(self) -> dict[str, str]:
        """A readable name for every stage key."""
        return labels(self)


def dataset_spec(source_sha256: str) -> StageSpec:
    return StageSpec("dataset", {"source_sha256": source_sha256})


def model_spec(cfg: ModelStageConfig, dataset_key: str, role: str, amp: str) -> StageSpec:
    """The source or the teacher: trained on the clean training set."""
    return StageSpec("model", {"role": role, **to_plain(cfg), "seeds": model_seeds(role, (), cfg.train.seed),
                               "amp": amp}, (dataset_key,))


def construct_spec(cfg: ExperimentConfig, kind: str, inputs: tuple[str, ...]) -> StageSpec:
    c = cfg.construct
    if kind == "errors":  # the whole training set through the teacher; images are not modified
        return StageSpec("construct", {"kind": "errors"}, inputs)
    if kind == "rand-clean-only":  # D_rand's t = y rows, unperturbed: records under the source
        return StageSpec("construct", {"kind": kind, "n_images": c.n_images, "seed": c.seed, "dtype": c.dtype},
                         inputs)
    if kind.startswith("leak-"):  # no PGD: a fixed pattern of norm eps per target class
        return StageSpec("construct", {"kind": kind, "norm": cfg.attack.norm, "eps": cfg.attack.eps,
                                       "n_images": c.n_images, "seed": c.seed, "dtype": c.dtype,
                                       "keep_t_eq_y": c.leak_keep_t_eq_y}, inputs)
    config = {"kind": kind, "attack": to_plain(cfg.attack), "n_images": c.n_images, "seed": c.seed,
              "dtype": c.dtype, "amp": cfg.runtime.amp}
    if c.augment_copies:  # keyed only when on, so the keys of sets without copies stay as they were
        config["augment_copies"] = c.augment_copies
    return StageSpec("construct", config, inputs,
                     options={"shard_size": c.shard_size, "chunk_size": c.chunk_size})


def select_spec(cfg: ExperimentConfig, construct: StageSpec, source: StageSpec) -> StageSpec:
    """The rows of a PGD set with the largest target margin under the source (construct.select)."""
    return StageSpec("select", {"fraction": cfg.construct.select, "by": "target_margin", "strata": "t==y"},
                     (construct.key, source.key))


def student_spec(cfg: ExperimentConfig, kind: str, seed: int, construct: StageSpec,
                 source: StageSpec | None) -> StageSpec:
    """A student of set ``kind`` with ``seed``: its own initial weights and data order, unless
    ``student.init`` is shared_with_source (then the source's initial weights)."""
    model = to_plain(cfg.student.model_for(kind))
    seeds = model_seeds("student", (kind,), seed)
    if cfg.student.init == "shared_with_source":
        if source is None:
            raise ConfigError(f"student.init=shared_with_source: the {kind} students have no source model in this "
                              "experiment; set student.init=independent")
        if model["arch"] != source.config["model"]["arch"]:
            raise ConfigError(f"student.init=shared_with_source needs the {kind} students to have the source's "
                              f"architecture ({source.config['model']['arch']}), not {model['arch']}; "
                              "set student.init=independent or the same arch")
        seeds["init"] = source.config["seeds"]["init"]
    return StageSpec("student", {"role": "student", "set": kind, "init": cfg.student.init, "model": model,
                                 "train": to_plain(cfg.student.train_for(kind, seed)), "seeds": seeds,
                                 "amp": cfg.runtime.amp}, (construct.key,))


def make_plan(cfg: ExperimentConfig, source_sha256: str) -> Plan:
    ds = dataset_spec(source_sha256)
    amp = cfg.runtime.amp
    source = model_spec(cfg.source, ds.key, "source", amp)
    source_eval = StageSpec("eval", {"labels": "clean"}, (source.key, ds.key))
    teacher = teacher_eval = None
    if "errors" in cfg.construct.sets:
        teacher = model_spec(cfg.teacher, ds.key, "teacher", amp)
        teacher_eval = StageSpec("eval", {"labels": "clean"}, (teacher.key, ds.key))
    constructs: dict[str, StageSpec] = {}
    for kind in cfg.construct.sets:
        upstream = teacher.key if kind == "errors" else source.key
        constructs[kind] = construct_spec(cfg, kind, (ds.key, upstream))
    selections = {kind: select_spec(cfg, spec, source) for kind, spec in constructs.items()
                  if kind != "errors" and cfg.construct.select < 1}
    students = []
    for kind, cspec in constructs.items():
        trained_on = selections.get(kind, cspec)
        for seed in cfg.student.seeds:
            sspec = student_spec(cfg, kind, seed, trained_on, source)
            espec = StageSpec("eval", {"labels": "clean"}, (sspec.key, ds.key))
            students.append(StudentPlan(kind, seed, trained_on, sspec, espec))
    models = [source] + ([teacher] if teacher else []) + [s.student for s in students]
    robust = {m.key: [robust_eval_spec(cfg, m, ds, eps) for eps in cfg.evaluate.robust_eps] for m in models}
    robust = {k: v for k, v in robust.items() if v}
    evals = [source_eval.key] + ([teacher_eval.key] if teacher_eval else []) + [s.eval.key for s in students]
    evals += [r.key for rs in robust.values() for r in rs]  # only when on: the run key is unchanged otherwise
    run = StageSpec("run", {"name": cfg.name}, tuple(evals))
    return Plan(ds, source, source_eval, teacher, teacher_eval, constructs, students, run, selections, robust)


def robust_eval_spec(cfg: ExperimentConfig, model: StageSpec, ds: StageSpec, eps: float) -> StageSpec:
    """Accuracy of ``model`` on untargeted PGD adversarial examples of the clean test set at ``eps``."""
    return StageSpec("eval", {"labels": "clean", "robust": cfg.evaluate.attack_for(eps), "amp": cfg.runtime.amp},
                     (model.key, ds.key))


def labels(plan: Plan) -> dict[str, str]:
    """A readable name for every stage key."""
    out = {plan.dataset.key: "data", plan.source.key: "source", plan.source_eval.key: "source",
           plan.run.key: "table"}
    if plan.teacher is not None:
        out[plan.teacher.key] = out[plan.teacher_eval.key] = "teacher"
    out.update({s.key: kind for kind, s in plan.constructs.items()})
    out.update({s.key: f"{kind} top {s.config['fraction']:g}" for kind, s in plan.selections.items()})
    for s in plan.students:
        out[s.student.key] = out[s.eval.key] = f"{s.kind} seed={s.seed}"
    for model_key, specs in plan.robust.items():
        for r in specs:
            out[r.key] = f"{out[model_key]} eps={r.config['robust']['eps']:g}"
    return out


def plan_summary(plan: Any) -> list[dict[str, Any]]:
    """One line per stage of any experiment's plan: its kind, what it is and its key (for
    `advfeatures show-config`)."""
    names = plan.labels()
    return [{"stage": s.stage, "what": names[s.key], "key": s.key} for s in plan.stages()]
