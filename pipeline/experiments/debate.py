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

Each line's reading (``pipeline.readings``, rules with known-answer tests): ``features``, ``bugs``,
``neither`` (the interval contains chance or its control, no trend, or both views predict it) or
``inconclusive: recipe too weak`` (the set did not produce the phenomenon the line tests). Only
features and bugs count for a side. With several source seeds (``source.seeds``) a line's interval
is over sources, and a set is compared with each control paired by source.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from advfeatures.config import ConfigError, ExperimentConfig, _check, _deep_merge, build_config
from pipeline.experiments import Experiment, Probes, get, register
from pipeline.plan import Plan

PARTS = ("replicate", "controls", "robust-datasets", "bugs-only", "transfer", "spectrum", "poison")
CONTROLS = {"rand": ("leak-rand", "rand-clean-only", "clean-rand"), "other": ("leak-other", "clean-other"),
            "det": ("leak-det", "clean-det")}


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
    if "n_sources" in s and math.isnan(s["within_std"]):  # one student per source: no spread within
        return (f"{s['mean']:.1f} ± {s['between_std']:.1f} over sources (n={s['n']}: {s['n_sources']} sources, one "
                f"student each) [{s['lo']:.1f}, {s['hi']:.1f}]")
    if "n_sources" in s:  # over sources x students
        return (f"{s['mean']:.1f} ± {s['between_std']:.1f} between / {s['within_std']:.1f} within sources "
                f"(n={s['n']}: {s['n_sources']} sources) [{s['lo']:.1f}, {s['hi']:.1f}]")
    sd = f" ± {s['std']:.1f}" if not math.isnan(s["std"]) else ""
    ci = f" [{s['lo']:.1f}, {s['hi']:.1f}]" if not math.isnan(s["lo"]) else ""
    return f"{s['mean']:.1f}{sd} (n={s['n']}){ci}"


def _line(experiment: str, what: str, ours: dict | None, control: str, reference: str, supports: str,
          why: str) -> dict[str, Any]:
    ours = ours or {}
    return {"experiment": experiment, "line": what, "ours_%": ours.get("mean", float("nan")),
            "ours_lo_%": ours.get("lo", float("nan")), "ours_hi_%": ours.get("hi", float("nan")), "ours": _fmt(ours), "control": control, "reference": reference, "supports": supports, "why": why}


def _students(df: Any, set_col: str, name: str, col: str, lo: str = "ci95_lo_%", hi: str = "ci95_hi_%") -> dict:
    """A set's students' ``col``: over sources x students (the interval over source means) when
    the table has several sources, else over seeds."""
    from pipeline.report import nested_stats, several_sources

    g = df[df[set_col] == name]
    if several_sources(df) and len(g):
        s = nested_stats(g, col)
        return {**s, "n": len(g), "lo": s["ci95_lo"], "hi": s["ci95_hi"], "std": s["between_std"]}
    return _stat(g[col], g[lo] if lo in g else None, g[hi] if hi in g else None)


def paired_difference(df: Any, a: str, b: str, col: str = "acc_xy_%") -> dict[str, float]:
    """Set ``a``'s ``col`` minus set ``b``'s, paired: per source (the mean over its students) when
    the table has several sources, else per student seed; mean and t-interval over the pairs."""
    import pandas as pd

    from pipeline.report import several_sources

    keys = ["source_seed"] if several_sources(df) else ["seed"]
    ga = df[df["set"] == a].groupby(keys)[col].mean()
    gb = df[df["set"] == b].groupby(keys)[col].mean()
    return _stat(pd.Series(ga - gb, dtype=float))


def _replicate_lines(name: str, df: Any, chance: float) -> list[dict[str, Any]]:
    """Table 1's sets (and, from controls, every control beside its set, each compared paired)."""
    from pipeline.readings import read_errors, read_set
    from pipeline.experiments.replicate import PAPER  # Ilyas et al. Table 1 (ResNet-50); Wallace

    out = []
    sets = list(dict.fromkeys(df["set"]))
    for kind in ("rand", "other", "det", "errors"):
        if kind not in sets:
            continue
        s = _students(df, "set", kind, "acc_xy_%")
        ctrl = {c: _students(df, "set", c, "acc_xy_%") for c in CONTROLS.get(kind, ()) if c in sets}
        control = "; ".join(f"{c} {v['mean']:.1f}" for c, v in ctrl.items()) or f"chance {chance:.0f}"
        ref = f"paper {PAPER[kind]}" if PAPER.get(kind) else ""
        if kind == "errors":
            side, why = read_errors(s, chance)
        else:
            diffs = {c: paired_difference(df, kind, c) for c in ctrl}
            xy1 = _students(df, "set", kind, "acc_xy+1_%", lo="", hi="") if kind == "det" else None
            if xy1 is not None:
                control += f"; (X, Y+1) {xy1['mean']:.1f}"
            side, why = read_set(kind, s, chance, diffs, xy1)
        out.append(_line(name, f"{kind} students, clean (X, Y)", s, control, ref, side, why))
    return out


def _robust_datasets_lines(name: str, df: Any, chance: float) -> list[dict[str, Any]]:
    from pipeline.experiments.robust_datasets import published_at, reading_radius
    from pipeline.readings import FEATURES, NEITHER, above, read_robust_gain

    out = []
    r0 = reading_radius(df)
    if r0 is None:
        return out
    nr, dr = (_students(df, "model", n, "acc_%") for n in ("D_NR", "D_R"))
    nr_r, dr_r = (_stat(df[df["model"] == n][r0]) for n in ("D_NR", "D_R"))
    side = FEATURES if above(nr, chance) else NEITHER
    out.append(_line(name, "D_NR students (non-robust features only), clean accuracy", nr,
                     f"robust accuracy at {r0.split('_')[1]}: {nr_r['mean']:.1f}", "paper 88 / 0; rebuild 84.4 / 0.0",
                     side, "Images carrying only the standard model's non-robust features teach clean accuracy "
                           "well above chance: such features are real and generalise." if side == FEATURES else
                           "D_NR's students are not above chance here: no evidence that non-robust features alone "
                           "teach."))
    others = {"D_NR": nr_r}
    standard = "D" if (df["model"] == "D").any() else "source"  # students of the clean images, else the source
    if (df["model"] == standard).any():
        others[f"{standard} (standard training)"] = _stat(df[df["model"] == standard][r0])
    side, why = read_robust_gain(dr_r, others)
    out.append(_line(name, f"D_R students, robust accuracy at L2 {r0.split('_')[1]}", dr_r,
                     "; ".join(f"{k} {v['mean']:.1f}" for k, v in others.items()) + f"; D_R clean {dr['mean']:.1f}",
                     published_at("D_R", r0), side, why))
    return out


def _bugs_only_lines(name: str, df: Any, chance: float) -> list[dict[str, Any]]:
    from pipeline.readings import read_bugs_only

    out = []
    if "bugs-only" not in set(df["set"]):
        return out
    b, b1 = _students(df, "set", "bugs-only", "acc_xy_%"), _stat(df[df["set"] == "bugs-only"]["acc_xy+1_%"])
    d = _students(df, "set", "det", "acc_xy_%")
    tr = float(df[df["set"] == "bugs-only"]["transfer_%"].iloc[0])
    side, why = read_bugs_only(b, b1, d, chance)
    out.append(_line(name, "bugs-only students, clean (X, Y)", b,
                     f"det of the same attack {d['mean']:.1f}; (X, Y+1) {b1['mean']:.1f}; transfer {tr:.1f}",
                     "Nakkiran 2.8 (X, Y+1 70.8); det 33.2", side, why))
    return out


def _transfer_lines(name: str, df: Any, chance: float) -> list[dict[str, Any]]:
    import numpy as np

    from pipeline.experiments.transfer import summarise
    from pipeline.readings import correlation_interval, read_correlation

    s = summarise(df)
    det = s[s["set"] == "det"]
    if len(det) < 2:
        return []
    r = float(np.corrcoef(det["transfer"], det["acc_xy_mean"])[0, 1])
    lo, hi = correlation_interval(r, len(det))
    side, why = read_correlation(r, len(det))
    return [_line(name, f"det: correlation of transfer with students' (X, Y) over {len(det)} architectures",
                  {"mean": 100 * r, "std": float("nan"), "n": len(det), "lo": 100 * lo, "hi": 100 * hi},
                  f"bugs-only transfer {s[s['set'] == 'bugs-only']['transfer'].mean():.1f}"
                  if (s["set"] == "bugs-only").any() else "", "paper: rise together", side, why + " (r shown x100)")]


def _spectrum_lines(name: str, df: Any, chance: float) -> list[dict[str, Any]]:
    """One line per set: its students' (X, Y) against source eps, read by ``read_spectrum`` (the
    slope's interval over source seeds; only fooling-matched; beside the robust probe). A table
    of before the probe and the rule (no ``probe_transfer_%``) is read by the trend alone."""
    from pipeline.experiments.spectrum import fooling_matched, probe_rise, slopes_over_sources
    from pipeline.readings import above, read_spectrum, read_trend

    out = []
    matched, low = fooling_matched(df)
    for kind in dict.fromkeys(df["set"]):
        g = df[df["set"] == kind]
        by = g.groupby("source_eps")["acc_xy_%"].mean()
        lo_eps, hi_eps = by.index.min(), by.index.max()
        at = {e: _students(g, "source_eps", e, "acc_xy_%") for e in by.index}
        short = [e for e, st in at.items() if not above(st, chance)]
        at_chance = ", ".join(f"source eps {e:g} [{at[e]['lo']:.1f}, {at[e]['hi']:.1f}]" for e in short)
        slopes = _stat(slopes_over_sources(df, kind))
        what = f"{kind} students' (X, Y) from source eps {lo_eps:g} to {hi_eps:g} ({by.iloc[0]:.1f} -> {by.iloc[-1]:.1f})"
        rise = probe_rise(df, kind)
        side, why = (read_spectrum(slopes, not short, what, matched, rise, at_chance) if "probe_transfer_%" in df
                     else read_trend(slopes, not short, what, at_chance))
        control = f"at eps {lo_eps:g}: {at[lo_eps]['mean']:.1f}"
        if rise is not None:
            control += f"; probe transfer rise {rise:+.1f}"
        if low:
            control += f"; det fooled >= {min(low.values()):.0f}%"
        out.append(_line(name, f"{kind} students, clean (X, Y), source eps {lo_eps:g} -> {hi_eps:g}", at[hi_eps],
                         control, "unpublished", side, why))
    return out


def _poison_lines(name: str, df: Any, chance: float) -> list[dict[str, Any]]:
    """One line per poison recipe: its students' clean (X, Y), read from the drop against the clean
    students of the same rows (paired) and the poisoned students' (X, Y-1)."""
    from pipeline.experiments.poison import RECIPES
    from pipeline.readings import read_poison

    out = []
    for recipe, (poisoned, clean) in RECIPES.items():
        if poisoned not in set(df["set"]):
            continue
        p, shifted = _students(df, "set", poisoned, "acc_xy_%"), _stat(df[df["set"] == poisoned]["acc_xy-1_%"])
        drop = paired_difference(df, poisoned, clean) if clean in set(df["set"]) else {}
        side, why = read_poison(drop, shifted, chance, fowl=recipe == "fowl")
        peak = df[df["set"] == poisoned]["peak_acc_xy_%"].mean() if "peak_acc_xy_%" in df else float("nan")
        what = ("Fowl's poison (class-targeted L-inf, every image, true labels), clean (X, Y)" if recipe == "fowl"
                else "det's perturbations with true labels (not Fowl's recipe), clean (X, Y)")
        control = (f"same rows unperturbed {_students(df, 'set', clean, 'acc_xy_%')['mean']:.1f}; "
                   if clean in set(df["set"]) else "") + f"peak {peak:.1f}; (X, Y-1) {shifted['mean']:.1f}"
        out.append(_line(name, what, p, control, "Fowl et al. 2021 (their recipe: near chance)", side, why))
    return out


LINES = {"replicate": _replicate_lines, "controls": _replicate_lines, "robust-datasets": _robust_datasets_lines,
         "bugs-only": _bugs_only_lines, "transfer": _transfer_lines, "spectrum": _spectrum_lines,
         "poison": _poison_lines}


def evidence(store: Any, runs: dict[str, Any]) -> Any:
    """The debate's table from each experiment's run folder: ``runs`` name -> run folder. When
    controls is part of the debate its lines (Table 1 with the controls beside) replace
    replicate's."""
    from pipeline.report import read_table

    return evidence_of({name: (read_table(folder), folder.name) for name, folder in runs.items()})


def evidence_of(tables: dict[str, Any]) -> Any:
    """The debate's table from each experiment's table: ``tables`` name -> (table, run key)."""
    import pandas as pd

    rows = []
    for name, (df, run_key) in tables.items():
        if name == "replicate" and "controls" in tables or name not in LINES:
            continue
        chance = float(df["chance_%"].iloc[0]) if "chance_%" in df else 10.0
        rows += [{**r, "run_key": run_key} for r in LINES[name](name, df, chance)]
    return pd.DataFrame(rows, columns=["experiment", "line", "ours_%", "ours_lo_%", "ours_hi_%", "ours", "control",
                                       "reference", "supports", "why", "run_key"])


def to_markdown(df: Any) -> str:
    shown = df.drop(columns=[c for c in df.columns if c.endswith("_key") or c.startswith("ours_")])
    text = shown.to_markdown(index=False)
    from pipeline.readings import READINGS, SIDES

    counts = df["supports"].value_counts()
    text += ("\n\nReadings: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in READINGS) + ". Only "
             + " and ".join(SIDES) + " count for a side.")
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


COLORS = {"features": "#2a7", "bugs": "#b33", "neither": "#888", "inconclusive: recipe too weak": "#c80"}


def debate_figure(df: Any) -> Any:
    """Every line of the table, each with its interval, coloured by reading."""
    import math

    from pipeline import figures as F

    fig, ax = F.plt.subplots(figsize=(7.5, 0.45 * len(df) + 1.4))
    y, left = list(range(len(df)))[::-1], -5.0
    for yi, (_, r) in zip(y, df.iterrows()):
        color = COLORS.get(r["supports"], "#888")
        lo, hi = r.get("ours_lo_%", float("nan")), r.get("ours_hi_%", float("nan"))  # tables before them: none
        if not (math.isnan(lo) or math.isnan(hi)):
            left = min(left, lo - 5)
            ax.plot([lo, hi], [yi, yi], color=color, lw=2, alpha=0.6)
        ax.scatter([r["ours_%"]], [yi], color=color, s=30, zorder=3)
    ax.set_yticks(y, [f"{e}: {ln}"[:72] for e, ln in zip(df["experiment"], df["line"])], fontsize=7)
    ax.axvline(10, color=F.CHANCE, ls="--", lw=1)
    for side, c in COLORS.items():
        ax.scatter([], [], color=c, label=side)
    ax.set(xlabel="ours: clean (or robust) test accuracy %; r x 100 for the correlation", xlim=(left, 103),
           title="the debate: every line, its interval and its reading")
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def report(doc: Any, store: Any, info: Any, figs: Any) -> None:
    """Each experiment's own section of the report (its table and figure), after the evidence."""
    from pipeline import figures as F
    from pipeline import report_data as D

    doc.figure(F.save(debate_figure(info.table), figs, "debate"),
               "Every line of the debate's table: our number with its 95% interval, coloured by its reading (decided "
               "from the interval against chance and each control). The correlation line is r x 100. Dashed: chance.")
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
    plan=plan, section=("debate", DebateConfig), report=report,
    probes=Probes(mappings=({"replicate": {"attack": {"steps": 3}}},), alone=True)))


def reread(parts: dict[str, Any], out: Any) -> Any:
    """Read the debate again from committed tables (``parts``: experiment -> "table.csv" or
    "table.csv:RUN_KEY", the run that wrote it), with the rules of ``pipeline.readings``: writes
    table.csv, table.md and debate.png into ``out``.

        python benchmarks/reread_debate.py OUT NAME=TABLE.csv[:RUN_KEY] ...
    """
    from pathlib import Path

    import pandas as pd

    from pipeline import figures as F

    out = Path(out)
    split = {name: (spec.split(":", 1) + [Path(spec).parent.name])[:2] for name, spec in parts.items()}
    df = evidence_of({name: (pd.read_csv(path), key) for name, (path, key) in split.items()})
    df.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(to_markdown(df) + "\n")
    fig = debate_figure(df)
    fig.savefig(out / "debate.png", dpi=110, bbox_inches="tight")
    F.plt.close(fig)
    return df
