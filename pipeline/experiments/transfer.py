"""transfer: section 3.3 of Ilyas et al. (2019): do students learn more from a set whose examples
transfer more?

For each architecture of ``transfer.archs``: a model of that architecture trained independently on
clean data (role ``independent``, the source's recipe), and students of that architecture on the
source's D_det. The source's det examples' transfer success to the independent model (the
``transfer`` stage: the share it classifies as t) is set against the students' clean test
accuracy on (X, Y). The paper found that the two rise together. With ``transfer.bugs_only``, the
bugs-only set (``pipeline.experiments.bugs_only``) is added to the same figure: its transfer to
each independent model and its students of each architecture.

    transfer.archs       the architectures (default small_cnn, cnn_wide, resnet9, resnet18)
    transfer.bugs_only   add the bugs-only set (with bugs_only.ensemble models)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from advfeatures.config import ExperimentConfig, _check
from advfeatures.archs import ArchError, keyed, unkeyed
from advfeatures.archs import check as check_arch
from advfeatures.seeds import model_seeds
from pipeline.experiments import Experiment, Probes, register
from pipeline.kinds import StageSpec
from pipeline.plan import Plan, add_model, base_plan, construct_spec, model_spec, student_spec, trained
from pipeline.stages.transfer import transfer_spec


@dataclass(frozen=True)
class TransferConfig:
    archs: tuple[str, ...] = ("small_cnn", "cnn_wide", "resnet9", "resnet18")
    """An independent model and students of each architecture."""
    bugs_only: bool = False
    """Also the bugs-only set of the same attack (Nakkiran; the ensemble of ``bugs_only.ensemble``)."""

    def __post_init__(self):
        _check(len(self.archs) >= 1, "transfer.archs needs at least one architecture")
        for i, a in enumerate(self.archs):
            try:
                check_arch(a, f"transfer.archs[{i}]")
            except ArchError as e:
                _check(False, str(e))
        _check(len(set(self.archs)) == len(self.archs), f"transfer.archs has repeats: {list(self.archs)}")


def independent_spec(cfg: ExperimentConfig, dataset_key: str, arch: str) -> StageSpec:
    """A model of ``arch`` trained on clean data with the source's recipe, role independent, its
    own seeds per architecture; of the source's architecture it is spectrum's independent model
    (the same key)."""
    base = model_spec(trained(cfg.source), dataset_key, "independent", cfg.runtime.amp)
    if arch == cfg.source.model.arch:
        return base
    return StageSpec("model", {**base.config, "model": keyed({**unkeyed(base.config["model"]), "arch": arch}),
                               "seeds": model_seeds("independent", (arch,), cfg.source.train.seed)}, base.inputs)


def arch_student(cfg: ExperimentConfig, kind: str, arch: str, seed: int, trained_on: StageSpec,
                 source: StageSpec) -> StageSpec:
    """A student of set ``kind`` with architecture ``arch`` (its seeds derived from both); of the
    students' own architecture it is the plain student of that set (the same key as replicate's
    and bugs-only's)."""
    if arch == cfg.student.model_for(kind).arch:
        return student_spec(cfg, kind, seed, trained_on, source)
    spec = student_spec(cfg, f"{kind}@{arch}", seed, trained_on, source)
    config = {**spec.config, "set": kind, "model": keyed({**unkeyed(spec.config["model"]), "arch": arch})}
    return StageSpec(spec.stage, config, spec.inputs)


def plan(cfg: ExperimentConfig, source_sha256: str) -> Plan:
    out = base_plan(cfg, source_sha256)
    ds, source = out.dataset, out.source
    sets = [("det", out.add(construct_spec(cfg, "det", (ds.key, source.key)), "det", role="set", set="det"))]
    if cfg.transfer.bugs_only:
        from pipeline.experiments import bugs_only

        sets.append((bugs_only.KIND, bugs_only.add_bugs_only(out, cfg)))
    for arch in cfg.transfer.archs:
        ind = add_model(out, cfg, independent_spec(cfg, ds.key, arch), f"independent {arch}", ds, robust=False,
                        role="independent", arch=arch)
        for name, spec in sets:
            out.add(transfer_spec(spec, ind), f"transfer {name} -> {arch}", role="transfer", set=name, arch=arch)
            for seed in cfg.student.seeds:
                add_model(out, cfg, arch_student(cfg, name, arch, seed, spec, source), f"{name} {arch} seed={seed}",
                          ds, robust=False, role="student", set=name, seed=seed, arch=arch)
    return out.with_run(cfg.name)


def build_table(store: Any, plan: Plan) -> Any:
    """One row per student: its architecture and set, the set's transfer success to the
    independent model of that architecture, the independent model's clean accuracy, and the
    student's clean test accuracy on (X, Y) and (X, Y+1)."""
    import pandas as pd

    from pipeline.report import _pct

    rows = []
    for node in plan.find(role="student"):
        name, arch = node.tags["set"], node.tags["arch"]
        m = store.manifest("evals", plan.evals_of(node.key)[0].key)["metrics"]
        tr = store.manifest("evals", plan.one(role="transfer", set=name, arch=arch).key)["metrics"]
        ind = plan.one(role="independent", arch=arch)
        ind_acc = store.manifest("evals", plan.evals_of(ind.key)[0].key)["metrics"]["acc_xy"]
        rows.append({"arch": arch, "set": name, "seed": node.tags["seed"],
                     "transfer_%": _pct(tr["transfer_success"]), "independent_acc_%": _pct(ind_acc),
                     "acc_xy_%": _pct(m["acc_xy"]), "ci95_lo_%": _pct(m["ci95_xy"][0]),
                     "ci95_hi_%": _pct(m["ci95_xy"][1]), "acc_xy+1_%": _pct(m["acc_xy1"]), "model_key": node.key})
    return pd.DataFrame(rows)


def summarise(df: Any) -> Any:
    """Per (set, arch): the transfer success and the students' mean accuracy."""
    return (df.groupby(["set", "arch"], sort=False)
            .agg(n=("seed", "size"), transfer=("transfer_%", "first"), acc_xy_mean=("acc_xy_%", "mean"),
                 acc_xy_std=("acc_xy_%", "std"), acc_xy1_mean=("acc_xy+1_%", "mean"))
            .reset_index())


def to_markdown(df: Any) -> str:
    text = df.drop(columns=[c for c in df.columns if c.endswith("_key")]).to_markdown(index=False, floatfmt=".1f")
    s = summarise(df)
    text += "\n\nPer architecture (students: mean, std over seeds):\n\n" + s.to_markdown(index=False, floatfmt=".1f")
    det = s[s["set"] == "det"]
    if len(det) >= 3:
        r = float(np.corrcoef(det["transfer"], det["acc_xy_mean"])[0, 1])
        text += (f"\n\nAcross the {len(det)} architectures, the Pearson correlation of det's transfer success with "
                 f"its students' (X, Y) accuracy is {r:.2f} (the paper: they rise together).")
    return text


def report(doc: Any, store: Any, info: Any, figs: Any) -> None:
    from pipeline.figures import CHANCE, plt, save

    s = summarise(info.table)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, marker in (("det", "o"), ("bugs-only", "x")):
        sub = s[s["set"] == name]
        if len(sub):
            ax.scatter(sub["transfer"], sub["acc_xy_mean"], marker=marker, label=name)
            for r in sub.to_dict("records") if name == "det" else ():  # bugs-only's crowd near the origin
                ax.annotate(r["arch"], (r["transfer"], r["acc_xy_mean"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    ax.axhline(10, color=CHANCE, ls="--", lw=1)
    ax.set(xlabel="transfer success to an independent model of the arch (%)",
           ylabel="students' clean accuracy (X, Y) %", title="transfer (section 3.3)")
    ax.legend(fontsize=8, frameon=False)
    doc.figure(save(fig, figs, "transfer"), "Each architecture: how often the source's examples fool an "
                                            "independently trained model of it, against its students' clean "
                                            "accuracy. Dashed: chance.")


EXPERIMENT = register(Experiment(
    name="transfer",
    summary="section 3.3: per architecture, det's transfer success to an independent model against the "
            "students' clean accuracy (optionally the bugs-only set on the same figure)",
    plan=plan, table=build_table, markdown=to_markdown, section=("transfer", TransferConfig), report=report,
    probes=Probes({"transfer": {"archs": ["small_cnn", "cnn_wide"]}})))
