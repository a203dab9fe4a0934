"""debate: the whole argument from one command.

The plan is the union of the plans of ``debate.experiments`` (by default replicate, controls,
robust-datasets, bugs-only, transfer, spectrum and poison), each planned from the same resolved
config, optionally with its own ``debate.overrides.<experiment>`` merged over it (Nakkiran's attack
for bugs-only, say). A stage two plans share (the dataset, the source, a PGD set) has one key and
is computed once. Each experiment writes its own run folder, the same one it writes when run
alone; the debate's table then sets the evidence side by side: one line per headline number,
beside its control and its published reference, with the side of "features or bugs" it supports
and why, in one sentence, decided from the numbers (95% intervals, not point values).

    debate.experiments   the experiments whose plans are joined (default: all seven)
    debate.overrides     per experiment, settings merged over the debate's resolved config, in the
                         profile's shape: {bugs-only: {attack: {eps: 2.5}}}. Merged over the
                         resolved config, so overriding source does not change the students.

The sides: ``features`` (the line shows what the features view predicts and the bugs view does
not: perturbations that teach the true labels beyond their control), ``bugs`` (what the bugs view
predicts: examples that fool without teaching), ``caveat`` (a result that weakens the inference
either way, as Wallace's errors set), ``neither`` (the interval does not decide).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from advfeatures.config import ConfigError, ExperimentConfig, _check, _deep_merge, build_config
from pipeline.experiments import Experiment, get, register
from pipeline.plan import Plan

PARTS = ("replicate", "controls", "robust-datasets", "bugs-only", "transfer", "spectrum", "poison")
CONTROLS = {"rand": ("leak-rand", "rand-clean-only"), "other": ("leak-other",), "det": ("leak-det",)}


@dataclass(frozen=True)
class DebateConfig:
    experiments: tuple[str, ...] = PARTS
    """The experiments whose plans are joined (their order is the table's)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Per experiment, settings merged over the debate's resolved config (the profile's shape)."""

    def __post_init__(self):
        _check(len(self.experiments) >= 1, "debate.experiments needs at least one experiment")
        _check(len(set(self.experiments)) == len(self.experiments),
               f"debate.experiments has repeats: {list(self.experiments)}")
        _check("debate" not in self.experiments, "debate.experiments cannot hold debate itself")
        for name, over in self.overrides.items():
            _check(name in self.experiments, f"debate.overrides.{name}: {name!r} is not in debate.experiments "
                                              f"{list(self.experiments)}")
            _check(isinstance(over, dict), f"debate.overrides.{name} must be a mapping of settings, e.g. "
                                           "{attack: {eps: 2.5}}")


def part_config(cfg: ExperimentConfig, name: str) -> ExperimentConfig:
    """The config experiment ``name`` is planned with: the debate's, with its overrides merged."""
    over = cfg.debate.overrides.get(name)
    if not over:
        return cfg
    merged = _deep_merge(cfg.to_dict(), copy.deepcopy(over))
    try:
        return build_config(ExperimentConfig, merged, "")
    except ConfigError as e:
        raise ConfigError(f"debate.overrides.{name}: {e}") from None


def parts(cfg: ExperimentConfig, source_sha256: str) -> list[tuple[str, ExperimentConfig, Plan]]:
    """(name, config, plan) of every experiment of the debate, in ``debate.experiments`` order;
    an unknown name or a bad override fails here, before any stage runs."""
    out = []
    for name in cfg.debate.experiments:
        exp = get(name)  # ConfigError naming the known experiments
        sub = part_config(cfg, name)
        out.append((name, sub, exp.plan_of(sub, source_sha256)))
    return out


def plan(cfg: ExperimentConfig, source_sha256: str) -> Plan:
    union = Plan()
    for _name, _sub, p in parts(cfg, source_sha256):
        union = union | p
    return union.with_run(cfg.name)


# ---------------------------------------------------------------------------------------------
# The evidence: one line per headline number


def _stat(values: Any, lo: Any = None, hi: Any = None) -> dict[str, float]:
    """mean, std, n and a 95% interval: over seeds (t) from n >= 2; for one model, its own
    binomial interval on the test set (``lo``/``hi``), if given."""
    from pipeline.report import t_interval

    v = values.dropna()
    n = int(v.count())
    mean = float(v.mean()) if n else float("nan")
    if n >= 2:
        low, high = t_interval(v)
    elif n == 1 and lo is not None and hi is not None:
        low, high = float(lo.dropna().iloc[0]), float(hi.dropna().iloc[0])
    else:
        low = high = float("nan")
    return {"mean": mean, "std": float(v.std()) if n >= 2 else float("nan"), "n": n, "lo": low, "hi": high}


def _fmt(s: dict[str, float] | None) -> str:
    if not s or math.isnan(s["mean"]):
        return ""
    sd = f" ± {s['std']:.1f}" if not math.isnan(s["std"]) else ""
    ci = f" [{s['lo']:.1f}, {s['hi']:.1f}]" if not math.isnan(s["lo"]) else ""
    return f"{s['mean']:.1f}{sd} (n={s['n']}){ci}"


def _line(experiment: str, what: str, ours: dict | None, control: str, reference: str, supports: str,
          why: str) -> dict[str, Any]:
    return {"experiment": experiment, "line": what, "ours_%": (ours or {}).get("mean", float("nan")),
            "ours": _fmt(ours), "control": control, "reference": reference, "supports": supports, "why": why}


def _students(df: Any, set_col: str, name: str, col: str, lo: str = "ci95_lo_%", hi: str = "ci95_hi_%") -> dict:
    g = df[df[set_col] == name]
    return _stat(g[col], g[lo] if lo in g else None, g[hi] if hi in g else None)


def _replicate_lines(name: str, df: Any, chance: float) -> list[dict[str, Any]]:
    """Table 1's sets (and, from controls, their leak controls beside them)."""
    from pipeline.report import PAPER  # Ilyas et al. Table 1 (ResNet-50); Wallace

    out = []
    sets = list(dict.fromkeys(df["set"]))
    for kind in ("rand", "other", "det", "errors"):
        if kind not in sets:
            continue
        s = _students(df, "set", kind, "acc_xy_%")
        ctrl = {c: _students(df, "set", c, "acc_xy_%") for c in CONTROLS.get(kind, ()) if c in sets}
        bar = max([chance, *(c["mean"] for c in ctrl.values())])
        control = "; ".join(f"{c} {v['mean']:.1f}" for c, v in ctrl.items()) or f"chance {chance:.0f}"
        ref = f"paper {PAPER[kind]}" if PAPER.get(kind) else ""
        if kind == "errors":
            side, why = (("caveat", "Students of a teacher's errors (no perturbation at all) learn the true labels: "
                                    "a mislabelled set teaches through the teacher's function (Wallace), so learning "
                                    "from mislabelled sets is not by itself proof of non-robust features.")
                         if s["lo"] > chance else
                         ("neither", "The errors set's students are not above chance here: Wallace's alternative "
                                     "explanation is neither shown nor ruled out."))
        elif s["lo"] > bar:
            side = "features"
            why = (f"{kind}'s labels are {'random' if kind == 'rand' else 'wrong'} for the image, yet its students "
                   f"beat chance{' and every control' if ctrl else ''} on the true labels of clean images: the "
                   "perturbations carry features of their target class that generalise.")
        elif s["lo"] > chance:
            side, why = "neither", (f"{kind}'s students beat chance but not their control ({control}): what they "
                                    "learn is not shown to come from the source's perturbations.")
        else:
            side, why = "bugs", (f"{kind}'s students do not beat chance on clean images: here the perturbations "
                                 "did not teach, as the bugs view predicts.")
        out.append(_line(name, f"{kind} students, clean (X, Y)", s, control, ref, side, why))
    return out


def _robust_datasets_lines(name: str, df: Any, chance: float) -> list[dict[str, Any]]:
    out = []
    robust = sorted((c for c in df.columns if c.startswith("robust_")), key=lambda c: float(c.split("_")[1]))
    if not robust:
        return out
    r0 = robust[0]
    nr, dr = (_students(df, "model", n, "acc_%") for n in ("D_NR", "D_R"))
    nr_r, dr_r = (_stat(df[df["model"] == n][r0]) for n in ("D_NR", "D_R"))
    side = "features" if nr["lo"] > chance else "neither"
    out.append(_line(name, "D_NR students (non-robust features only), clean accuracy", nr,
                     f"robust accuracy at {r0.split('_')[1]}: {nr_r['mean']:.1f}", "paper 88 / 0; rebuild 84.4 / 0.0",
                     side, "Images carrying only the standard model's non-robust features teach clean accuracy "
                           "well above chance: such features are real and generalise." if side == "features" else
                           "D_NR's students are not above chance here: no evidence that non-robust features alone "
                           "teach."))
    more = dr_r["lo"] > nr_r["hi"] if dr_r["n"] >= 2 and nr_r["n"] >= 2 else dr_r["mean"] > nr_r["mean"] + 5
    out.append(_line(name, f"D_R students, robust accuracy at L2 {r0.split('_')[1]}", dr_r,
                     f"D_NR {nr_r['mean']:.1f}; D_R clean {dr['mean']:.1f}", "paper 48; rebuild 49.9",
                     "features" if more else "neither",
                     "Standard training on D_R (the robust model's features only) gives robustness that D_NR "
                     "does not: robustness is a property of the data's features." if more else
                     "D_R's students are not clearly more robust than D_NR's here."))
    return out


def _bugs_only_lines(name: str, df: Any, chance: float) -> list[dict[str, Any]]:
    out = []
    if "bugs-only" not in set(df["set"]):
        return out
    b, b1 = _students(df, "set", "bugs-only", "acc_xy_%"), _stat(df[df["set"] == "bugs-only"]["acc_xy+1_%"])
    d = _students(df, "set", "det", "acc_xy_%")
    tr = float(df[df["set"] == "bugs-only"]["transfer_%"].iloc[0])
    bugs = b["hi"] <= chance + 2 and b1["mean"] > 2 * chance
    out.append(_line(name, "bugs-only students, clean (X, Y)", b,
                     f"det of the same attack {d['mean']:.1f}; transfer {tr:.1f}",
                     "Nakkiran 2.8 (X, Y+1 70.8); det 33.2", "bugs" if bugs else "neither",
                     (f"Examples made to fool only the source (transfer {tr:.1f}%) teach nothing of the true "
                      f"labels (their students learn (X, Y+1): {b1['mean']:.1f}%): some adversarial examples are "
                      "only bugs, so fooling alone does not make an example a feature.") if bugs else
                     "The bugs-only students are not clearly at or below chance here."))
    return out


def _transfer_lines(name: str, df: Any, chance: float) -> list[dict[str, Any]]:
    import numpy as np

    from pipeline.experiments.transfer import summarise

    s = summarise(df)
    det = s[s["set"] == "det"]
    if len(det) < 3:
        return []
    r = float(np.corrcoef(det["transfer"], det["acc_xy_mean"])[0, 1])
    side = "features" if r >= 0.5 else "neither"
    return [_line(name, f"det: correlation of transfer with students' (X, Y) over {len(det)} architectures",
                  {"mean": 100 * r, "std": float("nan"), "n": len(det), "lo": float("nan"), "hi": float("nan")},
                  f"bugs-only transfer {s[s['set'] == 'bugs-only']['transfer'].mean():.1f}"
                  if (s["set"] == "bugs-only").any() else "", "paper: rise together",
                  side, (f"Pearson r = {r:.2f} (shown x100): the architectures its examples fool more also learn "
                         "more from them; what transfers is what teaches, as the features view predicts.")
                  if side == "features" else f"Pearson r = {r:.2f} (shown x100): no clear rise together here.")]


def _spectrum_lines(name: str, df: Any, chance: float) -> list[dict[str, Any]]:
    out = []
    for kind in dict.fromkeys(df["set"]):
        g = df[df["set"] == kind]
        by = g.groupby("source_eps")["acc_xy_%"].mean()
        lo_eps, hi_eps = by.index.min(), by.index.max()
        at = {e: _students(g, "source_eps", e, "acc_xy_%") for e in by.index}
        ends = {e: at[e] for e in (lo_eps, hi_eps)}
        every = all(st["lo"] > chance for st in at.values())
        trend = "rises" if by.iloc[-1] > by.iloc[0] + 2 else "falls" if by.iloc[-1] < by.iloc[0] - 2 else "stays level"
        out.append(_line(name, f"{kind} students, clean (X, Y), source eps {lo_eps:g} -> {hi_eps:g}", ends[hi_eps],
                         f"at eps {lo_eps:g}: {ends[lo_eps]['mean']:.1f}", "unpublished",
                         "features" if every else "neither",
                         f"Across source robustness the students' accuracy {trend} "
                         f"({by.iloc[0]:.1f} -> {by.iloc[-1]:.1f}); "
                         + ("every source's examples teach above chance." if every else
                            "not every source's examples teach above chance.")))
    return out


def _poison_lines(name: str, df: Any, chance: float) -> list[dict[str, Any]]:
    from pipeline.experiments.poison import CLEAN, KIND

    if KIND not in set(df["set"]):
        return []
    p, shifted = _students(df, "set", KIND, "acc_xy_%"), _stat(df[df["set"] == KIND]["acc_xy-1_%"])
    c = _students(df, "set", CLEAN, "acc_xy_%") if CLEAN in set(df["set"]) else None
    works = c is not None and p["hi"] < c["lo"] and shifted["mean"] > chance
    return [_line(name, "poison students (correct labels, det's perturbations), clean (X, Y)", p,
                  f"same rows unperturbed {c['mean']:.1f}; (X, Y-1) {shifted['mean']:.1f}" if c else "",
                  "Fowl et al. 2021: strong poison", "features" if works else "neither",
                  "Correctly labelled images carrying another class's perturbation teach that class: the "
                  "perturbation's features outweigh the true label." if works else
                  "The poison does not clearly lower accuracy below its clean control here.")]


LINES = {"replicate": _replicate_lines, "controls": _replicate_lines, "robust-datasets": _robust_datasets_lines,
         "bugs-only": _bugs_only_lines, "transfer": _transfer_lines, "spectrum": _spectrum_lines,
         "poison": _poison_lines}


def evidence(store: Any, runs: dict[str, Any]) -> Any:
    """The debate's table from each experiment's run folder: ``runs`` name -> run folder. When
    controls is part of the debate its lines (Table 1 with the controls beside) replace
    replicate's."""
    import pandas as pd

    from pipeline.report import read_table

    rows = []
    for name, folder in runs.items():
        if name == "replicate" and "controls" in runs or name not in LINES:
            continue
        df = read_table(folder)
        chance = float(df["chance_%"].iloc[0]) if "chance_%" in df else 10.0
        rows += [{**r, "run_key": folder.name} for r in LINES[name](name, df, chance)]
    return pd.DataFrame(rows, columns=["experiment", "line", "ours_%", "ours", "control", "reference", "supports",
                                       "why", "run_key"])


def to_markdown(df: Any) -> str:
    shown = df.drop(columns=[c for c in df.columns if c.endswith("_key")] + ["ours_%"])
    text = shown.to_markdown(index=False)
    counts = df["supports"].value_counts()
    text += "\n\nLines by side: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + "."
    return text + ("\n\nours: mean ± std over seeds (n) and the 95% interval (t over seeds from n >= 2; one "
                   "model's binomial interval on the clean test set otherwise), clean test accuracy in % unless the "
                   "line says otherwise. Every experiment's own table is in its run folder (run_key).")


@dataclass(frozen=True)
class Debate(Experiment):
    def write(self, store: Any, plan: Any, cfg: ExperimentConfig) -> Any:
        """Every experiment's own run folder (as when it runs alone), then the debate's table."""
        from pipeline import report

        sha = plan.dataset.config["source_sha256"]
        runs = {name: get(name).write(store, p, sub) for name, sub, p in parts(cfg, sha)}
        return report.write_run(store, plan, cfg, build=lambda st, _plan: evidence(st, runs), markdown=to_markdown,
                                 experiment=self.name)


def report(doc: Any, store: Any, info: Any, figs: Any) -> None:
    """Each experiment's own section of the report (its table and figure), after the evidence."""
    from pipeline import figures as F
    from pipeline import report_data as D

    df = info.table[~info.table["line"].str.contains("correlation")]  # the figure's axis is accuracy in %
    colors = {"features": "#2a7", "bugs": "#b33", "caveat": "#c80", "neither": "#888"}
    fig, ax = F.plt.subplots(figsize=(7, 0.45 * len(df) + 1.2))
    y = list(range(len(df)))[::-1]
    ax.scatter(df["ours_%"], y, c=[colors.get(s, "#888") for s in df["supports"]], s=30, zorder=3)
    ax.set_yticks(y, [f"{e}: {ln}"[:70] for e, ln in zip(df["experiment"], df["line"])], fontsize=7)
    ax.axvline(10, color=F.CHANCE, ls="--", lw=1)
    for side, c in colors.items():
        ax.scatter([], [], c=c, label=side)
    ax.set(xlabel="ours: clean (or robust) test accuracy %", xlim=(0, 100), title="the debate: every headline and its side")
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    doc.figure(F.save(fig, figs, "debate"), "Every accuracy line of the debate's table: our number, coloured by the "
                                           "side it supports (decided from its 95% interval against its control and "
                                           "chance). Dashed: chance.")
    for name, key in dict.fromkeys(zip(info.table["experiment"], info.table["run_key"])):
        folder = store.path("runs", key)
        if not store.is_complete("runs", key):
            continue
        part = D.load_run(store, folder)
        doc.h2(f"{name} (run {key})")
        doc.table(part.table.drop(columns=[c for c in part.table.columns if c.endswith("_key")]), summary=name)
        own = get(name).report
        if own is not None:
            own(doc, store, part, figs)
        elif {"acc_xy_%", "paper_%"} <= set(part.table.columns):  # Table 1 (replicate, controls)
            doc.figure(F.save(F.table1_bars(part.table), figs, f"table1_{name}"),
                       "Clean test accuracy per set beside the published numbers; dashed: chance.")


EXPERIMENT = register(Debate(
    name="debate",
    summary="the union of replicate, controls, robust-datasets, bugs-only, transfer, spectrum and poison: shared "
            "stages once, one table of every headline beside its control and reference, and the side it supports",
    plan=plan, section=("debate", DebateConfig), report=report))
