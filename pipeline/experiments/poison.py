"""poison: adversarial examples as an availability poison (Fowl et al., "Adversarial Examples Make
Strong Poisons", NeurIPS 2021).

The det set's images (each perturbed by targeted PGD toward t = y + 1 against the source) are
relabelled with their true label y: every label is correct, yet the images carry the non-robust
features of class y + 1. A student that learns those features maps class c's features to label
c - 1, so on the clean test set its accuracy on (X, Y) falls and its accuracy on (X, Y - 1) rises.
Early stopping weakens such poisons (Sandoval-Segura et al. 2022), so every student tracks its
clean test accuracy after each epoch and the table gives the peak over epochs beside the end.
Beside them stand students of the same recipe (architecture, training settings, seeds) on the
same rows unperturbed (``poison-clean``): the accuracy the poison takes away.

Everything before the poison set is replicate's (same keys): the dataset, the source and the det
set are reused from the store.

    poison.from_set        the PGD set whose images are relabelled (det; or other, rand)
    poison.clean_students  train the students of the same rows unperturbed (default true)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from advfeatures.config import ExperimentConfig, _check
from pipeline.common import Context, load_split, once, run_record, save_set, verified_set
from pipeline.experiments import Experiment, register
from pipeline.kinds import StageSpec
from pipeline.plan import Plan, base_plan, construct_spec, eval_spec, student_spec
from pipeline.sets import SetBuilder
from pipeline.sets import register as register_set
from storage.store import Store

KIND = "poison"
CLEAN = "poison-clean"


@dataclass(frozen=True)
class PoisonConfig:
    from_set: str = "det"
    """The PGD set whose images are relabelled with their true labels: det (Fowl et al.'s
    class-targeted perturbations), other or rand."""
    clean_students: bool = True
    """Train students of the same recipe on the same rows unperturbed, beside the poisoned ones."""

    def __post_init__(self):
        _check(self.from_set in ("det", "other", "rand"),
               f"poison.from_set={self.from_set!r}; choose det, other or rand (a PGD set)")


@once
def build_poison(store: Store, spec: StageSpec, rt: Any = None, log: Any = lambda _m: None) -> str:
    """poison: the rows of a PGD set (checked against its checksums), images unchanged, each
    labelled with its true label. poison-clean: the same rows, their clean images (from the
    dataset, the second input), true labels. The records (fooled, loss, norm, margin) stay the
    PGD set's: they describe the perturbation toward its targets (y + 1 for det)."""
    parent = spec.inputs[0]
    t0 = time.perf_counter()
    man, rows = verified_set(store, parent)
    out = {**rows, "y_target": rows["y_true"].copy()}
    if spec.config["kind"] == CLEAN:
        x, _ = load_split(store, spec.inputs[1], "train")
        out["x"] = (x[rows["index"]].astype(np.float32) / 255).astype(rows["x"].dtype)
    summary = {"n": int(len(out["y_target"])), "share_target_is_true": 1.0, "attack_success": float("nan"),
               "attack_success_t_ne_y": float("nan"), "mean_norm": float(np.mean(rows["norm"])),
               "parent_attack_success": man["summary"]["attack_success"]}
    save_set(store, spec, out, man["classes"], summary, run_record(rt), t0, parent=parent,
             seeds=man.get("seeds", {}),
             records_note="fooled/loss/norm/margin are the parent PGD set's, toward its targets")
    log(f"{spec.config['kind']} {spec.key}: {summary['n']} rows of {parent} with their true labels")
    return spec.key


def _build(store: Store, spec: StageSpec, ctx: Context) -> str:
    return build_poison(store, spec, ctx.runtime, ctx.log)


register_set(SetBuilder((KIND,), "a PGD set's images with their true labels (an availability poison)",
                        build=_build, plannable=False, selectable=False, perturbed=True, task_name="build-poison"))
register_set(SetBuilder((CLEAN,), "the rows of a poison, unperturbed, with their true labels",
                        build=_build, plannable=False, selectable=False, task_name="build-poison"))


def _tracked(spec: StageSpec, dataset: StageSpec) -> StageSpec:
    """The same student, evaluated on the clean test set after every epoch (``track_test``)."""
    return StageSpec(spec.stage, {**spec.config, "track_test": True}, (*spec.inputs, dataset.key))


def plan(cfg: ExperimentConfig, source_sha256: str) -> Plan:
    out = base_plan(cfg, source_sha256)
    ds, source = out.dataset, out.source
    parent = out.add(construct_spec(cfg, cfg.poison.from_set, (ds.key, source.key)), cfg.poison.from_set, role="set",
                     set=cfg.poison.from_set)
    sets = [out.add(StageSpec("construct", {"kind": KIND, "labels": "true"}, (parent.key,)), KIND, role="set",
                    set=KIND)]
    if cfg.poison.clean_students:
        sets.append(out.add(StageSpec("construct", {"kind": CLEAN, "labels": "true"}, (parent.key, ds.key)), CLEAN,
                            role="set", set=CLEAN))
    for spec in sets:
        kind = spec.config["kind"]
        for seed in cfg.student.seeds:
            s = out.add(_tracked(student_spec(cfg, kind, seed, spec, source), ds), f"{kind} seed={seed}",
                        role="student", set=kind, seed=seed)
            out.add(eval_spec(s, ds), f"{kind} seed={seed}", role="eval", of=s.key)
    return out.with_run(cfg.name)


def shifted_accuracy(confusion: list[list[int]], shift: int) -> float:
    """The share of test images predicted as (true label + shift) mod C (rows: true labels)."""
    conf = np.asarray(confusion, dtype=np.int64)
    c = len(conf)
    return float(sum(conf[i, (i + shift) % c] for i in range(c)) / conf.sum())


def build_table(store: Any, plan: Plan) -> Any:
    import pandas as pd

    from pipeline.report import _pct

    rows = []
    for node in plan.find(role="student"):
        ev = plan.evals_of(node.key)[0]
        m = store.manifest("evals", ev.key)["metrics"]
        man = store.manifest("models", node.key)
        hist = man["history"]
        accs = [h["test_acc"] for h in hist]
        peak = int(np.argmax(accs))
        rows.append({"set": node.tags["set"], "seed": node.tags["seed"], "model": node.spec.config["model"]["arch"],
                     "n_train": man["n_train"], "epochs": len(hist), "init": man.get("init_sha256", "")[:8],
                     "acc_xy_%": _pct(m["acc_xy"]), "ci95_lo_%": _pct(m["ci95_xy"][0]),
                     "ci95_hi_%": _pct(m["ci95_xy"][1]), "peak_acc_xy_%": _pct(accs[peak]), "peak_epoch": peak + 1,
                     "acc_xy-1_%": _pct(shifted_accuracy(m["confusion"], -1)),
                     "peak_acc_xy-1_%": _pct(max(shifted_accuracy(h["test_confusion"], -1) for h in hist)),
                     "chance_%": _pct(m["chance"]), "model_key": node.key, "eval_key": ev.key})
    return pd.DataFrame(rows)


def to_markdown(df: Any) -> str:
    import pandas as pd

    from pipeline.report import seed_stats

    text = df.drop(columns=[c for c in df.columns if c.endswith("_key")]).to_markdown(index=False, floatfmt=".1f")
    over = []
    for name, g in df.groupby("set", sort=False):
        over.append({"set": name, "n": len(g), **seed_stats(g["acc_xy_%"], "acc_xy"),
                     "peak_acc_xy_mean": g["peak_acc_xy_%"].mean(),
                     "acc_xy-1_mean": g["acc_xy-1_%"].mean()})
    text += "\n\nOver seeds (mean, std, 95% t-interval of the mean):\n\n"
    text += pd.DataFrame(over).to_markdown(index=False, floatfmt=".1f")
    return text + ("\n\nA poison works when its students' clean accuracy (X, Y) falls far below the clean "
                   "students' and their accuracy on (X, Y-1) rises above chance; the peak over epochs is what "
                   "early stopping would keep.")


def report(doc: Any, store: Any, info: Any, figs: Any) -> None:
    """The report's results: every student's clean test accuracy per epoch, (X, Y) and (X, Y-1)."""
    from pipeline.figures import CHANCE, plt, save

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    colors = {KIND: "#b33", CLEAN: "#3b6ea8"}
    for row in info.table.to_dict("records"):
        hist = store.manifest("models", row["model_key"])["history"]
        epochs = [h["epoch"] for h in hist]
        for ax, shift in zip(axes, (0, -1)):
            acc = [100 * shifted_accuracy(h["test_confusion"], shift) for h in hist]
            ax.plot(epochs, acc, marker="o", ms=3, color=colors.get(row["set"], "gray"), alpha=0.8,
                    label=f"{row['set']} seed {row['seed']}")
    for ax, what in zip(axes, ("(X, Y)", "(X, Y-1)")):
        ax.axhline(info.table["chance_%"].iloc[0], color=CHANCE, ls="--", lw=1)
        ax.set(xlabel="epoch", title=f"clean test accuracy on {what}")
    axes[0].set_ylabel("%")
    axes[1].legend(fontsize=7, frameon=False)
    doc.figure(save(fig, figs, "poison_epochs"),
               "Clean test accuracy after every epoch: students of the poison (red) and of the same rows unperturbed "
               "(blue); dashed: chance. The peak is what early stopping keeps.")


EXPERIMENT = register(Experiment(
    name="poison",
    summary="det images relabelled with their true labels as an availability poison (Fowl et al. 2021): "
            "clean accuracy at the end and at its peak, (X, Y-1), beside students of the same rows unperturbed",
    plan=plan, table=build_table, markdown=to_markdown, section=("poison", PoisonConfig), report=report))
