"""The report's figures (matplotlib, Agg): each function takes plain data and returns a Figure;
``save`` writes it as PNG and SVG. Percentages are 0..100; images are (N, C, H, W) floats in [0, 1].

    table1_bars(df)            student clean accuracy per set: every seed, 95% intervals, the paper's, chance
    attack_histograms(sets)    per-example perturbation norm and target loss, per set
    fooling_per_class(sets)    the source's fooling rate per target class (rows with t != y)
    training_curves(hist)      loss and accuracy per epoch of every model
    image_grid(examples)       clean | adversarial | perturbation (amplified), true and assigned labels
    sweep_curve(df, axes)      accuracy against the swept setting, 95% intervals
    confusion(counts, classes)  students' predictions against the true labels
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; set before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.report import summarize  # noqa: E402

plt.rcParams.update({"figure.dpi": 100, "font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                     "svg.fonttype": "none", "svg.hashsalt": "advfeatures", "axes.titlesize": 10})
OURS, PAPER, CHANCE = "#3b6ea8", "#c9a227", "#b33"


def save(fig: Any, folder: Path, name: str) -> Path:
    """Write ``name``.png and ``name``.svg under ``folder``; return the PNG's path."""
    folder.mkdir(parents=True, exist_ok=True)
    bbox = _tight_bbox(fig)  # laid out once for both files (bbox_inches="tight" lays out per file)
    fig.savefig(folder / f"{name}.png", bbox_inches=bbox)
    fig.savefig(folder / f"{name}.svg", bbox_inches=bbox, metadata={"Date": None})
    plt.close(fig)
    return folder / f"{name}.png"


def _tight_bbox(fig: Any) -> Any:
    """What ``bbox_inches="tight"`` computes before every file it writes (the artists' extents,
    padded by savefig.pad_inches), computed once at the figure's own dpi. matplotlib draws the
    figure first; that draw places nothing the extents read unless a layout engine is set (the
    report's figures: the same bytes without it, ~0.3 s less each)."""
    renderer = fig.canvas.get_renderer()
    if fig.get_layout_engine() is not None:
        fig.draw_without_rendering()
    return fig.get_tightbbox(renderer).padded(plt.rcParams["savefig.pad_inches"])


def set_intervals(df: pd.DataFrame) -> pd.DataFrame:
    """Per set: mean clean accuracy over seeds and its 95% interval (the t-interval of the mean
    with two or more seeds, else the single model's Wilson interval), the paper's number, chance."""
    summ = summarize(df).set_index(["set", "model"])
    rows = []
    for (set_name, model), g in df.groupby(["set", "model"], sort=False):
        s = summ.loc[(set_name, model)]
        lo, hi = (s["acc_xy_ci95_lo"], s["acc_xy_ci95_hi"]) if len(g) > 1 else \
            (g["ci95_lo_%"].iloc[0], g["ci95_hi_%"].iloc[0])
        rows.append({"set": set_name, "n": len(g), "mean": s["acc_xy_mean"], "lo": lo, "hi": hi,
                     "paper": g["paper_%"].iloc[0], "chance": g["chance_%"].iloc[0]})
    return pd.DataFrame(rows)


def table1_bars(df: pd.DataFrame, title: str = "Clean test accuracy (Table 1)") -> Any:
    """Per set: a bar at the mean clean accuracy over seeds, every seed as a dot, and whiskers:
    the 95% t-interval of the mean from ``T_MIN_SEEDS`` (3) seeds; with fewer, each model's own
    95% Wilson interval (with 2 seeds the t-interval, t(0.975, 1) = 12.7 times std / sqrt(2), says
    little: a note under the axes says so). The paper's numbers beside them; chance dashed. The
    whiskers' line collections carry gids ``t-interval:<set>`` or ``wilson:<set>``, the dots
    ``seeds:<set>``."""
    from pipeline.report import T_MIN_SEEDS, several_sources, t_multiplier

    iv = set_intervals(df)
    x = np.arange(len(iv))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.9 * len(iv)), 3.6))
    mean = iv["mean"].to_numpy(float)
    ax.bar(x - 0.2, mean, 0.4, color=OURS, alpha=0.85, label="ours: mean over seeds")
    paper = iv["paper"].to_numpy(float)
    has = ~np.isnan(paper)
    ax.bar(x[has] + 0.2, paper[has], 0.4, color=PAPER, label="published")
    labelled, two = set(), False

    def once(what: str, text: str) -> str:
        if what in labelled:
            return "_"
        labelled.add(what)
        return text

    groups = [g for _, g in df.groupby(["set", "model"], sort=False)]
    what = f"95% t-interval over the {df['source_seed'].nunique()} sources' means" if several_sources(df) \
        else "95% t-interval of the mean (n ≥ 3)"
    for xi, m, r, g in zip(x, mean, iv.itertuples(), groups):
        acc = g["acc_xy_%"].to_numpy(float)
        n = len(acc)
        xs = xi - 0.2 + (np.linspace(-0.1, 0.1, n) if n > 1 else np.zeros(1))
        if n >= T_MIN_SEEDS:
            err = np.clip([[m - r.lo], [r.hi - m]], 0, None)
            eb = ax.errorbar([xi - 0.2], [m], yerr=err, fmt="none", ecolor="black", capsize=4, lw=1.2,
                             label=once("t", what))
            eb.lines[2][0].set_gid(f"t-interval:{r.set}")
            top = max(r.hi, acc.max())
        else:
            lo, hi = g["ci95_lo_%"].to_numpy(float), g["ci95_hi_%"].to_numpy(float)
            eb = ax.errorbar(xs, acc, yerr=np.clip([acc - lo, hi - acc], 0, None), fmt="none", ecolor="#444",
                             capsize=2, lw=0.8, label=once("w", "95% Wilson interval of each model"))
            eb.lines[2][0].set_gid(f"wilson:{r.set}")
            top = np.nanmax(np.append(hi, acc))
        ax.scatter(xs, acc, s=14, facecolor="white", edgecolor="black", lw=0.8, zorder=3, gid=f"seeds:{r.set}",
                   label=once("s", "each seed"))
        two |= n == 2
        ax.text(xi - 0.2, top + 1.5, f"{m:.1f}" + (f"\nn={n}" if n > 1 else ""), ha="center", va="bottom",
                fontsize=7)
    for xi, p in zip(x[has], paper[has]):
        ax.text(xi + 0.2, p + 1.5, f"{p:.1f}", ha="center", va="bottom", fontsize=7)
    chance = float(iv["chance"].iloc[0])
    ax.axhline(chance, color=CHANCE, ls="--", lw=1, label=f"chance ({chance:.0f}%)")
    ax.set_xticks(x, [s.replace(" (", "\n(") for s in iv["set"]], rotation=20 if len(iv) > 6 else 0)
    ax.set_ylabel("accuracy on the clean test set (%)")
    ax.set_ylim(0, 112)
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=7, frameon=False)
    if two:
        ax.annotate(f"n = 2 seeds: no t-interval drawn; it would be mean ± t · std/√2 with t(0.975, 1) = "
                    f"{t_multiplier(2):.1f},\nthat is ± 6.35 × the two seeds' difference. Whiskers there: each "
                    "model's own 95% Wilson interval.",
                    (0, 0), xycoords="axes fraction", xytext=(0, -30 if len(iv) <= 6 else -42),
                    textcoords="offset points", fontsize=6.5, color="#5b6573", va="top", gid="note:n=2")
    return fig


def attack_histograms(sets: list[tuple[str, dict[str, np.ndarray]]], eps: float | None = None) -> Any:
    """``sets``: (name, records with norm and loss) per perturbed set."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, rec in sets:
        a.hist(rec["norm"].astype(float), bins=40, histtype="step", lw=1.3, label=name)
        b.hist(rec["loss"].astype(float), bins=40, histtype="step", lw=1.3, label=name)
    if eps is not None:
        a.axvline(eps, color=CHANCE, ls="--", lw=1, label=f"eps = {eps:g}")
    a.set(xlabel="perturbation norm ||x_stored - x||", ylabel="rows", title="perturbation norm per example")
    b.set(xlabel="target cross-entropy under the source", ylabel="rows", title="target loss per example")
    b.set_yscale("log")
    a.legend(fontsize=7, frameon=False)
    return fig


def fooling_per_class(sets: list[tuple[str, dict[str, np.ndarray]]], classes: list[str]) -> Any:
    """The share of rows the source classifies as their target, per target class (rows t != y)."""
    c = len(classes)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * c + 2), 3.2))
    width = 0.8 / max(len(sets), 1)
    for i, (name, rec) in enumerate(sets):
        differ = rec["y_target"] != rec["y_true"]
        t, fooled = rec["y_target"][differ], rec["fooled"][differ]
        rate = [100.0 * fooled[t == k].mean() if (t == k).any() else np.nan for k in range(c)]
        ax.bar(np.arange(c) - 0.4 + width * (i + 0.5), rate, width, label=name)
    ax.set_xticks(np.arange(c), classes, rotation=30)
    ax.set(ylabel="fooling rate (%)", ylim=(0, 100), title="source fooled, per target class (rows with t != y)")
    ax.legend(fontsize=7, frameon=False, ncol=min(len(sets), 4))
    return fig


def training_curves(hist: dict[str, list[dict[str, Any]]]) -> Any:
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    colors = plt.get_cmap("tab20")
    for i, (name, h) in enumerate(hist.items()):
        if not h:
            continue
        ep = [e["epoch"] for e in h]
        kw = {"color": colors(i % 20), "lw": 1.2, "marker": "o" if len(h) < 3 else None, "ms": 3}
        a.plot(ep, [e["train_loss"] for e in h], label=name, **kw)
        b.plot(ep, [100 * e["train_acc"] for e in h], label=name, **kw)
    a.set(xlabel="epoch", ylabel="training loss", title="training loss")
    b.set(xlabel="epoch", ylabel="training accuracy (%)", title="training accuracy (on each model's own labels)")
    b.legend(fontsize=6, frameon=False, bbox_to_anchor=(1.02, 1), loc="upper left")
    return fig


def _show(img: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W, C) in [0, 1] for imshow."""
    return np.clip(np.transpose(img, (1, 2, 0)), 0, 1)


def image_grid(examples: list[dict[str, Any]]) -> Any:
    """For each set, three rows over its examples: the clean image (true label), the stored
    adversarial image (assigned label, and whether it fools the source) and the perturbation,
    amplified to fill [0, 1] (0.5 + delta / (2 max|delta|) per image). Drawn as one mosaic (one
    axes), which keeps a grid of many images cheap to render."""
    n = max(len(e["clean"]) for e in examples)
    _, h, w = examples[0]["clean"].shape[1:]
    gap_x, gap_y, left = 4, 11, 26  # pixels between tiles, above tiles (labels), for row names
    rows = 3 * len(examples)
    mosaic = np.ones((rows * (h + gap_y), left + n * (w + gap_x), 3), np.float32)
    texts = []
    for b, ex in enumerate(examples):
        cls = ex["classes"]
        for j in range(len(ex["clean"])):
            d = ex["delta"][j]
            peak = max(float(np.abs(d).max()), 1e-8)
            tiles = [(ex["clean"][j], f"true: {cls[ex['y_true'][j]]}"),
                     (ex["adv"][j], f"label: {cls[ex['y_target'][j]]}" + (" ✓" if ex["fooled"][j] else "")),
                     (0.5 + d / (2 * peak), f"‖δ‖ {ex['norm'][j]:.2f}, ×{0.5 / peak:.0f}")]
            for r, (img, text) in enumerate(tiles):
                y0, x0 = (3 * b + r) * (h + gap_y) + gap_y, left + j * (w + gap_x)
                mosaic[y0:y0 + h, x0:x0 + w] = _show(img)
                texts.append((x0 + w / 2, y0 - 1.5, text, {"ha": "center", "va": "bottom", "fontsize": 6.5}))
        for r, what in enumerate(("clean", "adversarial", "perturbation")):
            y = (3 * b + r) * (h + gap_y) + gap_y + h / 2
            texts.append((left - 3, y, f"{ex['kind']}\n{what}" if r == 0 else what,
                          {"ha": "right", "va": "center", "fontsize": 7, "rotation": 90,
                           "fontweight": "bold" if r == 0 else "normal"}))
    scale = 1.25 / (w + gap_x)  # inches per pixel
    fig = plt.figure(figsize=(mosaic.shape[1] * scale, mosaic.shape[0] * scale + 0.3))
    ax = fig.add_axes((0, 0, 1, mosaic.shape[0] * scale / (mosaic.shape[0] * scale + 0.3)))
    ax.imshow(mosaic, interpolation="nearest")
    ax.axis("off")
    for x, y, text, kw in texts:
        ax.text(x, y, text, **kw)
    fig.suptitle("Constructed sets: every image is relabelled with its target (✓: the source predicts it)",
                 fontsize=8, y=0.995)
    return fig


def sweep_curve(df: pd.DataFrame, axes: list[str]) -> Any:
    """Mean clean accuracy per (point, set) over seeds with its 95% interval, against the points."""
    from pipeline.report import t_interval

    df = df.copy()
    df["point"] = df[axes].astype(str).agg(", ".join, axis=1) if len(axes) > 1 else df[axes[0]].astype(str)
    points = list(dict.fromkeys(df["point"]))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(points) + 2), 3.6))
    for set_name, g in df.groupby("set", sort=False):
        ys, lo, hi = [], [], []
        for p in points:
            gp = g[g["point"] == p]
            m = gp["acc_xy_%"].mean() if len(gp) else np.nan
            a, b = t_interval(gp["acc_xy_%"]) if len(gp) > 1 else \
                ((gp["ci95_lo_%"].mean(), gp["ci95_hi_%"].mean()) if len(gp) else (np.nan, np.nan))
            ys.append(m)
            lo.append(m - a)
            hi.append(b - m)
        ax.errorbar(range(len(points)), ys, yerr=np.clip([lo, hi], 0, None), marker="o", capsize=3, label=set_name)
    if "chance_%" in df:
        ax.axhline(df["chance_%"].iloc[0], color=CHANCE, ls="--", lw=1, label="chance")
    ax.set_xticks(range(len(points)), points, rotation=20 if len(points) > 5 else 0)
    ax.set(xlabel=" × ".join(axes), ylabel="accuracy on the clean test set (%)", ylim=(0, 100),
           title="accuracy against the swept setting (95% intervals)")
    ax.legend(fontsize=7, frameon=False, bbox_to_anchor=(1.02, 1), loc="upper left")
    return fig


def confusion(counts: np.ndarray, classes: list[str], title: str) -> Any:
    """Row-normalised confusion (%) of confusion counts (rows: true label, columns: prediction)."""
    rows = counts / np.maximum(counts.sum(1, keepdims=True), 1) * 100
    c = len(classes)
    fig, ax = plt.subplots(figsize=(0.45 * c + 2.2, 0.45 * c + 1.6))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=max(rows.max(), 1))
    for i in range(c):
        for j in range(c):
            ax.text(j, i, f"{rows[i, j]:.0f}", ha="center", va="center", fontsize=6,
                    color="white" if rows[i, j] > rows.max() * 0.6 else "black")
    ax.set_xticks(range(c), classes, rotation=45, ha="right")
    ax.set_yticks(range(c), classes)
    ax.set(xlabel="predicted", ylabel="true label", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return fig
