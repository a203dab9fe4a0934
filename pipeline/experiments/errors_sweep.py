"""errors-sweep (Wallace 2019): how much a student learns from a teacher's mistakes as the teacher
gets better. One teacher per entry of ``errors_sweep.teacher_epochs`` (the teacher recipe
otherwise), its mistakes on the training set relabelled with its wrong predictions as a set,
students of that set over seeds, every model on the clean test set. The table has one row per
(teacher epochs, seed): teacher accuracy, the number of mistakes the student trains on, and the
student's accuracy; the Markdown adds the mean over seeds per teacher (the curve of student
against teacher accuracy).

Students of different teachers start from different initial weights (their seeds derive from the
teacher's epochs too); a teacher whose recipe equals ``replicate``'s is reused from the store."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advfeatures.config import ExperimentConfig, ModelStageConfig
from advfeatures.seeds import model_seeds
from pipeline.experiments import Experiment, register
from pipeline.kinds import StageSpec
from pipeline.plan import construct_spec, dataset_spec, model_spec, student_spec


@dataclass(frozen=True)
class Point:
    epochs: int
    teacher: StageSpec
    teacher_eval: StageSpec
    errors: StageSpec
    students: list[tuple[int, StageSpec, StageSpec]]  # (seed, student, eval)


@dataclass(frozen=True)
class ErrorsSweepPlan:
    dataset: StageSpec
    points: list[Point]
    run: StageSpec

    def stages(self) -> list[StageSpec]:
        out = [self.dataset]
        for p in self.points:
            out += [p.teacher, p.teacher_eval, p.errors]
            for _, s, e in p.students:
                out += [s, e]
        return out + [self.run]

    def labels(self) -> dict[str, str]:
        out = {self.dataset.key: "data", self.run.key: "table"}
        for p in self.points:
            out[p.teacher.key] = out[p.teacher_eval.key] = f"teacher {p.epochs} ep"
            out[p.errors.key] = f"errors of teacher {p.epochs} ep"
            for seed, s, e in p.students:
                out[s.key] = out[e.key] = f"errors({p.epochs} ep) seed={seed}"
        return out


def plan(cfg: ExperimentConfig, source_sha256: str) -> ErrorsSweepPlan:
    ds = dataset_spec(source_sha256)
    points = []
    for epochs in cfg.errors_sweep.teacher_epochs:
        tcfg = ModelStageConfig(cfg.teacher.model, dataclasses.replace(cfg.teacher.train, epochs=epochs))
        teacher = model_spec(tcfg, ds.key, "teacher", cfg.runtime.amp)
        errors = construct_spec(cfg, "errors", (ds.key, teacher.key))
        students = []
        for seed in cfg.student.seeds:
            s = student_spec(cfg, "errors", seed, errors, teacher)
            seeds = model_seeds("student", ("errors", f"teacher-{epochs}ep"), seed)
            s = StageSpec("student", {**s.config, "seeds": seeds}, s.inputs)
            students.append((seed, s, StageSpec("eval", {"labels": "clean"}, (s.key, ds.key))))
        points.append(Point(epochs, teacher, StageSpec("eval", {"labels": "clean"}, (teacher.key, ds.key)), errors,
                            students))
    evals = tuple(k for p in points for k in [p.teacher_eval.key] + [e.key for _, _, e in p.students])
    return ErrorsSweepPlan(ds, points, StageSpec("run", {"name": cfg.name}, evals))


def build_table(store: Any, plan: ErrorsSweepPlan) -> Any:
    import pandas as pd

    from pipeline.report import _pct

    rows = []
    for p in plan.points:
        teacher = store.manifest("evals", p.teacher_eval.key)["metrics"]
        n_errors = store.manifest("constructed", p.errors.key)["summary"]["n"]
        for seed, s, e in p.students:
            m = store.manifest("evals", e.key)["metrics"]
            rows.append({"teacher_epochs": p.epochs, "teacher_acc_%": _pct(teacher["acc_xy"]), "n_mistakes": n_errors,
                         "seed": seed, "student_acc_%": _pct(m["acc_xy"]), "ci95_lo_%": _pct(m["ci95_xy"][0]),
                         "ci95_hi_%": _pct(m["ci95_xy"][1]), "chance_%": _pct(m["chance"]),
                         "student_init": store.manifest("models", s.key).get("init_sha256", "")[:8],
                         "teacher_key": p.teacher.key, "errors_key": p.errors.key, "model_key": s.key,
                         "eval_key": e.key})
    return pd.DataFrame(rows)


def to_markdown(df: Any) -> str:
    from pipeline.report import t_interval

    shown = df.drop(columns=[c for c in df.columns if c.endswith("_key")])
    text = shown.to_markdown(index=False, floatfmt=".1f")
    curve = []
    for epochs, g in df.groupby("teacher_epochs", sort=True):
        lo, hi = t_interval(g["student_acc_%"])
        curve.append({"teacher_epochs": epochs, "teacher_acc_%": g["teacher_acc_%"].iloc[0],
                      "n_mistakes": g["n_mistakes"].iloc[0], "n_seeds": len(g),
                      "student_acc_mean": g["student_acc_%"].mean(), "student_acc_std": g["student_acc_%"].std(),
                      "ci95_lo": lo, "ci95_hi": hi})
    import pandas as pd

    text += "\n\nStudent against teacher (mean over seeds, 95% t-interval of the mean):\n\n"
    text += pd.DataFrame(curve).to_markdown(index=False, floatfmt=".1f")
    shared = df[df.duplicated("student_init", keep=False)]
    text += "\n\n" + ("Initial weights: all students start from different weights." if shared.empty else
                      f"Initial weights SHARED by {len(shared)} students")
    return text


def write(store: Any, plan: ErrorsSweepPlan, cfg: ExperimentConfig) -> Path:
    from pipeline import report

    return report.write_run(store, plan, cfg, build=build_table, markdown=to_markdown)


EXPERIMENT = register(Experiment(
    name="errors-sweep",
    summary="Wallace's errors set over teacher epochs (errors_sweep.teacher_epochs): student vs teacher accuracy",
    plan=plan, write=write))
