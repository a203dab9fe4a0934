"""What a line of the debate shows: its reading, decided from intervals by rules with known-answer
tests (tests/test_readings.py), never from point values alone.

Four readings; only the first two count for a side:

- ``features``: what the features view predicts and the bugs view does not (perturbations that teach
  the true labels of clean images beyond chance and beyond their strongest control);
- ``bugs``: what the bugs view predicts and the features view does not (examples that fool the
  source and teach nothing of the true labels, where the same recipe's plain examples do teach);
- ``neither``: the interval contains chance or its control, there is no trend, or both views
  predict the result;
- ``inconclusive: recipe too weak``: the set did not produce the phenomenon the line tests, e.g.
  its students learned the relabelling from robust features ((X, Y) at or below chance while
  (X, Y+1) is high). A set too small or an attack too weak to carry non-robust features gives
  exactly that, so it says nothing of either view.

A statistic is a dict with ``mean``, ``lo``, ``hi`` (its 95% interval) and ``n``.
"""

from __future__ import annotations

import math
from typing import Any

FEATURES, BUGS, NEITHER, WEAK = "features", "bugs", "neither", "inconclusive: recipe too weak"
READINGS = (FEATURES, BUGS, NEITHER, WEAK)
SIDES = (FEATURES, BUGS)
"""The readings that count as evidence for a side."""
MIN_ARCHS = 5
"""The fewest architectures whose correlation of transfer with students' accuracy is read."""

Stat = dict[str, float]


def has_interval(s: Stat | None) -> bool:
    return bool(s) and not (math.isnan(s["lo"]) or math.isnan(s["hi"]))


def above(s: Stat, x: float) -> bool:
    """The interval lies wholly above ``x``."""
    return has_interval(s) and s["lo"] > x


def below(s: Stat, x: float) -> bool:
    """The interval lies wholly below ``x``."""
    return has_interval(s) and s["hi"] < x


def fmt_stat(s: Stat) -> str:
    ci = f" [{s['lo']:.1f}, {s['hi']:.1f}]" if has_interval(s) else " (no interval)"
    return f"{s['mean']:+.1f}{ci}"


def read_set(kind: str, xy: Stat, chance: float, diffs: dict[str, Stat] | None = None,
             xy1: Stat | None = None) -> tuple[str, str]:
    """A constructed set of section 3.2 (labels wrong for the image): (reading, why).

    ``xy``: its students' clean (X, Y) accuracy; ``diffs``: for each control, the set's accuracy
    minus the control's, paired (by source, or by student seed with one source); ``xy1``: (X, Y+1).
    features: (X, Y) above chance and above every control (each difference's interval above 0).
    inconclusive: (X, Y) wholly below chance (the students learned robust features that point away
    from y), or not above chance while (X, Y+1) is above it (they learned the relabelling).
    neither: otherwise (the interval contains chance, or a control reaches the set)."""
    diffs = diffs or {}
    if not has_interval(xy):
        return NEITHER, f"{kind}: one model and no interval; nothing is decided."
    learned_shift = xy1 is not None and above(xy1, chance)
    if below(xy, chance) or (not above(xy, chance) and learned_shift):
        how = f"(X, Y+1) {xy1['mean']:.1f}" if learned_shift else f"(X, Y) below chance ({xy['mean']:.1f})"
        return WEAK, (f"{kind}'s students did not learn the true labels ({how}): they learned the relabelling from "
                      "robust features, which a set too small or an attack too weak to carry non-robust features "
                      "gives under either view.")
    if not above(xy, chance):
        return NEITHER, f"{kind}'s students' interval contains chance: nothing is shown."
    failed = {c: d for c, d in diffs.items() if not above(d, 0.0)}
    if failed:
        said = "; ".join(f"{kind} - {c} = {fmt_stat(d)}" for c, d in failed.items())
        return NEITHER, (f"{kind}'s students beat chance but not every control ({said}): what they learn is not "
                         "shown to come from the source's perturbations.")
    beyond = "; ".join(f"{kind} - {c} = {fmt_stat(d)}" for c, d in diffs.items())
    labels = ("rand's labels are drawn at random (right only for the ~1/C of rows with t = y)" if kind == "rand"
              else f"{kind}'s labels are wrong for every image")
    return FEATURES, (f"{labels}, yet its students beat chance"
                      + (f" and every control ({beyond})" if diffs else " (no control in this run)")
                      + " on the true labels of clean images: the perturbations carry features of their target "
                        "class that generalise.")


def read_errors(xy: Stat, chance: float) -> tuple[str, str]:
    """Wallace's errors set: students of a teacher's mistakes on unmodified images. Both views
    predict that they learn (a distillation of the teacher's function), so it never counts for a
    side; it is the caveat that learning from mislabelled sets is not by itself proof."""
    if above(xy, chance):
        return NEITHER, ("Students of a teacher's errors (no perturbation) learn the true labels: a mislabelled set "
                         "teaches through the teacher's function (Wallace). Both views predict it; it is the caveat "
                         "that learning from mislabelled sets is not by itself proof of non-robust features.")
    return WEAK, "The errors set's students are not above chance: the recipe did not reproduce Wallace's result."


def read_bugs_only(xy: Stat, xy1: Stat, det_same_attack: Stat, chance: float) -> tuple[str, str]:
    """Nakkiran's bugs-only examples (they fool the source, the ensemble keeps y). bugs: their
    students are not above chance on (X, Y) and learned the relabelling ((X, Y+1) above chance),
    while the plain det set of the same attack does teach (X, Y). If that det does not teach
    either, the recipe is too weak to tell."""
    if not above(det_same_attack, chance):
        return WEAK, ("The det set of the same attack does not teach (X, Y) above chance either: this recipe cannot "
                      "tell bugs-only examples from plain ones.")
    if not above(xy, chance) and above(xy1, chance):
        return BUGS, (f"Examples made to fool only the source teach nothing of the true labels (their students learn "
                      f"(X, Y+1): {xy1['mean']:.1f}%) while plain det examples of the same attack do "
                      f"({det_same_attack['mean']:.1f}%): some adversarial examples are only bugs.")
    return NEITHER, "The bugs-only students are not clearly at chance with the relabelling learned here."


def slope(xs: Any, ys: Any) -> float:
    """The least-squares slope of ys on xs."""
    import numpy as np

    x, y = np.asarray(xs, float), np.asarray(ys, float)
    if len(x) < 2 or np.ptp(x) == 0:
        return float("nan")
    return float(np.polyfit(x, y, 1)[0])


def read_trend(slopes: Stat, every_above_chance: bool, what: str, at_chance: str = "") -> tuple[str, str]:
    """A spectrum line: students' accuracy against source robustness. ``slopes``: the slope's
    mean and its interval over source seeds. features: a trend (the interval excludes 0) with every
    point's students above chance; neither: one source seed (no interval), no trend, or a point at
    chance (``at_chance`` says which, e.g. "source eps 0.1 [9.0, 53.7]")."""
    if not has_interval(slopes):
        return NEITHER, (f"{what}: slope {slopes['mean']:+.1f} per unit eps from {slopes['n']} source seed(s): no "
                         "interval over sources, so no trend is shown.")
    trend = slopes["lo"] > 0 or slopes["hi"] < 0
    if not trend:
        return NEITHER, f"{what}: slope {fmt_stat(slopes)} per unit eps over {slopes['n']} sources: no trend."
    if not every_above_chance:
        where = f" (at {at_chance}, its interval over sources reaches chance)" if at_chance else ""
        return NEITHER, (f"{what}: slope {fmt_stat(slopes)}, but not every source's examples are shown to teach "
                         f"above chance{where}.")
    return FEATURES, (f"{what}: slope {fmt_stat(slopes)} per unit eps over {slopes['n']} sources, every source's "
                      "examples teaching above chance.")


def correlation_interval(r: float, n: int) -> tuple[float, float]:
    """The 95% interval of a Pearson correlation over n points (Fisher's z); NaN for n < 4."""
    if n < 4 or math.isnan(r):
        return float("nan"), float("nan")
    z, half = math.atanh(max(min(r, 1 - 1e-12), -1 + 1e-12)), 1.959963984540054 / math.sqrt(n - 3)
    return math.tanh(z - half), math.tanh(z + half)


def read_correlation(r: float, n: int) -> tuple[str, str]:
    """Section 3.3: the correlation over architectures of transfer with students' accuracy.
    features: at least ``MIN_ARCHS`` architectures and r's interval above 0; neither otherwise."""
    lo, hi = correlation_interval(r, n)
    if n < MIN_ARCHS:
        return NEITHER, f"Pearson r = {r:.2f} over {n} architectures: fewer than {MIN_ARCHS}, too few to read."
    if lo > 0:
        return FEATURES, (f"Pearson r = {r:.2f} [{lo:.2f}, {hi:.2f}] over {n} architectures: what transfers is "
                          "what teaches, as the features view predicts.")
    return NEITHER, f"Pearson r = {r:.2f} [{lo:.2f}, {hi:.2f}] over {n} architectures: no clear rise together."


def read_robust_gain(robust: Stat, others: dict[str, Stat]) -> tuple[str, str]:
    """Section 3.1's signature: D_R's students more robust than each of ``others`` (D_NR's students
    and standard training: D's students, or the standard source). features: D_R's robust accuracy
    interval above each other's (its interval's top, or its mean without one); neither otherwise."""
    def top(s: Stat) -> float:
        return s["hi"] if has_interval(s) else s["mean"]

    short = {k: v for k, v in others.items() if not (has_interval(robust) and robust["lo"] > top(v))}
    said = "; ".join(f"{k} {v['mean']:.1f}" for k, v in others.items())
    if short:
        return NEITHER, (f"D_R's students ({robust['mean']:.1f}) are not clearly more robust than "
                         f"{' and '.join(short)} ({said}): the signature does not show here.")
    return FEATURES, (f"D_R's students ({robust['mean']:.1f}) are more robust than {said}: robustness comes with the "
                      "data's features.")


def read_poison(drop: Stat, shifted: Stat, chance: float, fowl: bool = True) -> tuple[str, str]:
    """An availability poison: training images perturbed toward y + 1, every label true. ``drop``:
    the poisoned students' clean (X, Y) minus the clean students' of the same rows (paired by
    seed); ``shifted``: the poisoned students' (X, Y-1). features: accuracy falls (the drop's
    interval below 0) and (X, Y-1) is above chance: the students learned the perturbations'
    features of y + 1 as class y, which the features view predicts and the bugs view does not.
    inconclusive: Fowl's recipe that does not lower accuracy did not poison at this scale.
    neither: a fall without the shifted mapping, or a variant that is not Fowl's recipe."""
    if not fowl:
        return NEITHER, ("Not Fowl's recipe (class-targeted L-inf 8/255, >= 40 steps, every image): a variant that "
                         "reads for no side.")
    if not has_interval(drop):
        return NEITHER, "One student per set and no interval: nothing is decided."
    if not below(drop, 0.0):
        return WEAK, (f"The poison does not lower clean accuracy (poisoned - clean = {fmt_stat(drop)}): it did not "
                      "poison at this scale, which says nothing of either view.")
    if above(shifted, chance):
        return FEATURES, (f"Correctly labelled images carrying perturbations toward y + 1 lower clean accuracy "
                          f"(poisoned - clean = {fmt_stat(drop)}) and teach (X, Y-1) above chance "
                          f"({shifted['mean']:.1f}): the students learned the perturbations' features of y + 1 "
                          "as class y.")
    return NEITHER, (f"The poison lowers clean accuracy (poisoned - clean = {fmt_stat(drop)}) but its students do not "
                     f"map class y + 1's features to y ((X, Y-1) {shifted['mean']:.1f}): a fall that noise-like "
                     "damage would also give.")


PROBE_RISE = 10.0
"""Points of transfer to the robust probe by which the most robust source's set may exceed the
standard source's before its students' trend is read as learning robust, perceptible features."""


def read_spectrum(slopes: Stat, every_above_chance: bool, what: str, matched: bool,
                  probe_rise: float | None = None, at_chance: str = "") -> tuple[str, str]:
    """A fooling-matched spectrum line. Not fooling-matched (some source is fooled on too few rows
    at the one radius): inconclusive, its sets differ in how much of them is perturbed at all.
    Otherwise the trend's reading (``read_trend``), except that a trend whose robust sources' sets
    fool the robust probe ``PROBE_RISE`` points more than the standard source's (``probe_rise``)
    reads neither: their students may learn robust, perceptible features, not non-robust ones. The
    probe's reason is given for every trend it applies to, whatever else the line falls short of."""
    if not matched:
        return WEAK, (f"{what}: not fooling-matched (some source is fooled on fewer rows than the rule asks at the "
                      "one radius), so the sets differ in how much of them is perturbed; nothing is read.")
    side, why = read_trend(slopes, every_above_chance, what, at_chance)
    trend = has_interval(slopes) and (slopes["lo"] > 0 or slopes["hi"] < 0)
    if trend and probe_rise is not None and probe_rise > PROBE_RISE:
        return NEITHER, (f"{why} But the robust sources' examples fool the robust probe {probe_rise:.1f} points more "
                         "than the standard source's: they carry robust, perceptible features, so the trend is not "
                         "shown to come from non-robust ones.")
    return side, why
