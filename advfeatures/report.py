"""The evaluation table, lined up with Table 1 of Ilyas et al. (2019) and Wallace (2019).

One row per (set, model, seed): the source (trained on D), the teacher of `errors`, and every
student. Accuracies are on the original, clean test set, in percent, with a 95% Wilson interval;
``vs_chance`` says whether that interval lies above or below chance (1/C) or contains it.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from advfeatures.config import ExperimentConfig
from advfeatures.plan import Plan, StageSpec
from storage.store import Store, atomic_write_json, open_root

# Clean test accuracy (%) reported for CIFAR-10: Ilyas et al. Table 1 (ResNet-50) and, for
# errors, Wallace (2019, ResNet-18 on 18,768 mislabeled images). D_other is not in the paper.
PAPER = {"D": 95.3, "rand": 63.3, "det": 43.7, "errors": 49.7}
TABLE_FILES = ("table.csv", "table.md", "table.parquet")


def _pct(x: float | None) -> float:
    return float("nan") if x is None else round(100.0 * x, 2)


def _vs_chance(ci: list[float], chance: float) -> str:
    if ci[0] > chance:
        return "above"
    if ci[1] < chance:
        return "below"
    return "at chance"


def _row(store: Store, set_name: str, model_spec: StageSpec, eval_spec: StageSpec, seed: int, n_train: int,
         construct: dict[str, Any] | None, source_acc: float) -> dict[str, Any]:
    m = store.manifest("evals", eval_spec.key)["metrics"]
    summary = (construct or {}).get("summary", {})
    return {
        "set": set_name, "model": model_spec.config["model"]["arch"], "seed": seed, "n_train": n_train,
        "attack_success_%": _pct(summary.get("attack_success")),
        "acc_xy_%": _pct(m["acc_xy"]), "ci95_lo_%": _pct(m["ci95_xy"][0]), "ci95_hi_%": _pct(m["ci95_xy"][1]),
        "acc_xy+1_%": _pct(m["acc_xy1"]), "vs_chance": _vs_chance(m["ci95_xy"], m["chance"]),
        "chance_%": _pct(m["chance"]), "paper_%": PAPER.get(set_name.split()[0], float("nan")),
        "source_acc_%": _pct(source_acc), "n_test": m["n_test"],
        "model_key": model_spec.key, "construct_key": construct["key"] if construct else "", "eval_key": eval_spec.key,
    }


def build_table(store: Store, plan: Plan) -> pd.DataFrame:
    src_man = store.manifest("models", plan.source.key)
    source_acc = store.manifest("evals", plan.source_eval.key)["metrics"]["acc_xy"]
    rows = [_row(store, "D (source)", plan.source, plan.source_eval, src_man["seeds"]["train"],
                 src_man["n_train"], None, source_acc)]
    if plan.teacher is not None:
        t_man = store.manifest("models", plan.teacher.key)
        rows.append(_row(store, "teacher (errors)", plan.teacher, plan.teacher_eval, t_man["seeds"]["train"],
                         t_man["n_train"], None, source_acc))
    for s in plan.students:
        cman = store.manifest("constructed", s.construct.key)
        rows.append(_row(store, s.kind, s.student, s.eval, s.seed, cman["summary"]["n"], cman, source_acc))
    return pd.DataFrame(rows)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation and n over seeds, per (set, model)."""
    g = df.groupby(["set", "model"], sort=False)
    out = g.agg(n=("seed", "size"), acc_xy_mean=("acc_xy_%", "mean"), acc_xy_std=("acc_xy_%", "std"),
                acc_xy1_mean=("acc_xy+1_%", "mean"), acc_xy1_std=("acc_xy+1_%", "std"))
    return out.reset_index()


def to_markdown(df: pd.DataFrame) -> str:
    shown = df.drop(columns=[c for c in df.columns if c.endswith("_key")] + ["n_test"])
    text = shown.to_markdown(index=False, floatfmt=".1f")
    if df["seed"].groupby(df["set"]).size().max() > 1:
        text += "\n\nOver seeds:\n\n" + summarize(df).to_markdown(index=False, floatfmt=".1f")
    return text


def write_run(store: Store, plan: Plan, cfg: ExperimentConfig) -> Path:
    """Write table.{csv,md,parquet}, the resolved config and the plan under runs/<run key>/."""
    spec = plan.run
    if store.is_complete(spec.folder, spec.key):
        return store.path(spec.folder, spec.key)
    store.once(spec.folder, spec.key, lambda: store.is_complete(spec.folder, spec.key),
               lambda: _write_run(store, plan, cfg, spec), skipped=None)
    return store.path(spec.folder, spec.key)


def _write_run(store: Store, plan: Plan, cfg: ExperimentConfig, spec: StageSpec) -> None:
    t0 = time.perf_counter()
    df = build_table(store, plan)
    with store.staging(spec.folder, spec.key) as tmp:
        with (tmp / "table.csv").open("w") as f:
            df.to_csv(f, index=False)
        with (tmp / "table.parquet").open("wb") as f:
            df.to_parquet(f, index=False)
        (tmp / "table.md").write_text(to_markdown(df) + "\n")
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        atomic_write_json(tmp / "plan.json", [s.as_dict() for s in plan.stages()])
        atomic_write_json(tmp / "manifest.json", store.manifest_body(
            spec.folder, spec.key, spec.as_dict(), files=list(TABLE_FILES), seconds=round(time.perf_counter() - t0, 3)))


def read_table(run_dir: Path) -> pd.DataFrame:
    with (open_root(run_dir) / "table.parquet").open("rb") as f:
        return pd.read_parquet(io.BytesIO(f.read()))
