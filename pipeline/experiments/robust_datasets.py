"""robust-datasets: section 3.1 of Ilyas et al. (2019), the robust and non-robust training sets.

Two sources on the same clean data: the profile's standard source (replicate's, same key) and a
robust one, the same recipe adversarially trained (``robust_datasets.adversarial``, L2 eps 0.5, 7
steps of 2.5·eps/7 by default; its own initial weights). From each, a set by representation
inversion (``pipeline.sets.inversion``): every goal image's representation rebuilt from another
training image, labelled with the goal's label. D_R (robust source) should teach students clean
accuracy and some robustness; D_NR (standard source) clean accuracy and none. Students of both,
of the same recipe, are evaluated on the clean test set and at each robust radius; both sources
are too (the robust source must be robust for D_R to mean anything).

    robust_datasets.adversarial   the robust source's adversarial training (train.adversarial)
    robust_datasets.steps         inversion steps (paper: 1,000) and .step_size (0.1)
    robust_datasets.n_images      goal images (0: every training image) and .seed
    robust_datasets.li_radius     also D_NR-li: D_NR within this L2 distance of its start (Li et
                                  al. 2023: 2.0, with step 0.01; ``li_step_size``)
    robust_datasets.robust_eps    the radii every model is evaluated at (default 0.25, 0.5)
    robust_datasets.epochs        the robust source's epoch budgets: one makes D_R (.maker_epochs,
                                  default the last), the others show whether its robust
                                  accuracy has plateaued
    robust_datasets.baseline      students of the same recipe on the goal images, clean (D)
    robust_datasets.checkpoint    a trained robust source read from a file (the released one of
                                  section 3.1: examples/madry-robust.yaml) instead of training one

Every robust evaluation can be checked for a weak attack (``evaluate.check_restarts``: more
steps and random restarts on ``evaluate.check_n`` test images, the classes in turn); the table gives
each check's drop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import time

import numpy as np

from advfeatures.config import AdversarialTraining, ExperimentConfig, _check, register_set_kind
from pipeline.common import Context, dataset_info, load_split, once, run_record, save_set, verified_set
from pipeline.experiments import Experiment, Probes, register
from pipeline.kinds import StageSpec
from pipeline.plan import Plan, add_model, add_robust_evals, base_plan, model_spec, student_spec, trained
from pipeline.sets import SetBuilder, inversion
from pipeline.sets import register as register_set
from storage.store import Store

ROBUST, NONROBUST, LI, CLEAN = "D_R", "D_NR", "D_NR-li", "D"
for _name in (ROBUST, NONROBUST, LI):  # student.per_set may name them (D_NR's students: lr 0.01 in the paper)
    register_set_kind(_name, plannable=False)
GOALS = "inversion-goals"
"""The set kind of D: an inversion set's goal images, clean, with their labels."""

REFERENCES = {  # clean / robust at L2 0.25 / 0.5 test accuracy, % (SCIENCE.md part 2); None: not reported
    ROBUST: {"paper": (84.0, 48.0, None), "rebuild": (86.8, 49.9, 19.2)},
    NONROBUST: {"paper": (88.0, 0.0, None), "rebuild": (84.4, 0.0, 0.0)},
    "robust source": {"paper": (90.8, 82.3, 70.2), "rebuild": (None, None, None)},  # the released model
    CLEAN: {"paper": (95.3, None, None), "rebuild": (None, None, None)},  # standard training on D (Table 1)
}
REFERENCE_RADII = ("clean", "0.25", "0.5")
"""What each position of a REFERENCES tuple holds."""


def published_at(name: str, col: str) -> str:
    """REFERENCES' robust accuracies of ``name`` at ``col``'s radius, e.g. 'paper 48; rebuild 49.9'."""
    radius, ref = col.split("_")[1], REFERENCES.get(name, {})
    i = REFERENCE_RADII.index(radius) if radius in REFERENCE_RADII else None
    vals = [f"{who} {v[i]:g}" for who, v in ref.items() if i is not None and v[i] is not None]
    return "; ".join(vals) or "not reported at this radius"


@dataclass(frozen=True)
class RobustDatasetsConfig:
    adversarial: AdversarialTraining = field(default_factory=AdversarialTraining)
    """The robust source's adversarial training; everything else is the source's recipe."""
    steps: int = 1000
    """Inversion steps per image (the paper: 1,000)."""
    step_size: float = 0.1
    """L2 length of each normalised-gradient step (the paper: 0.1)."""
    n_images: int = 0
    """Goal images, a seeded subset of the training set (0: all 50,000)."""
    seed: int = 0
    """Goal subset and start images."""
    li_radius: float | None = None
    """Also build D_NR-li: D_NR with x_r kept within this L2 distance of its start (Li et al.: 2.0)."""
    li_step_size: float = 0.01
    """D_NR-li's step (Li et al.: 0.01)."""
    robust_eps: tuple[float, ...] = (0.25, 0.5)
    """Robust accuracy of every model of the experiment at these L2 radii (``evaluate``'s attack)."""
    epochs: tuple[int, ...] = ()
    """The robust source's epoch budgets (): the source's. One budget's source makes D_R
    (``maker_epochs``, default the last); each other is the same recipe (same initial weights and
    data order) trained for another number of epochs and evaluated alike, so the table shows
    whether robust accuracy has plateaued."""
    maker_epochs: int = 0
    """The budget of ``epochs`` whose robust source makes D_R (0: the last). A larger budget after
    it checks the plateau without making the sets again."""
    baseline: bool = True
    """Students of the same recipe on the goal images themselves, clean (D): what standard training
    on the same images gives, beside D_R and D_NR."""
    checkpoint: str | None = None
    """A trained robust source to read instead of training one (e.g. the robustness library's
    released CIFAR L2 eps 0.5 ResNet-50, with ``checkpoint_arch: robustness_resnet50``): formats as
    ``source.checkpoint`` (docs/your-model.md); its file's sha256 replaces the recipe in its key."""
    checkpoint_arch: str | None = None
    """The checkpoint's architecture (None: ``source.model.arch``)."""
    checkpoint_trusted: bool = False
    """Allow a checkpoint that needs full unpickling (it can run code from the file). Not keyed."""

    def __post_init__(self):
        _check(self.steps >= 1, f"robust_datasets.steps must be >= 1, got {self.steps}")
        _check(self.step_size > 0, f"robust_datasets.step_size must be > 0, got {self.step_size}")
        _check(self.n_images >= 0, f"robust_datasets.n_images must be >= 0 (0: every image), got {self.n_images}")
        _check(self.li_radius is None or self.li_radius > 0,
               f"robust_datasets.li_radius must be > 0 (Li et al.: 2.0), or unset for no D_NR-li; got {self.li_radius}")
        _check(self.li_step_size > 0, f"robust_datasets.li_step_size must be > 0, got {self.li_step_size}")
        _check(all(e > 0 for e in self.robust_eps), f"robust_datasets.robust_eps={list(self.robust_eps)} must be > 0")
        _check(all(e >= 1 for e in self.epochs) and list(self.epochs) == sorted(set(self.epochs)),
               f"robust_datasets.epochs={list(self.epochs)} must be increasing epoch counts >= 1")
        _check(not self.maker_epochs or self.maker_epochs in self.epochs,
               f"robust_datasets.maker_epochs={self.maker_epochs} is not one of robust_datasets.epochs="
               f"{list(self.epochs)}; name one of them, or 0 for the last")
        _check(not (self.checkpoint and self.epochs), "robust_datasets.epochs with robust_datasets.checkpoint: a "
                                                      "checkpoint has no epoch budgets; leave epochs unset")
        if self.checkpoint_arch is not None:
            from advfeatures.archs import ArchError, check

            try:
                check(self.checkpoint_arch, "robust_datasets.checkpoint_arch")
            except ArchError as e:
                _check(False, str(e))


def robust_source_spec(cfg: ExperimentConfig, dataset_key: str, epochs: int | None = None) -> Any:
    """The source's recipe with ``robust_datasets.adversarial`` (and ``epochs`` when given): role
    robust-source (its own seeds; every budget the same)."""
    rd = cfg.robust_datasets
    if rd.checkpoint is not None:
        model = cfg.source.model if rd.checkpoint_arch is None else \
            dataclasses.replace(cfg.source.model, arch=rd.checkpoint_arch)
        read = dataclasses.replace(cfg.source, model=model, checkpoint=rd.checkpoint,
                                   checkpoint_trusted=rd.checkpoint_trusted)
        return model_spec(read, dataset_key, "robust-source", cfg.runtime.amp)
    train = dataclasses.replace(cfg.source.train, adversarial=rd.adversarial)
    if epochs is not None:
        train = dataclasses.replace(train, epochs=epochs)
    return model_spec(dataclasses.replace(trained(cfg.source), train=train), dataset_key, "robust-source",
                      cfg.runtime.amp)


def _evaluated(out: Plan, cfg: ExperimentConfig, spec: Any, label: str, **tags: Any) -> Any:
    add_model(out, cfg, spec, label, out.dataset, robust=False, **tags)
    add_robust_evals(out, cfg, spec, out.dataset, label, cfg.robust_datasets.robust_eps)
    return spec


@once
def build_goals(store: Store, spec: StageSpec, rt: Any = None, log: Any = lambda _m: None) -> str:
    """D: the goal images of an inversion set (its first input, checked against its checksums),
    clean, each with its own label: what standard training on the same images teaches. Records:
    nothing is perturbed (norm 0, fooled false, loss and margin NaN)."""
    parent, dataset_key = spec.inputs
    t0 = time.perf_counter()
    man, rows = verified_set(store, parent, names=("goal", "y_target"))
    x_all, y_all = load_split(store, dataset_key, "train")
    goal = rows["goal"]
    if not np.array_equal(y_all[goal], rows["y_target"]):
        raise ValueError(f"constructed/{parent}: its goals' labels differ from the dataset's; delete it and rerun")
    n = len(goal)
    out = {"x": (x_all[goal].astype(np.float32) / 255).astype(man["layout"]["x_dtype"]), "y_target": y_all[goal],
           "y_true": y_all[goal], "index": goal, "fooled": np.zeros(n, bool), "loss": np.full(n, np.nan, np.float32),
           "norm": np.zeros(n, np.float32), "margin": np.full(n, np.nan, np.float32)}
    summary = {"n": n, "share_target_is_true": 1.0, "attack_success": float("nan"),
               "attack_success_t_ne_y": float("nan"), "mean_norm": 0.0}
    save_set(store, spec, out, dataset_info(store, dataset_key)["classes"], summary, run_record(rt), t0,
             parent=parent, seeds=man.get("seeds", {}))
    log(f"{GOALS} {spec.key}: the {n} goal images of {parent}, clean")
    return spec.key


def _build(store: Store, spec: StageSpec, ctx: Context) -> str:
    return build_goals(store, spec, ctx.runtime, ctx.log)


register_set(SetBuilder((GOALS,), "an inversion set's goal images, clean, with their labels (D, section 3.1)",
                        build=_build, plannable=False, selectable=False, task_name="build-goals"))
register_set_kind(CLEAN, plannable=False)


def budgets(cfg: ExperimentConfig) -> tuple[int, ...]:
    """The robust source's epoch budgets (``maker``'s makes D_R)."""
    return cfg.robust_datasets.epochs or (cfg.source.train.epochs,)


def maker(cfg: ExperimentConfig) -> int:
    """The budget whose robust source makes D_R: ``maker_epochs``, else the last."""
    return cfg.robust_datasets.maker_epochs or budgets(cfg)[-1]


def plan(cfg: ExperimentConfig, source_sha256: str) -> Plan:
    rd, c = cfg.robust_datasets, cfg.construct
    out = base_plan(cfg, source_sha256)
    ds, standard = out.dataset, out.source
    add_robust_evals(out, cfg, standard, ds, "source", rd.robust_eps)
    robust = None
    for epochs in budgets(cfg):
        spec = robust_source_spec(cfg, ds.key, epochs if rd.epochs else None)
        makes = epochs == maker(cfg)
        _evaluated(out, cfg, spec, "robust source" if makes else f"robust source {epochs} ep",
                   role="robust-source" if makes else "robust-source-budget", epochs=epochs)
        if makes:
            robust = spec

    def inverted(model: Any, step_size: float, radius: float | None = None) -> Any:
        return inversion.spec(ds.key, model.key, rd.steps, step_size, rd.n_images, rd.seed, c.dtype, cfg.runtime.amp,
                              radius=radius, shard_size=c.shard_size, chunk_size=c.chunk_size)

    sets = [(ROBUST, inverted(robust, rd.step_size)), (NONROBUST, inverted(standard, rd.step_size))]
    if rd.li_radius is not None:
        sets.append((LI, inverted(standard, rd.li_step_size, rd.li_radius)))
    for name, spec in sets:
        out.add(spec, name, role="set", set=name)
    if rd.baseline:
        goals = out.add(StageSpec("construct", {"kind": GOALS}, (sets[0][1].key, ds.key)), CLEAN, role="set",
                        set=CLEAN)
        sets.insert(0, (CLEAN, goals))
    for name, spec in sets:
        for seed in cfg.student.seeds:
            _evaluated(out, cfg, student_spec(cfg, name, seed, spec, standard), f"{name} seed={seed}",
                       role="student", set=name, seed=seed)
    return out.with_run(cfg.name)


def build_table(store: Any, plan: Plan) -> Any:
    """One row per model: the standard source, the robust source at each epoch budget, then every
    student (D, D_R, D_NR); clean accuracy with its 95% interval, robust accuracy at each radius
    and, where checked, the strongest attack's accuracy on the checked images and its drop from
    the evaluation's own attack on them; for students, the set's inversion records (the distance
    ratio, its fall over the last fifth of the steps, the share the maker classifies as its
    label)."""
    import pandas as pd

    from pipeline.report import _pct

    models = [(plan.source, "source", None, None)]
    robust = plan.one(role="robust-source")
    sources = [(n.spec, f"robust source {n.tags['epochs']} ep", None, n.tags["epochs"])
               for n in plan.find(role="robust-source-budget")]
    sources.append((robust.spec, "robust source", None, robust.tags.get("epochs")))
    models += sorted(sources, key=lambda m: m[3])  # by epochs (a budget after the one that makes D_R: last)
    models += [(n.spec, n.tags["set"], n.tags["seed"], None) for n in plan.find(role="student")]
    rows = []
    for spec, name, seed, epochs in models:
        clean, robust_evals = plan.evals_of(spec.key)
        m = store.manifest("evals", clean.key)["metrics"]
        man = store.manifest("models", spec.key)
        row = {"model": name, "seed": seed, "arch": spec.config["model"]["arch"], "n_train": man["n_train"],
               "epochs": len(man.get("history", [])) or epochs, "init": man.get("init_sha256", "")[:8],
               "acc_%": _pct(m["acc_xy"]), "ci95_lo_%": _pct(m["ci95_xy"][0]), "ci95_hi_%": _pct(m["ci95_xy"][1])}
        for ev in robust_evals:
            rm = store.manifest("evals", ev.key)["metrics"]
            if "acc_clean_same_images" in rm:  # clean accuracy on the images the robust evaluation attacked
                row["clean_on_robust_images_%"] = _pct(rm["acc_clean_same_images"])
            row[f"robust_{ev.config['robust']['eps']:g}_%"] = _pct(rm["acc_xy"])
        for ev in plan.checks_of(spec.key):
            cm = store.manifest("evals", ev.key)["metrics"]
            eps = f"{ev.config['robust']['eps']:g}"
            row[f"check_{eps}_%"] = _pct(cm["acc_xy"])
            row[f"check_{eps}_drop"] = round(100 * cm["strength_drop"], 2)
        if seed is not None:
            summary = store.manifest("constructed", spec.inputs[0])["summary"]
            trace = summary.get("ratio_trace") or {}
            row.update({"set_distance_ratio": round(summary.get("median_distance_ratio", float("nan")), 4),
                        "set_ratio_fall_last_fifth": trace.get("fall_last_fifth", float("nan")),
                        "set_norm": round(summary["mean_norm"], 3),
                        "set_model_says_label_%": _pct(summary["attack_success"])})
        ref = REFERENCES.get(name, {})
        for who in ("paper", "rebuild"):
            vals = ref.get(who, (None, None, None))
            row[f"{who}_%"] = " / ".join("-" if v is None else f"{v:g}" for v in vals) if ref else ""
        row.update({"model_key": spec.key, "eval_key": clean.key})
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(df: Any) -> str:
    import pandas as pd

    from pipeline.report import seed_stats

    text = df.drop(columns=[c for c in df.columns if c.endswith("_key")]).to_markdown(index=False, floatfmt=".1f")
    robust_cols = [c for c in df.columns if c.startswith(("robust_", "clean_on_robust"))]
    over = []
    for name, g in df[df["seed"].notna()].groupby("model", sort=False):
        row = {"set": name, "n": len(g), **seed_stats(g["acc_%"], "acc")}
        row.update({f"{c}_mean": g[c].mean() for c in robust_cols})
        row["paper (clean / 0.25 / 0.5)"] = g["paper_%"].iloc[0]
        row["rebuild (clean / 0.25 / 0.5)"] = g["rebuild_%"].iloc[0]
        over.append(row)
    if over:
        text += "\n\nStudents over seeds (mean, std, 95% t-interval of the mean):\n\n"
        text += pd.DataFrame(over).to_markdown(index=False, floatfmt=".1f")
    drops = [c for c in df.columns if c.startswith("check_") and c.endswith("_drop")]
    if drops:
        worst = df[drops].max().max()
        text += (f"\n\nAttack strength check: on evaluate.check_n test images, {df[drops].notna().sum().sum()} checks "
                 "(2x the steps, from the image and from random restarts) lower robust accuracy by at most "
                 f"{worst:.1f} points (check_*_drop; the rule: <= 1)" + (" - the evaluation's attack is weak here."
                                                                         if worst > 1 else "."))
    verdict = signature(df)
    if verdict:
        eps = reading_radius(df).split("_")[1]
        text += (f"\n\nSignature at L2 {eps} (the smallest radius at which standard training keeps at most "
                 f"{STANDARD_NONE:g}%, else the largest; D_R's students more robust than D's and D_NR's): "
                 f"{verdict[0]}. {verdict[1]}")
    return text + ("\n\nRobust accuracy: untargeted L2 PGD on the clean test set (evaluate.robust_steps steps of "
                   "2.5·eps/steps), on evaluate.robust_n of its images when set (the classes in turn: the first image of "
                   "each class, then the second...); clean_on_robust_images_% is "
                   "the clean accuracy of those same images, the one to read a robust drop against. The claim of "
                   "section 3.1: D_R's students gain robustness that D_NR's lack, while both learn clean accuracy; set_distance_ratio is the median ||g(x_r)-g(x)|| / "
                   "||g(x0)-g(x)|| of the set's rows (how far the inversion went).")


STANDARD_NONE = 5.0
"""Robust accuracy (%) at or below which standard training is read as giving no robustness (half
of chance on 10 classes): the paper's claim is that D_R gives robustness where it gives none."""


def reading_radius(df: Any) -> str | None:
    """The robust-accuracy column section 3.1 is read at: the smallest evaluated radius at which
    standard training (D's students, else the standard source) averages at most ``STANDARD_NONE``,
    else the largest radius. Chosen from the standard model's numbers alone, never from D_R's, so
    that no radius is picked because the signature shows there. None without robust columns."""
    cols = sorted((c for c in df.columns if c.startswith("robust_")), key=lambda c: float(c.split("_")[1]))
    if not cols:
        return None
    standard = df[df["model"] == (CLEAN if (df["model"] == CLEAN).any() else "source")]
    return next((c for c in cols if not standard.empty and standard[c].mean() <= STANDARD_NONE), cols[-1])


def signature(df: Any) -> tuple[str, str] | None:
    """Section 3.1's reading from a table: D_R's students' robust accuracy at ``reading_radius``
    against D's and D_NR's (each over seeds, 95% t-interval), by ``readings.read_robust_gain``;
    None without D_R's students or robust columns."""
    from pipeline.readings import read_robust_gain
    from pipeline.report import t_interval

    col = reading_radius(df)
    if col is None or ROBUST not in set(df["model"]):
        return None

    def stat(name: str) -> dict[str, float]:
        v = df.loc[df["model"] == name, col].dropna()
        lo, hi = t_interval(v)
        return {"mean": float(v.mean()), "lo": lo, "hi": hi, "n": int(v.count())}

    others = {n: stat(n) for n in (CLEAN, NONROBUST) if n in set(df["model"])}
    return read_robust_gain(stat(ROBUST), others)


def report(doc: Any, store: Any, info: Any, figs: Any) -> None:
    """Clean and robust accuracy of every model, grouped: the sources, then each set's students."""
    from pipeline.figures import CHANCE, plt, save

    df = info.table
    cols = ["acc_%", *[c for c in df.columns if c.startswith("robust_")]]
    groups = list(dict.fromkeys(df["model"]))
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(groups), 3.2))
    width = 0.8 / len(cols)
    for j, c in enumerate(cols):
        means = [df.loc[df["model"] == g, c].mean() for g in groups]
        ax.bar(np.arange(len(groups)) + j * width, means, width, label="clean" if c == "acc_%" else
               f"L2 {c.split('_')[1]}")
        for i, g in enumerate(groups):  # every seed as a dot
            vals = df.loc[df["model"] == g, c]
            ax.plot([i + j * width] * len(vals), vals, "k.", ms=3)
    ax.axhline(10, color=CHANCE, ls="--", lw=1)
    ax.set_xticks(np.arange(len(groups)) + width * (len(cols) - 1) / 2, groups)
    ax.set(ylabel="test accuracy %", title="robust and non-robust datasets (section 3.1)")
    ax.legend(fontsize=7, frameon=False)
    doc.figure(save(fig, figs, "robust_datasets"),
               "Clean and robust test accuracy of the sources and of the students of D_R (inverted through the "
               "robust source) and D_NR (through the standard one); dots: seeds; dashed: chance.")


EXPERIMENT = register(Experiment(
    name="robust-datasets",
    summary="section 3.1: D_R and D_NR by representation inversion through a robust and a standard source; "
            "students' clean and robust accuracy beside the paper's",
    plan=plan, table=build_table, markdown=to_markdown, section=("robust_datasets", RobustDatasetsConfig),
    report=report, probes=Probes({"robust_datasets": {"robust_eps": [0.5], "li_radius": 2.0}})))
