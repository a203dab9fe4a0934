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
from typing import Any

from advfeatures.config import ExperimentConfig, ModelStageConfig, _check
from advfeatures.seeds import model_seeds
from pipeline.experiments import Experiment, Probes, register
from pipeline.kinds import StageSpec
from pipeline.plan import Plan, add_model, construct_spec, dataset_spec, eval_spec, model_spec, student_spec


@dataclass(frozen=True)
class ErrorsSweepConfig:
    teacher_epochs: tuple[int, ...] = (1, 2, 4, 8)
    """The errors-sweep experiment: one teacher (the teacher recipe) per number of epochs, its
    mistakes as a set, students of it; how student accuracy follows teacher accuracy."""

    def __post_init__(self):
        _check(len(self.teacher_epochs) >= 1 and all(e >= 1 for e in self.teacher_epochs),
               f"errors_sweep.teacher_epochs={list(self.teacher_epochs)} needs epochs >= 1")
        _check(len(set(self.teacher_epochs)) == len(self.teacher_epochs), "errors_sweep.teacher_epochs has repeats")


def plan(cfg: ExperimentConfig, source_sha256: str) -> Plan:
    out = Plan()
    ds = out.add(dataset_spec(source_sha256), "data", role="dataset")
    for epochs in cfg.errors_sweep.teacher_epochs:
        tcfg = ModelStageConfig(cfg.teacher.model, dataclasses.replace(cfg.teacher.train, epochs=epochs))
        teacher = add_model(out, cfg, model_spec(tcfg, ds.key, "teacher", cfg.runtime.amp), f"teacher {epochs} ep", ds,
                            robust=False, role="teacher", epochs=epochs)
        errors = out.add(construct_spec(cfg, "errors", (ds.key, teacher.key)), f"errors of teacher {epochs} ep",
                         role="set", set="errors", epochs=epochs)
        for seed in cfg.student.seeds:
            s = student_spec(cfg, "errors", seed, errors, teacher)
            seeds = model_seeds("student", ("errors", f"teacher-{epochs}ep"), seed)
            s = StageSpec("student", {**s.config, "seeds": seeds}, s.inputs)
            out.add(s, f"errors({epochs} ep) seed={seed}", role="student", set="errors", seed=seed, epochs=epochs)
            out.add(eval_spec(s, ds), f"errors({epochs} ep) seed={seed}", role="eval", of=s.key)
    return out.with_run(cfg.name)


def build_table(store: Any, plan: Plan) -> Any:
    import pandas as pd

    from pipeline.report import _pct

    rows = []
    for t in plan.find(role="teacher"):
        epochs = t.tags["epochs"]
        teacher = store.manifest("evals", plan.evals_of(t.key)[0].key)["metrics"]
        errors = plan.one(role="set", epochs=epochs).spec
        n_errors = store.manifest("constructed", errors.key)["summary"]["n"]
        for node in plan.find(role="student", epochs=epochs):
            s, seed, e = node.spec, node.tags["seed"], plan.evals_of(node.key)[0]
            m = store.manifest("evals", e.key)["metrics"]
            rows.append({"teacher_epochs": epochs, "teacher_acc_%": _pct(teacher["acc_xy"]), "n_mistakes": n_errors,
                         "seed": seed, "student_acc_%": _pct(m["acc_xy"]), "ci95_lo_%": _pct(m["ci95_xy"][0]),
                         "ci95_hi_%": _pct(m["ci95_xy"][1]), "chance_%": _pct(m["chance"]),
                         "student_init": store.manifest("models", s.key).get("init_sha256", "")[:8],
                         "teacher_key": t.key, "errors_key": errors.key, "model_key": s.key,
                         "eval_key": e.key})
    return pd.DataFrame(rows)


def to_markdown(df: Any) -> str:
    from pipeline.report import seed_stats

    shown = df.drop(columns=[c for c in df.columns if c.endswith("_key")])
    text = shown.to_markdown(index=False, floatfmt=".1f")
    curve = []
    for epochs, g in df.groupby("teacher_epochs", sort=True):
        curve.append({"teacher_epochs": epochs, "teacher_acc_%": g["teacher_acc_%"].iloc[0],
                      "n_mistakes": g["n_mistakes"].iloc[0], "n_seeds": len(g),
                      **seed_stats(g["student_acc_%"], "student_acc")})
    import pandas as pd

    text += "\n\nStudent against teacher (mean over seeds, 95% t-interval of the mean):\n\n"
    text += pd.DataFrame(curve).to_markdown(index=False, floatfmt=".1f")
    shared = df[df.duplicated("student_init", keep=False)]
    text += "\n\n" + ("Initial weights: all students start from different weights." if shared.empty else
                      f"Initial weights SHARED by {len(shared)} students")
    return text


def errors_curve(df: Any) -> Any:
    """Students of each teacher's mistakes against the teacher's accuracy (95% intervals)."""
    import numpy as np

    from pipeline.figures import CHANCE, OURS, plt
    from pipeline.report import t_interval

    fig, ax = plt.subplots(figsize=(5, 3.4))
    pts = []
    for epochs, g in df.groupby("teacher_epochs", sort=True):
        lo, hi = t_interval(g["student_acc_%"]) if len(g) > 1 else (g["ci95_lo_%"].iloc[0], g["ci95_hi_%"].iloc[0])
        m = g["student_acc_%"].mean()
        pts.append((g["teacher_acc_%"].iloc[0], m, m - lo, hi - m, epochs))
    t, m, lo, hi, ep = zip(*pts)
    ax.errorbar(t, m, yerr=np.clip([lo, hi], 0, None), marker="o", capsize=3, color=OURS)
    for ti, mi, e in zip(t, m, ep):
        ax.annotate(f"{e} ep", (ti, mi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(df["chance_%"].iloc[0], color=CHANCE, ls="--", lw=1, label="chance")
    ax.set(xlabel="teacher accuracy (%)", ylabel="student accuracy (%)", title="learning from a teacher's errors")
    ax.legend(fontsize=7, frameon=False)
    return fig


def report(doc: Any, store: Any, info: Any, figs: Any) -> None:
    """The report's results: the curve of student against teacher accuracy."""
    from pipeline.figures import save

    doc.figure(save(errors_curve(info.table), figs, "errors_curve"),
               "Students of each teacher's mistakes against the teacher's accuracy (95% intervals).")


EXPERIMENT = register(Experiment(
    name="errors-sweep",
    summary="Wallace's errors set over teacher epochs (errors_sweep.teacher_epochs): student vs teacher accuracy",
    plan=plan, table=build_table, markdown=to_markdown, section=("errors_sweep", ErrorsSweepConfig),
    report=report, probes=Probes({"errors_sweep": {"teacher_epochs": [1, 2]}})))
