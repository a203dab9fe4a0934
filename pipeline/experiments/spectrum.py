"""spectrum: what students learn as the source becomes more robust (to our knowledge unpublished).

Sources adversarially trained at L2 eps in ``spectrum.eps`` (0: the standard source, replicate's
key), everything else fixed: the same recipe and, by default, the same initial weights and data
order (``spectrum.shared_init``; a deliberate control, off gives each source its own). For each
source: its clean and robust accuracy, D_det and D_rand with the profile's attack (their fooling
rates), the transfer rate of each set to one independent standard model, and students of each on
(X, Y) and (X, Y+1). Earlier work varied source robustness only to measure how far attacks
transfer (Springer et al. 2021; Zhang et al. 2024: slightly robust sources transfer best) or how
fine-tuning transfers (Salman et al. 2020); this asks whether their examples also teach more.
The figure marks D_NR's and D_R's students (``robust-datasets``) at the two ends when the store
holds them for the same config.

    spectrum.eps            source robustness (default 0, 0.05, 0.1, 0.25, 0.5)
    spectrum.steps          adversarial-training PGD steps (step 2.5 eps / steps)
    spectrum.sets           the sets made from each source (default det, rand)
    spectrum.robust_eps     the radii the sources are evaluated at (default 0.25, 0.5)
    spectrum.shared_init    every source from the standard source's initial weights (default true)
    spectrum.probe_eps      the robust probe's adversarial-training eps (default 0.5; 0: no probe)
    spectrum.probe_seed     the probe's own seed (one probe for every source seed)

Fooling-matched: one attack (``attack``) for every source, at a radius where each is fooled on
at least ``MIN_FOOLED`` (90%) of its rows; the table gives each source's fooling rate and the markdown
says whether the rule holds (a spectrum whose robust sources are rarely fooled compares sets
that are mostly mislabelled clean images). The probe: each set's transfer to an independently
trained robust model. Perturbations that fool a robust model carry perceptible, robust features;
if the robust sources' sets fool the probe far more, what their students learn is not shown to
be non-robust. leak-det (a fixed pattern per target class, ``controls``) beside det for every
source. Over ``source.seeds`` the whole spectrum repeats per source seed (the table gains
``source_seed``; the slope's interval is over source seeds).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from advfeatures.config import AdversarialTraining, ExperimentConfig, _check
from advfeatures.seeds import model_seeds
from pipeline.experiments import Experiment, Probes, register
from pipeline.kinds import StageSpec
from pipeline.plan import (Plan, add_model, base_plan, construct_spec, model_spec, robust_eval_spec, student_spec,
                           trained)
from pipeline.stages.transfer import transfer_spec


MIN_FOOLED = 0.9
"""The fooling-matched rule: each source's det set fools it on at least this share of its t != y rows."""
SET_KINDS = ("rand", "other", "det", "leak-rand", "leak-other", "leak-det")


@dataclass(frozen=True)
class SpectrumConfig:
    eps: tuple[float, ...] = (0.0, 0.05, 0.1, 0.25, 0.5)
    """L2 radii of the sources' adversarial training (0: standard training)."""
    steps: int = 7
    """PGD steps of adversarial training (step 2.5 eps / steps: the robustness library's)."""
    sets: tuple[str, ...] = ("det", "rand")
    """The PGD sets built from every source with the same attack (rand, other, det)."""
    robust_eps: tuple[float, ...] = (0.25, 0.5)
    """L2 radii at which each source's robust accuracy is reported (untargeted PGD, evaluate.robust_steps)."""
    shared_init: bool = True
    """Every source starts from the standard source's initial weights and data order, so eps is
    the only difference (false: each from its own, seeded by its eps)."""
    probe_eps: float = 0.5
    """The robust probe: a model of the source's recipe adversarially trained at this L2 eps
    (``steps`` steps), from its own seed; every set's transfer to it is reported. 0: no probe."""
    probe_seed: int = 0
    """The probe's training seed (its role gives it weights of its own); one probe serves every
    source seed."""

    def __post_init__(self):
        _check(len(self.eps) >= 2 and all(e >= 0 for e in self.eps),
               f"spectrum.eps={list(self.eps)}: give at least two radii >= 0 (0: the standard source)")
        _check(len(set(self.eps)) == len(self.eps), f"spectrum.eps has repeats: {list(self.eps)}")
        _check(self.steps >= 1, f"spectrum.steps must be >= 1, got {self.steps}")
        _check(all(k in SET_KINDS for k in self.sets) and self.sets,
               f"spectrum.sets={list(self.sets)}: choose from {list(SET_KINDS)} (PGD sets and their leak controls)")
        _check(self.probe_eps >= 0, f"spectrum.probe_eps must be >= 0 (0: no probe), got {self.probe_eps}")

        _check(all(e > 0 for e in self.robust_eps), f"spectrum.robust_eps={list(self.robust_eps)} must be > 0")


def source_at(cfg: ExperimentConfig, dataset_key: str, eps: float) -> StageSpec:
    """The source's recipe adversarially trained at ``eps`` (0: the standard source itself)."""
    sp = cfg.spectrum
    if eps == 0:
        return model_spec(cfg.source, dataset_key, "source", cfg.runtime.amp)
    adv = AdversarialTraining(norm="l2", eps=eps, steps=sp.steps)
    mc = dataclasses.replace(trained(cfg.source), train=dataclasses.replace(cfg.source.train, adversarial=adv))
    spec = model_spec(mc, dataset_key, "source", cfg.runtime.amp)
    if sp.shared_init:
        return spec
    return StageSpec("model", {**spec.config, "seeds": model_seeds("source", (f"eps{eps:g}",), cfg.source.train.seed)},
                     spec.inputs)


def probe_spec(cfg: ExperimentConfig, dataset_key: str) -> StageSpec | None:
    """The robust probe: the source's recipe adversarially trained at ``spectrum.probe_eps`` from
    its own seed (``probe_seed``, role probe): the same model whatever the source seed."""
    sp = cfg.spectrum
    if not sp.probe_eps:
        return None
    adv = AdversarialTraining(norm="l2", eps=sp.probe_eps, steps=sp.steps)
    train = dataclasses.replace(cfg.source.train, adversarial=adv, seed=sp.probe_seed)
    return model_spec(dataclasses.replace(trained(cfg.source), train=train), dataset_key, "probe", cfg.runtime.amp)


def plan(cfg: ExperimentConfig, source_sha256: str) -> Plan:
    sp = cfg.spectrum
    out = base_plan(cfg, source_sha256)
    ds = out.dataset
    independent = model_spec(trained(cfg.source), ds.key, "independent", cfg.runtime.amp)
    add_model(out, cfg, independent, "independent standard model", ds, robust=False, role="independent")
    probe = probe_spec(cfg, ds.key)
    if probe is not None:
        add_model(out, cfg, probe, f"robust probe (eps {sp.probe_eps:g})", ds, robust=False, role="probe")
        for r in sp.robust_eps:
            out.add(robust_eval_spec(cfg, probe, ds, r), f"robust probe at {r:g}", role="eval", of=probe.key, eps=r)
    for eps in sp.eps:
        src = out.source if eps == 0 else add_model(out, cfg, source_at(cfg, ds.key, eps), f"source eps={eps:g}", ds,
                                                    robust=False, role="spectrum-source", train_eps=eps)
        for r in sp.robust_eps:
            out.add(robust_eval_spec(cfg, src, ds, r), f"source eps={eps:g} at {r:g}", role="eval", of=src.key, eps=r)
        for kind in sp.sets:
            s = out.add(construct_spec(cfg, kind, (ds.key, src.key)), f"{kind} eps={eps:g}", role="set",
                        set=f"{kind} eps={eps:g}", kind=kind, train_eps=eps)
            out.add(transfer_spec(s, independent), f"transfer {kind} eps={eps:g}", role="transfer", kind=kind,
                    train_eps=eps)
            if probe is not None:
                out.add(transfer_spec(s, probe), f"probe {kind} eps={eps:g}", role="probe-transfer", kind=kind,
                        train_eps=eps)
            for seed in cfg.student.seeds:
                add_model(out, cfg, student_spec(cfg, kind, seed, s, src), f"{kind} eps={eps:g} seed={seed}", ds,
                          robust=False, role="student", set=f"{kind} eps={eps:g}", kind=kind, train_eps=eps,
                          seed=seed)
    return out.with_run(cfg.name)


def build_table(store: Any, plan: Plan) -> Any:
    """One row per student: its source's training eps, clean and robust accuracy, its set's fooling
    and transfer rates (to the independent standard model and to the robust probe), and its clean
    test accuracy on (X, Y) and (X, Y+1). Over several source seeds, each seed's rows with
    ``source_seed``."""
    import pandas as pd

    if plan.replicates:
        return pd.concat([_table(store, sub).assign(source_seed=s) for s, sub in plan.replicates.items()],
                         ignore_index=True)
    return _table(store, plan)


def _table(store: Any, plan: Plan) -> Any:
    import pandas as pd

    from pipeline.report import _pct

    rows = []
    for node in plan.find(role="student"):
        eps, kind = node.tags["train_eps"], node.tags["kind"]
        set_key = node.spec.inputs[0]
        src_key = plan.get(role="set", kind=kind, train_eps=eps).inputs[1]
        clean, robust = plan.evals_of(src_key)
        summary = store.manifest("constructed", set_key)["summary"]
        tr = store.manifest("evals", plan.one(role="transfer", kind=kind, train_eps=eps).key)["metrics"]
        m = store.manifest("evals", plan.evals_of(node.key)[0].key)["metrics"]
        row = {"source_eps": eps, "set": kind, "seed": node.tags["seed"],
               "source_acc_%": _pct(store.manifest("evals", clean.key)["metrics"]["acc_xy"])}
        for ev in robust:
            row[f"source_robust_{ev.config['robust']['eps']:g}_%"] = _pct(
                store.manifest("evals", ev.key)["metrics"]["acc_xy"])
        row.update({"fooled_t≠y_%": _pct(summary["attack_success_t_ne_y"]), "transfer_%": _pct(tr["transfer_success"])})
        probes = plan.find(role="probe-transfer", kind=kind, train_eps=eps)
        if probes:
            pm = store.manifest("evals", probes[0].key)["metrics"]
            row["probe_transfer_%"] = _pct(pm["transfer_success"])
        row.update({"acc_xy_%": _pct(m["acc_xy"]), "ci95_lo_%": _pct(m["ci95_xy"][0]),
                    "ci95_hi_%": _pct(m["ci95_xy"][1]), "acc_xy+1_%": _pct(m["acc_xy1"]), "model_key": node.key})
        rows.append(row)
    return pd.DataFrame(rows)


def fooling_matched(df: Any, min_fooled: float = MIN_FOOLED, kind: str = "det") -> tuple[bool, dict[float, float]]:
    """Whether every source's ``kind`` set fools it on at least ``min_fooled`` of its t != y rows
    (each source seed counted), and the lowest such rate per source eps (in %)."""
    g = df[df["set"] == kind]
    if g.empty or "fooled_t≠y_%" not in g:
        return False, {}
    low = g.groupby("source_eps")["fooled_t≠y_%"].min()
    return bool((low >= 100 * min_fooled).all()), {float(k): float(v) for k, v in low.items()}


def slopes_over_sources(df: Any, kind: str, col: str = "acc_xy_%") -> Any:
    """Per source seed, the least-squares slope of ``kind``'s students' mean ``col`` on source eps."""
    import pandas as pd

    from pipeline.readings import slope

    g = df[df["set"] == kind]
    per = g.groupby("source_seed") if "source_seed" in g else [(0, g)]
    return pd.Series([slope(*zip(*sorted(h.groupby("source_eps")[col].mean().items()))) for _, h in per],
                     dtype=float)


def probe_rise(df: Any, kind: str) -> float | None:
    """How many points more the most robust source's ``kind`` set transfers to the robust probe
    than the standard source's (means over seeds); None without a probe."""
    if "probe_transfer_%" not in df:
        return None
    by = df[df["set"] == kind].groupby("source_eps")["probe_transfer_%"].mean()
    return float(by.iloc[-1] - by.iloc[0]) if len(by) >= 2 else None


def to_markdown(df: Any, min_fooled: float = MIN_FOOLED) -> str:
    import pandas as pd

    from pipeline.report import t_interval

    shown = df.assign(source_eps=df["source_eps"].map("eps {:g}".format))  # a label: .1f would print 0.25 as 0.2
    text = shown.drop(columns=[c for c in df.columns if c.endswith("_key")]).to_markdown(index=False, floatfmt=".1f")
    keep = [c for c in df.columns if (c.startswith("source_") and c not in ("source_eps", "source_seed"))
            or c in ("fooled_t≠y_%", "transfer_%", "probe_transfer_%")]
    over = (shown.groupby(["set", "source_eps"], sort=False)
            .agg(n=("seed", "size"), **{c: (c, "mean") for c in keep}, acc_xy_mean=("acc_xy_%", "mean"),
                 acc_xy_std=("acc_xy_%", "std"), acc_xy1_mean=("acc_xy+1_%", "mean")).reset_index())
    text += "\n\nPer source and set (means over source seeds and students; std over every student):\n\n"
    text += over.to_markdown(index=False, floatfmt=".1f")
    matched, low = fooling_matched(df, min_fooled)
    if low:
        rates = ", ".join(f"eps {e:g}: {r:.1f}%" for e, r in low.items())
        text += (f"\n\nFooling-matched (every source's det fooled on >= {100 * min_fooled:g}% of its t != y rows at "
                 f"the one radius): {'yes' if matched else 'no'} (lowest per source: {rates}).")
    lines = []
    for kind in dict.fromkeys(df["set"]):
        for col, what in (("acc_xy_%", "(X, Y)"), ("acc_xy+1_%", "(X, Y+1)")):
            sl = slopes_over_sources(df, kind, col)
            lo, hi = t_interval(sl)
            lines.append({"set": kind, "accuracy": what, "n_sources": int(sl.count()), "slope_per_eps": sl.mean(),
                          "ci95_lo": lo, "ci95_hi": hi})
        rise = probe_rise(df, kind)
        if rise is not None:
            lines[-1]["probe_rise_pts"] = lines[-2]["probe_rise_pts"] = rise
    text += ("\n\nSlope of the students' accuracy on source eps (per source seed, then mean and 95% t-interval over "
             "source seeds); probe_rise_pts: how much more the most robust source's set transfers to the robust "
             "probe than the standard source's:\n\n")
    return text + pd.DataFrame(lines).to_markdown(index=False, floatfmt=".1f")


def _robust_datasets_ends(store: Any, info: Any) -> dict[str, float]:
    """D_NR's and D_R's students' mean clean accuracy when the store holds robust-datasets' stages
    for this run's config (its robust_datasets section included); else nothing."""
    try:
        import yaml

        from advfeatures.config import resolve, upgrade
        from pipeline.experiments import get

        cfg = resolve(upgrade(yaml.safe_load(info.config_text)))  # a config recorded before a setting moved
        rd = get("robust-datasets").plan(cfg, info.of("dataset")[0]["config"]["source_sha256"])
        out = {}
        for name in ("D_NR", "D_R"):
            accs = [store.manifest("evals", rd.evals_of(n.key)[0].key)["metrics"]["acc_xy"]
                    for n in rd.find(role="student", set=name)]
            out[name] = 100 * sum(accs) / len(accs)
        return out
    except Exception:  # noqa: BLE001 - the marks are optional: absent when not computed
        return {}


def _over_source_seeds(g: Any, col: str) -> tuple[Any, Any]:
    """Per source eps, the mean of ``col`` and its std over source seeds (each seed's students
    averaged first; zeros with one source seed)."""
    per = g.groupby(["source_seed", "source_eps"] if "source_seed" in g else ["source_eps"])[col].mean()
    if "source_seed" not in g:
        return per, per * 0
    by = per.groupby(level="source_eps")
    return by.mean(), by.std().fillna(0)


def report(doc: Any, store: Any, info: Any, figs: Any) -> None:
    from pipeline.figures import CHANCE, plt, save

    df = info.table
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    for kind, g in df.groupby("set", sort=False):
        for col, marker, ls, what in (("acc_xy_%", "o", "-", "(X, Y)"), ("acc_xy+1_%", "s", ":", "(X, Y+1)")):
            m, sd = _over_source_seeds(g, col)
            ax.errorbar(m.index, m.values, yerr=sd.values, marker=marker, ls=ls, capsize=3, label=f"{kind} {what}")
        for col, marker, ls, what in (("transfer_%", "o", "-", "standard model"),
                                      ("probe_transfer_%", "^", "--", "robust probe")):
            if col in g:
                m, sd = _over_source_seeds(g, col)
                bx.errorbar(m.index, m.values, yerr=sd.values, marker=marker, ls=ls, capsize=3,
                            label=f"{kind} to the {what}")
    ends = _robust_datasets_ends(store, info)
    lo, hi = df["source_eps"].min(), df["source_eps"].max()
    for name, x in (("D_NR", lo), ("D_R", hi)):
        if name in ends:
            ax.scatter([x], [ends[name]], marker="*", s=120, color="k")
            ax.annotate(name, (x, ends[name]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.axhline(10, color=CHANCE, ls="--", lw=1)
    ax.set(xlabel="source's adversarial-training L2 eps", ylabel="students' clean accuracy %",
           title="what students learn across source robustness")
    bx.set(xlabel="source's adversarial-training L2 eps", ylabel="rows classified as their target %",
           title="the sets' transfer to independent models")
    for a in (ax, bx):
        a.legend(fontsize=7, frameon=False)
    doc.figure(save(fig, figs, "spectrum"), "Left: students' clean test accuracy on (X, Y) and (X, Y+1) against "
                                            "the robustness of the source their set was made with (bars: std over "
                                            "source seeds); stars: D_NR's and D_R's students (robust-datasets) when "
                                            "computed; dashed: chance. Right: the share of each set's rows that an "
                                            "independent standard model and the robust probe classify as the "
                                            "set's target. Sets that robust sources make and that fool the robust "
                                            "probe far more carry perceptible, robust features.")


EXPERIMENT = register(Experiment(
    name="spectrum",
    summary="sources adversarially trained at increasing L2 eps: their D_det/D_rand's fooling and transfer "
            "rates and what students learn, (X, Y) and (X, Y+1)",
    plan=plan, table=build_table, markdown=to_markdown, section=("spectrum", SpectrumConfig), report=report,
    varies_sources=True,
    probes=Probes({"spectrum": {"eps": [0.0, 0.1], "sets": ["det"]}})))  # 0.1: not the adversarial default, 0.5
