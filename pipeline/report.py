"""The evaluation table, beside the published numbers an experiment gives (``paper_%``).

One row per (set, model, seed): the source (trained on D), the teacher of `errors`, and every
student. Accuracies are on the original, clean test set, in percent, with a 95% Wilson interval;
``vs_chance`` says whether that interval lies above or below chance (1/C) or contains it.
The source's fooling rate (it predicts the target on the stored image) comes twice, over all rows
and over the rows whose target differs from the true label: ``fooled_whole_set_%`` over the whole
constructed set, and ``fooled_trained_rows_%`` over the rows the students trained on, which with a
margin selection (construct.select < 1) are the ``trained_rows_%`` of the set with the largest
target margin (the margin is > 0 exactly when fooled, so 100% whenever at least that share of the
set fools the source); without one the two are the same rows.
``share_t=y`` is the share of trained rows whose target is their own label (about 1/C for rand, 0
for the others). ``init`` is a short hash of the model's initial
weights: the Markdown table says whether any two models of the run share them. With
``evaluate.robust_eps``, ``robust_acc_eps<r>_%`` is the accuracy on untargeted PGD adversarial
examples of the clean test set at radius r.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from advfeatures.config import ExperimentConfig
from pipeline.common import publish, run_record
from pipeline.kinds import StageSpec
from pipeline.plan import Plan
from storage.store import Store, atomic_write_json, open_root

TABLE_FILES = ("table.csv", "table.md", "table.parquet")


def _pct(x: float | None) -> float:
    return float("nan") if x is None else round(100.0 * x, 2)


def _vs_chance(ci: list[float], chance: float) -> str:
    if ci[0] > chance:
        return "above"
    if ci[1] < chance:
        return "below"
    return "at chance"


def model_name(spec: StageSpec, man: dict[str, Any]) -> str:
    """The architecture, and for a model read from a checkpoint the file's name and format."""
    arch = spec.config["model"]["arch"]
    ck = man.get("checkpoint")
    return f"{arch} (checkpoint {Path(ck['file']).name}, {ck['format']})" if ck else arch


def _row(store: Store, set_name: str, model_spec: StageSpec, eval_spec: StageSpec, construct: dict[str, Any] | None,
         source_acc: float, robust: list[StageSpec] = (), paper: dict[str, float] | None = None) -> dict[str, Any]:
    m = store.manifest("evals", eval_spec.key)["metrics"]
    man = store.manifest("models", model_spec.key)
    summary = (construct or {}).get("summary", {})
    return {
        "set": set_name, "model": model_name(model_spec, man), "seed": man["seeds"]["train"],
        "n_train": man["n_train"], "init": man.get("init_sha256", "")[:8],
        **fooling(store, construct),
        "share_t=y_%": _pct(summary.get("share_target_is_true")),
        "acc_xy_%": _pct(m["acc_xy"]), "ci95_lo_%": _pct(m["ci95_xy"][0]), "ci95_hi_%": _pct(m["ci95_xy"][1]),
        "acc_xy+1_%": _pct(m["acc_xy1"]), "vs_chance": _vs_chance(m["ci95_xy"], m["chance"]),
        "chance_%": _pct(m["chance"]), "paper_%": (paper or {}).get(set_name.split()[0], float("nan")),
        "source_acc_%": _pct(source_acc), "n_test": m["n_test"],
        "model_key": model_spec.key, "construct_key": construct["key"] if construct else "", "eval_key": eval_spec.key,
        **{f"robust_acc_eps{r.config['robust']['eps']:g}_%": _pct(store.manifest("evals", r.key)["metrics"]["acc_xy"])
           for r in robust},
    }


FOOLING = ("fooled_whole_set_%", "fooled_whole_set_t≠y_%", "fooled_trained_rows_%", "fooled_trained_rows_t≠y_%",
           "trained_rows_%")
"""The table's fooling columns (``fooling``); tables written before them had ``attack_success_%``
and ``attack_success_t≠y_%``, over the trained rows (``with_fooling``)."""


def whole_set(store: Store, construct: dict[str, Any]) -> dict[str, Any]:
    """The manifest of the set a constructed set's rows were taken from: a margin selection's
    parent PGD set; any other set is whole itself."""
    parent = construct.get("parent")
    if (construct.get("stage") or {}).get("stage") == "select" and parent:
        return store.manifest("constructed", parent)
    return construct


def fooling(store: Store, construct: dict[str, Any] | None) -> dict[str, float]:
    """The source's fooling rate over the whole set (all rows, rows with t != y), over the rows
    the students trained on (the same, or a margin selection's rows), and the share of the set's
    rows they trained on, in percent (NaN for models trained on D and sets made without attack)."""
    if not construct:
        return dict.fromkeys(FOOLING, float("nan"))
    trained = construct.get("summary", {})
    whole = whole_set(store, construct).get("summary", {})
    n_whole, n_trained = whole.get("n"), trained.get("n")
    return {"fooled_whole_set_%": _pct(whole.get("attack_success")),
            "fooled_whole_set_t≠y_%": _pct(whole.get("attack_success_t_ne_y")),
            "fooled_trained_rows_%": _pct(trained.get("attack_success")),
            "fooled_trained_rows_t≠y_%": _pct(trained.get("attack_success_t_ne_y")),
            "trained_rows_%": _pct(n_trained / n_whole) if n_whole and n_trained is not None else float("nan")}


def with_fooling(store: Store, df: pd.DataFrame) -> pd.DataFrame:
    """A table written before ``FOOLING``'s columns, with them (from the store's set manifests; a
    set the store no longer holds: its old columns as the trained rows', the whole set's NaN), in
    place of ``attack_success_%`` and ``attack_success_t≠y_%``. Newer tables come back as they are."""
    old = ["attack_success_%", "attack_success_t≠y_%"]
    if "fooled_trained_rows_%" in df.columns or not set(old) <= set(df.columns):
        return df
    rows = []
    for r in df.to_dict("records"):
        key = r.get("construct_key")
        if isinstance(key, str) and key and store.is_complete("constructed", key):
            rows.append(fooling(store, store.manifest("constructed", key)))
        else:
            rows.append({**dict.fromkeys(FOOLING, float("nan")), "fooled_trained_rows_%": r[old[0]],
                         "fooled_trained_rows_t≠y_%": r[old[1]]})
    at = list(df.columns).index(old[0])
    out = df.drop(columns=old)
    for i, col in enumerate(FOOLING):
        out.insert(at + i, col, [row[col] for row in rows])
    return out


def build_table(store: Store, plan: Plan, paper: dict[str, float] | None = None) -> pd.DataFrame:
    """One row per model, beside ``paper`` ({set: published clean accuracy %}, by the first word of
    the set's name; none: NaN); over several source seeds (``plan.replicates``), each source's rows
    in turn, ``source_seed`` saying which."""
    if plan.replicates:
        return pd.concat([_source_table(store, sub, paper) for sub in plan.replicates.values()], ignore_index=True)
    return _source_table(store, plan, paper)


def _source_table(store: Store, plan: Plan, paper: dict[str, float] | None) -> pd.DataFrame:
    source_acc = store.manifest("evals", plan.source_eval.key)["metrics"]["acc_xy"]
    robust = plan.robust
    rows = [_row(store, "D (source)", plan.source, plan.source_eval, None, source_acc, robust.get(plan.source.key, []),
                 paper)]
    if plan.teacher is not None:
        rows.append(_row(store, "teacher (errors)", plan.teacher, plan.teacher_eval, None, source_acc,
                         robust.get(plan.teacher.key, []), paper))
    for s in plan.students:
        rows.append(_row(store, s.kind, s.student, s.eval, store.manifest("constructed", s.construct.key), source_acc,
                         robust.get(s.student.key, []), paper))
    df = pd.DataFrame(rows)
    df.insert(2, "source_seed", plan.source.config.get("train", {}).get("seed"))  # None: read from a checkpoint
    return df


def t_interval(values: pd.Series) -> tuple[float, float]:
    """95% t-interval of the mean over seeds: mean +- t(0.975, n-1) * std / sqrt(n); NaN for n < 2."""
    n = int(values.count())
    if n < 2:
        return (float("nan"), float("nan"))
    half = t_multiplier(n) * float(values.std()) / n ** 0.5
    return (float(values.mean()) - half, float(values.mean()) + half)


def t_multiplier(n: int) -> float:
    """t(0.975, n-1): the 95% t-interval of a mean over n values is mean +- this * std / sqrt(n)
    (12.7 for n = 2, 4.3 for n = 3, 2.8 for n = 5); NaN for n < 2."""
    from scipy.stats import t  # lazily: importing the report stays cheap

    return float(t.ppf(0.975, n - 1)) if n >= 2 else float("nan")


T_MIN_SEEDS = 3
"""The fewest seeds whose t-interval the figures draw: with 2, t(0.975, 1) = 12.7 makes it +-6.35
times the two students' difference (5 points apart: +-32 points), wider than either student's own
95% interval (about +-1 point on 10,000 test images) as soon as they differ by 0.2 points."""


def seed_stats(values: pd.Series, name: str) -> dict:
    """One column over seeds, as the experiments' "over seeds" tables show it: ``{name}_mean``,
    ``{name}_std`` and the 95% t-interval of the mean (``ci95_lo``, ``ci95_hi``; NaN for n < 2)."""
    lo, hi = t_interval(values)
    return {f"{name}_mean": values.mean(), f"{name}_std": values.std(), "ci95_lo": lo, "ci95_hi": hi}


def several_sources(df: pd.DataFrame) -> bool:
    """The table holds more than one source seed (``source.seeds``): a nested design."""
    return "source_seed" in df and df["source_seed"].nunique() > 1


def nested_stats(g: pd.DataFrame, col: str = "acc_xy_%") -> dict[str, float]:
    """``col`` over a nested design (sources x students; ``source_seed``): the mean of the source
    means, the spread between sources (the std of the source means), the spread within a source
    (the pooled std of students around their source's mean), and the 95% t-interval of the mean
    over the source means (n = sources): a t-interval over every student would treat students of
    one source as independent and understate it."""
    by = g.groupby("source_seed", sort=False)[col]
    means = by.mean()
    dev = g[col] - by.transform("mean")
    dof = int((by.count() - 1).clip(lower=0).sum())
    lo, hi = t_interval(means)
    return {"n_sources": int(means.count()), "mean": float(means.mean()), "between_std": float(means.std()),
            "within_std": float(((dev ** 2).sum() / dof) ** 0.5) if dof else float("nan"), "ci95_lo": lo, "ci95_hi": hi}


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per (set, model): n seeds, mean and standard deviation over seeds, and the 95% t-interval
    of the mean, of acc (X, Y) and acc (X, Y+1); the mean fooling rates (whole set, trained rows)
    beside them. Over several source seeds (``source_seed``): the mean over sources, the spread
    between and within sources, and the interval over sources (``nested_stats``)."""
    if several_sources(df):
        return summarize_nested(df)
    rows = []
    for (set_name, model), g in df.groupby(["set", "model"], sort=False):
        lo, hi = t_interval(g["acc_xy_%"])
        rows.append({"set": set_name, "model": model, "n": len(g),
                     "acc_xy_mean": g["acc_xy_%"].mean(), "acc_xy_std": g["acc_xy_%"].std(),
                     "acc_xy_ci95_lo": lo, "acc_xy_ci95_hi": hi,
                     "acc_xy1_mean": g["acc_xy+1_%"].mean(), "acc_xy1_std": g["acc_xy+1_%"].std(),
                     **{c: g[c].mean() for c in FOOLING[:4] if c in g}})
    return pd.DataFrame(rows)


def summarize_nested(df: pd.DataFrame) -> pd.DataFrame:
    """``summarize`` over sources x students: per (set, model), n models and n sources, acc (X, Y)'s
    mean over the source means, its spread between and within sources and its 95% interval over
    sources; acc (X, Y+1) and the fooling rates likewise averaged over sources."""
    rows = []
    for (set_name, model), g in df.groupby(["set", "model"], sort=False):
        xy, xy1 = nested_stats(g), nested_stats(g, "acc_xy+1_%")
        rows.append({"set": set_name, "model": model, "n": len(g), "n_sources": xy["n_sources"],
                     "acc_xy_mean": xy["mean"], "acc_xy_between_std": xy["between_std"],
                     "acc_xy_within_std": xy["within_std"], "acc_xy_ci95_lo": xy["ci95_lo"],
                     "acc_xy_ci95_hi": xy["ci95_hi"], "acc_xy1_mean": xy1["mean"],
                     "acc_xy1_between_std": xy1["between_std"],
                     **{c: g.groupby("source_seed")[c].mean().mean() for c in FOOLING[:4] if c in g}})
    return pd.DataFrame(rows)


def init_note(df: pd.DataFrame) -> str:
    """One line: do any two models of the table share initial weights?"""
    inits = df[df["init"] != ""]
    shared = inits[inits.duplicated("init", keep=False)]
    if shared.empty:
        return f"Initial weights: all {len(inits)} models start from different weights."
    src = (lambda r: f" source {r.source_seed}") if several_sources(df) else (lambda r: "")
    groups = ["; ".join(f"{r.set} seed {r.seed}{src(r)}" for r in g.itertuples()) for _, g in shared.groupby("init")]
    return "Initial weights SHARED by: " + " | ".join(groups)


def to_markdown(df: pd.DataFrame) -> str:
    shown = df.drop(columns=[c for c in df.columns if c.endswith("_key")] + ["n_test"])
    text = shown.to_markdown(index=False, floatfmt=".1f")
    if df["seed"].groupby(df["set"]).size().max() > 1:
        head = ("Over sources x students (the mean of the source means; the std of the source means (between) and of "
                "students around their source's mean (within); the 95% t-interval over sources)") \
            if several_sources(df) else "Over seeds (mean, std, 95% t-interval of the mean)"
        text += f"\n\n{head}:\n\n" + summarize(df).to_markdown(index=False, floatfmt=".1f")
    return text + "\n\n" + init_note(df)


def write_run(store: Store, plan: Any, cfg: ExperimentConfig, build: Any = None, markdown: Any = None,
              experiment: str = "") -> Path:
    """Write table.{csv,md,parquet}, the resolved config and the plan under runs/<run key>/.
    ``build(store, plan)`` makes the table (default: ``build_table``, without published numbers) and
    ``markdown(df)`` its Markdown; the manifest names the ``experiment`` (its report section)."""
    spec = plan.run
    with store.lock(spec.folder, spec.key):  # the store's truth, checked once, under the run's lock
        if not store.is_complete(spec.folder, spec.key):
            _write_run(store, plan, cfg, spec, build or build_table, markdown or to_markdown, experiment)
    return store.path(spec.folder, spec.key)


def _write_run(store: Store, plan: Any, cfg: ExperimentConfig, spec: StageSpec, build: Any, markdown: Any,
               experiment: str) -> None:
    t0 = time.perf_counter()
    df = build(store, plan)

    def write(tmp: Path) -> dict[str, Any]:
        with (tmp / "table.csv").open("w") as f:
            df.to_csv(f, index=False)
        with (tmp / "table.parquet").open("wb") as f:
            df.to_parquet(f, index=False)
        (tmp / "table.md").write_text(markdown(df) + "\n")
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        atomic_write_json(tmp / "plan.json", [s.as_dict() for s in plan.stages()])
        return {}

    publish(store, spec, t0, write, files=list(TABLE_FILES), experiment=experiment, labels=plan.labels(),
            **run_record(cfg.runtime))


def read_table(run_dir: Path) -> pd.DataFrame:
    with (open_root(run_dir) / "table.parquet").open("rb") as f:
        return pd.read_parquet(io.BytesIO(f.read()))
