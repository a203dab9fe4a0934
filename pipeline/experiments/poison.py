"""poison: adversarial examples as an availability poison (Fowl et al., "Adversarial Examples Make
Strong Poisons", NeurIPS 2021).

A PGD set's images (each perturbed by targeted PGD toward t = y + 1 against the source) are
relabelled with their true label y: every label is correct, yet the images carry the non-robust
features of class y + 1. Two recipes, each a line of the table (``poison.recipes``):

- ``fowl``: Fowl et al.'s crafting, class-targeted L-inf PGD toward (y + 1) mod C at 8/255 with
  ``poison.attack`` (40 steps of 2.5·eps/40 by default; theirs: 250 steps, 8 restarts and
  differentiable augmentation), on every training image (``construct.n_images`` does not apply);
  sets ``poison-fowl`` and ``poison-fowl-clean``;
- ``det``: the profile's det set (its attack and images) with true labels, the variant this
  experiment first ran (sets ``poison`` and ``poison-clean``, the keys they had). A student that learns those features maps class c's features to label
c - 1, so on the clean test set its accuracy on (X, Y) falls and its accuracy on (X, Y - 1) rises.
Early stopping weakens such poisons (Sandoval-Segura et al. 2022), so every student tracks its
clean test accuracy after each epoch and the table gives the peak over epochs beside the end.
Beside them stand students of the same recipe (architecture, training settings, seeds) on the
same rows unperturbed (``poison-clean``): the accuracy the poison takes away.

Everything before the poison set is replicate's (same keys): the dataset, the source and the det
set are reused from the store.

    poison.recipes         which lines: fowl, det (default both)
    poison.attack          fowl's crafting attack (L-inf 8/255, 40 steps of 2.5·eps/40)
    poison.from_set        the det recipe's PGD set whose images are relabelled (det; or other, rand)
    poison.clean_students  train the students of the same rows unperturbed (default true)
"""

from __future__ import annotations

import time
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from advfeatures.config import AttackConfig, ExperimentConfig, _check
from pipeline.common import Context, load_split, once, run_record, save_set, verified_set
from pipeline.experiments import Experiment, register
from pipeline.kinds import StageSpec
from pipeline.plan import Plan, base_plan, construct_spec, eval_spec, student_spec
from pipeline.sets import SetBuilder
from pipeline.sets import register as register_set
from storage.store import Store

KIND = "poison"
CLEAN = "poison-clean"
FOWL = "poison-fowl"
FOWL_CLEAN = "poison-fowl-clean"
FOWL_PARENT = "det-fowl"
RECIPES = {"fowl": (FOWL, FOWL_CLEAN), "det": (KIND, CLEAN)}
"""recipe -> (its poison set, the same rows unperturbed)."""
RECIPE_OF = {s: r for r, pair in RECIPES.items() for s in pair}
"""set -> the recipe whose line it belongs to."""
FOWL_EPS = 8 / 255


@dataclass(frozen=True)
class FowlAttack:
    """fowl's crafting: class-targeted PGD toward (y + 1) mod C from the image (no random start),
    the iterate of lowest target loss kept (Fowl et al.: L-inf 8/255, 250 steps, 8 restarts)."""
    norm: str = "linf"
    """'linf' (Fowl et al.) or 'l2'."""
    eps: float = FOWL_EPS
    """Radius in [0, 1] pixel space (8/255)."""
    steps: int = 40
    """PGD steps per image (Fowl et al.: 250; the issue's floor: 40)."""
    step_size: float | None = None
    """None: 2.5 · eps / steps."""

    def __post_init__(self):
        _check(self.norm in ("l2", "linf"), f"poison.attack.norm={self.norm!r}; choose 'linf' or 'l2'")
        _check(self.eps > 0, f"poison.attack.eps must be > 0, got {self.eps}")
        _check(self.steps >= 1, f"poison.attack.steps must be >= 1, got {self.steps}")
        _check(self.step_size is None or self.step_size > 0, f"poison.attack.step_size must be > 0, got "
                                                             f"{self.step_size}")

    def attack(self) -> AttackConfig:
        step = 2.5 * self.eps / self.steps if self.step_size is None else self.step_size
        return AttackConfig(norm=self.norm, eps=self.eps, step_size=step, steps=self.steps, random_start=False,
                            use_best=True)


@dataclass(frozen=True)
class PoisonConfig:
    recipes: tuple[str, ...] = ("fowl", "det")
    """The poisons tabulated: fowl (Fowl et al.'s crafting on every image) and det (the profile's
    det set with true labels)."""
    attack: FowlAttack = field(default_factory=FowlAttack)
    """fowl's crafting attack, class-targeted toward (y + 1) mod C (Fowl et al.: L-inf 8/255; at
    least 40 steps)."""
    from_set: str = "det"
    """The det recipe's PGD set whose images are relabelled with their true labels: det
    (class-targeted perturbations), other or rand."""
    clean_students: bool = True
    """Train students of the same recipe on the same rows unperturbed, beside the poisoned ones."""

    def __post_init__(self):
        _check(self.from_set in ("det", "other", "rand"),
               f"poison.from_set={self.from_set!r}; choose det, other or rand (a PGD set)")
        _check(bool(self.recipes) and all(r in RECIPES for r in self.recipes) and len(set(self.recipes)) ==
               len(self.recipes), f"poison.recipes={list(self.recipes)}; choose one or more of {list(RECIPES)}")


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
    if spec.config["kind"] in (CLEAN, FOWL_CLEAN):
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


register_set(SetBuilder((KIND, FOWL), "a PGD set's images with their true labels (an availability poison)",
                        build=_build, plannable=False, selectable=False, perturbed=True, task_name="build-poison"))
register_set(SetBuilder((CLEAN, FOWL_CLEAN), "the rows of a poison, unperturbed, with their true labels",
                        build=_build, plannable=False, selectable=False, task_name="build-poison"))


def _tracked(spec: StageSpec, dataset: StageSpec) -> StageSpec:
    """The same student, evaluated on the clean test set after every epoch (``track_test``)."""
    return StageSpec(spec.stage, {**spec.config, "track_test": True}, (*spec.inputs, dataset.key))


def fowl_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The configuration fowl's crafting set is planned from: det with ``poison.attack`` on every
    training image."""
    return dataclasses.replace(cfg, attack=cfg.poison.attack.attack(),
                               construct=dataclasses.replace(cfg.construct, n_images=0))


def plan(cfg: ExperimentConfig, source_sha256: str) -> Plan:
    out = base_plan(cfg, source_sha256)
    ds, source = out.dataset, out.source
    sets = []
    for recipe in cfg.poison.recipes:
        poisoned, clean = RECIPES[recipe]
        if recipe == "fowl":
            parent = out.add(construct_spec(fowl_config(cfg), "det", (ds.key, source.key)), FOWL_PARENT, role="set",
                             set=FOWL_PARENT)
        else:
            parent = out.add(construct_spec(cfg, cfg.poison.from_set, (ds.key, source.key)), cfg.poison.from_set,
                             role="set", set=cfg.poison.from_set)
        sets.append(out.add(StageSpec("construct", {"kind": poisoned, "labels": "true"}, (parent.key,)), poisoned,
                            role="set", set=poisoned))
        if cfg.poison.clean_students:
            sets.append(out.add(StageSpec("construct", {"kind": clean, "labels": "true"}, (parent.key, ds.key)),
                                clean, role="set", set=clean))
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
        made = store.manifest("constructed", node.spec.inputs[0])["summary"]
        rows.append({"recipe": RECIPE_OF.get(node.tags["set"], ""), "set": node.tags["set"], "seed": node.tags["seed"],
                     "model": node.spec.config["model"]["arch"], "n_train": man["n_train"],
                     "source_fooled_%": _pct(made["parent_attack_success"]), "epochs": len(hist), "init": man.get("init_sha256", "")[:8],
                     "acc_xy_%": _pct(m["acc_xy"]), "ci95_lo_%": _pct(m["ci95_xy"][0]),
                     "ci95_hi_%": _pct(m["ci95_xy"][1]), "peak_acc_xy_%": _pct(accs[peak]), "peak_epoch": peak + 1,
                     "acc_xy-1_%": _pct(shifted_accuracy(m["confusion"], -1)),
                     "peak_acc_xy-1_%": _pct(max(shifted_accuracy(h["test_confusion"], -1) for h in hist)),
                     "chance_%": _pct(m["chance"]), "model_key": node.key, "eval_key": ev.key})
    return pd.DataFrame(rows)


def poison_drop(df: Any, recipe: str) -> dict[str, Any]:
    """A recipe's poisoned students' clean accuracy minus its clean students' (paired by student
    seed): at the end and at the peak over epochs, each as mean, lo, hi (95% t-interval) and n."""
    from pipeline.report import seed_stats

    poisoned, clean = RECIPES[recipe]
    out: dict[str, Any] = {}
    for col, name in (("acc_xy_%", "end"), ("peak_acc_xy_%", "peak")):
        p = df[df["set"] == poisoned].set_index("seed")[col]
        c = df[df["set"] == clean].set_index("seed")[col]
        d = (p - c.reindex(p.index)).dropna()
        st = seed_stats(d, "d")
        out.update({f"{name}_drop": st["d_mean"], f"{name}_lo": st["ci95_lo"], f"{name}_hi": st["ci95_hi"]})
    out["n"] = len(d)
    return out


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
    drops = [{"recipe": r, **poison_drop(df, r)} for r in RECIPES if {*RECIPES[r]} <= set(df["set"])]
    if drops:
        text += ("\n\nWhat each poison takes away: its students' clean (X, Y) minus the clean students' of the same "
                 "seed (paired by seed; mean, 95% t-interval), at the end and at each one's peak over epochs:\n\n")
        text += pd.DataFrame(drops).to_markdown(index=False, floatfmt=".1f")
    return text + ("\n\nA poison works when its students' clean accuracy (X, Y) falls far below the clean "
                   "students' and their accuracy on (X, Y-1) rises above chance; the peak over epochs is what "
                   "early stopping would keep.")


def report(doc: Any, store: Any, info: Any, figs: Any) -> None:
    """The report's results: every student's clean test accuracy per epoch, (X, Y) and (X, Y-1)."""
    from pipeline.figures import CHANCE, plt, save

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    colors = {FOWL: "#7a0010", FOWL_CLEAN: "#1f4e79", KIND: "#e07070", CLEAN: "#8fb3d9"}
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
               "Clean test accuracy after every epoch: students of the poisons (red; dark: Fowl's recipe, light: det "
               "with true labels) and of the same rows unperturbed (blue); dashed: chance. The peak is what early "
               "stopping keeps.")


EXPERIMENT = register(Experiment(
    name="poison",
    summary="det images relabelled with their true labels as an availability poison (Fowl et al. 2021): "
            "clean accuracy at the end and at its peak, (X, Y-1), beside students of the same rows unperturbed",
    plan=plan, table=build_table, markdown=to_markdown, section=("poison", PoisonConfig), report=report))
