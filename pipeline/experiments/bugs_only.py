"""bugs-only: Nakkiran's counter-example (Distill 2019, "Adversarial Examples that are Only Bugs").

A det-style set (t = y + 1) made by a PGD that also asks an ensemble of independently trained
models to keep the true label (``advfeatures.attacks.bugs_only_pgd``): the perturbation then
carries what is particular to the source (its bugs) and not the features other models share.
If adversarial examples were features, such a set would still teach; Nakkiran's students learn
the original labels' shifted mapping instead: (X, Y) near 0 and (X, Y+1) high.

Beside it stands the plain PGD det set of the same attack (same eps, steps and step size: the
profile's ``attack``, whose key is replicate's det when the attacks agree). For each set: the
attack success on the source, the transfer success to a held-out model trained independently
(``pipeline.stages.transfer``), and the students' accuracy on (X, Y) and (X, Y+1) of the clean
test set.

    bugs_only.ensemble   ensemble size k (Nakkiran: 10 ResNet-18s); role ``ensemble``, member i
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from advfeatures import construct as C
from advfeatures.attacks import bugs_only_pgd, threat_model
from advfeatures.config import AttackConfig, ExperimentConfig, _check, build_config
from advfeatures.seeds import model_seeds
from advfeatures.training import to_unit
from pipeline.common import load_model
from pipeline.experiments import Experiment, Probes, register
from pipeline.kinds import StageSpec
from pipeline.plan import Plan, add_model, add_students, base_plan, construct_spec, model_spec, trained
from pipeline.sets import SetBuilder
from pipeline.sets import pgd as P
from pipeline.sets import register as register_set
from pipeline.stages.transfer import transfer_spec

KIND = "bugs-only"
REFERENCES = {  # attack / transfer / student (X, Y) / (X, Y+1), %: Nakkiran, L2 (SCIENCE.md part 2)
    "det": (99.9, 82.5, 33.2, 27.3),
    KIND: (99.3, 1.7, 2.8, 70.8),
}


@dataclass(frozen=True)
class BugsOnlyConfig:
    ensemble: int = 10
    """Models in the ensemble that keeps the true label (Nakkiran: 10), each from its own initial
    weights, trained with the source's recipe."""

    def __post_init__(self):
        _check(self.ensemble >= 1, f"bugs_only.ensemble must be >= 1 (Nakkiran: 10), got {self.ensemble}")


def attack_block(store: Any, spec: StageSpec, model: Any, block: np.ndarray, targets: np.ndarray, y: np.ndarray,
                 rt: Any, device: Any, on_batch: Any) -> dict[str, np.ndarray]:
    """The bugs-only attack on a block of uint8 images; the records are the source's on the
    stored images (as ``C.attack_block``'s). fp32: the attack takes no autocast."""
    attack = build_config(AttackConfig, spec.config["attack"], "attack")
    threat = threat_model(attack.norm, attack.eps)
    ensemble = [load_model(store, key, device) for key in spec.inputs[2:]]
    sdtype = getattr(torch, spec.config["dtype"])
    out = {k: [] for k in ("x", "fooled", "loss", "norm", "margin")}
    bs = rt.attack_batch_size
    for s in range(0, len(block), bs):
        xb = to_unit(torch.from_numpy(block[s:s + bs]).to(device))
        tb, yb = torch.from_numpy(targets[s:s + bs]).to(device), torch.from_numpy(y[s:s + bs]).to(device)
        r = bugs_only_pgd(model, ensemble, xb, tb, yb, threat, attack.steps, attack.step_size)
        xs, rec = C.stored_records(model, xb, r.x, tb, threat, sdtype)
        out["x"].append(xs.to(sdtype).cpu().numpy())
        for k, v in rec.items():
            out[k].append(v.cpu().numpy())
        on_batch(min(s + bs, len(block)), len(block))
    return {k: np.concatenate(v) for k, v in out.items()}


P.BLOCK_ATTACKS[KIND] = attack_block
register_set(SetBuilder((KIND,), "det-style PGD that fools the source while an ensemble keeps the true label "
                                 "(Nakkiran 2019)", sharded=P.SHARDS, plannable=False, selectable=False,
                        perturbed=True, task_name="generate-set", rows=P.pgd_rows))


def member_spec(cfg: ExperimentConfig, dataset_key: str, role: str, member: int) -> StageSpec:
    """An independently trained model of the source's recipe: ``role`` with member number i
    (its own initial weights and data order)."""
    base = model_spec(trained(cfg.source), dataset_key, role, cfg.runtime.amp)
    return StageSpec("model", {**base.config, "member": member,
                               "seeds": model_seeds(role, (member,), cfg.source.train.seed)}, base.inputs)


def bugs_only_spec(cfg: ExperimentConfig, dataset_key: str, source: StageSpec,
                   ensemble: list[StageSpec]) -> StageSpec:
    """The det set's spec with the bugs-only attack: same attack, subset, seed and storage dtype;
    targets det; the ensemble's models are inputs (amp is not keyed: the attack runs in fp32)."""
    det = P.spec(cfg, "det", (dataset_key, source.key))
    config = {k: v for k, v in det.config.items() if k != "amp"}
    config.update({"kind": KIND, "targets": "det"})
    return StageSpec("construct", config, (dataset_key, source.key, *(m.key for m in ensemble)), options=det.options)


def add_bugs_only(out: Plan, cfg: ExperimentConfig) -> StageSpec:
    """The ensemble (each model evaluated) and the bugs-only set, added to a plan with a source."""
    ds, source = out.dataset, out.source
    ensemble = [add_model(out, cfg, member_spec(cfg, ds.key, "ensemble", i), f"ensemble {i}", ds, robust=False,
                          role="ensemble", member=i) for i in range(cfg.bugs_only.ensemble)]
    return out.add(bugs_only_spec(cfg, ds.key, source, ensemble), KIND, role="set", set=KIND)


def plan(cfg: ExperimentConfig, source_sha256: str) -> Plan:
    out = base_plan(cfg, source_sha256)
    ds, source = out.dataset, out.source
    bugs = add_bugs_only(out, cfg)
    holdout = add_model(out, cfg, member_spec(cfg, ds.key, "holdout", 0), "held-out model", ds, robust=False,
                        role="holdout")
    det = out.add(construct_spec(cfg, "det", (ds.key, source.key)), "det", role="set", set="det")
    for name, spec in (("det", det), (KIND, bugs)):
        out.add(transfer_spec(spec, holdout), f"transfer {name}", role="transfer", set=name)
    for name, spec in (("det", det), (KIND, bugs)):
        add_students(out, cfg, name, spec, ds, source, robust=False)
    return out.with_run(cfg.name)


def build_table(store: Any, plan: Plan) -> Any:
    """One row per student: its set's attack success on the source and transfer success to the
    held-out model, its clean test accuracy on (X, Y) and (X, Y+1) with 95% intervals."""
    import pandas as pd

    from pipeline.report import _pct

    rows = []
    for node in plan.find(role="student"):
        name, set_key = node.tags["set"], node.spec.inputs[0]
        m = store.manifest("evals", plan.evals_of(node.key)[0].key)["metrics"]
        summary = store.manifest("constructed", set_key)["summary"]
        tr = store.manifest("evals", plan.one(role="transfer", set=name).key)["metrics"]
        man = store.manifest("models", node.key)
        ref = REFERENCES[name]
        rows.append({"set": name, "seed": node.tags["seed"], "n_train": man["n_train"],
                     "init": man.get("init_sha256", "")[:8], "attack_%": _pct(summary["attack_success_t_ne_y"]),
                     "transfer_%": _pct(tr["transfer_success"]), "acc_xy_%": _pct(m["acc_xy"]),
                     "ci95_lo_%": _pct(m["ci95_xy"][0]), "ci95_hi_%": _pct(m["ci95_xy"][1]),
                     "acc_xy+1_%": _pct(m["acc_xy1"]), "mean_norm": round(summary["mean_norm"], 3),
                     "paper_attack/transfer/xy/xy+1_%": " / ".join(f"{v:g}" for v in ref),
                     "model_key": node.key})
    return pd.DataFrame(rows)


def to_markdown(df: Any) -> str:
    import pandas as pd

    from pipeline.report import seed_stats

    text = df.drop(columns=[c for c in df.columns if c.endswith("_key")]).to_markdown(index=False, floatfmt=".1f")
    over = []
    for name, g in df.groupby("set", sort=False):
        over.append({"set": name, "n": len(g), "attack": g["attack_%"].iloc[0], "transfer": g["transfer_%"].iloc[0],
                     **seed_stats(g["acc_xy_%"], "acc_xy"), "acc_xy+1_mean": g["acc_xy+1_%"].mean(),
                     "Nakkiran": g["paper_attack/transfer/xy/xy+1_%"].iloc[0]})
    text += "\n\nOver seeds (mean, std, 95% t-interval of the mean), beside Nakkiran's numbers:\n\n"
    text += pd.DataFrame(over).to_markdown(index=False, floatfmt=".1f")
    return text + ("\n\nattack: the source classifies the stored image as its target t = y + 1; transfer: a "
                   "held-out model trained independently does too. Bugs-only examples fool the source but not "
                   "other models, and their students learn (X, Y+1) rather than (X, Y): examples can be bugs.")


def report(doc: Any, store: Any, info: Any, figs: Any) -> None:
    from pipeline.figures import plt, save

    df = info.table
    groups = list(dict.fromkeys(df["set"]))
    cols = [("attack_%", "attack on source"), ("transfer_%", "transfer"), ("acc_xy_%", "student (X, Y)"),
            ("acc_xy+1_%", "student (X, Y+1)")]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    width = 0.8 / len(groups)
    for j, g in enumerate(groups):
        sub = df[df["set"] == g]
        ax.bar(np.arange(len(cols)) + j * width, [sub[c].mean() for c, _ in cols], width, label=g)
    ax.set_xticks(np.arange(len(cols)) + width * (len(groups) - 1) / 2, [t for _, t in cols], fontsize=8)
    ax.set(ylabel="%", title="bugs-only vs plain PGD (det targets)")
    ax.legend(fontsize=8, frameon=False)
    doc.figure(save(fig, figs, "bugs_only"), "Attack success on the source, transfer to a held-out model, and the "
                                             "students' clean test accuracy on (X, Y) and (X, Y+1), per set.")


EXPERIMENT = register(Experiment(
    name="bugs-only",
    summary="Nakkiran 2019: det examples that fool the source while an ensemble keeps the label, beside plain "
            "PGD: attack, transfer to a held-out model, students on (X, Y) and (X, Y+1)",
    plan=plan, table=build_table, markdown=to_markdown, section=("bugs_only", BugsOnlyConfig), report=report,
    probes=Probes({"bugs_only": {"ensemble": 2}})))
