"""Sweeps: settings as axes, every point a run of one experiment (its stages cached, so points
share whatever they have in common), and one long-format table over all points.

    axes(["construct.n_images=2000,8000", "attack.steps=5,20"])
        -> [("construct.n_images", ["2000", "8000"]), ("attack.steps", ["5", "20"])]
    points(axes) -> the overrides of each point (the cartesian product, first axis slowest)
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

from advfeatures.config import ConfigError, ExperimentConfig
from pipeline.common import publish
from pipeline.kinds import StageSpec
from storage.store import Store


def _split_values(raw: str) -> list[str]:
    """Comma-separated values; commas inside [...] or {...} belong to their value."""
    out, depth, cur = [], 0, ""
    for ch in raw:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def axes(specs: list[str]) -> list[tuple[str, list[str]]]:
    out = []
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"--sweep {spec!r} must look like section.key=V1,V2, e.g. attack.steps=5,20")
        key, raw = spec.split("=", 1)
        values = _split_values(raw)
        if not key.strip() or not all(values):
            raise ConfigError(f"--sweep {spec!r}: a setting and non-empty values are needed")
        if len(set(values)) != len(values):
            raise ConfigError(f"--sweep {spec!r} repeats a value")
        if key.strip() in [k for k, _ in out]:
            raise ConfigError(f"--sweep gives {key.strip()} twice; put its values in one --sweep")
        out.append((key.strip(), values))
    return out


def points(ax: list[tuple[str, list[str]]]) -> list[list[str]]:
    return [[f"{k}={v}" for (k, _), v in zip(ax, combo)] for combo in itertools.product(*(vs for _, vs in ax))]


def seeds_override(n: int) -> str:
    if n < 1:
        raise ConfigError(f"--seeds {n}: need at least one student seed")
    return f"student.seeds=[{', '.join(str(i) for i in range(n))}]"


def sweep_spec(experiment: str, ax: list[tuple[str, list[str]]], run_keys: list[str]) -> StageSpec:
    return StageSpec("run", {"name": "sweep", "experiment": experiment, "axes": [[k, v] for k, v in ax]},
                     tuple(run_keys))


def write_sweep(store: Store, experiment: str, ax: list[tuple[str, list[str]]],
                runs: list[tuple[list[str], Path]], cfg: ExperimentConfig) -> Path:
    """One long-format table over the points (``runs``: each point's overrides and run folder):
    every row of every point's table, with one column per axis, under runs/<sweep key>/."""
    import pandas as pd
    import yaml

    from pipeline.report import read_table

    spec = sweep_spec(experiment, ax, [Path(str(d)).name for _, d in runs])
    if store.is_complete(spec.folder, spec.key):
        return store.path(spec.folder, spec.key)
    t0 = time.perf_counter()
    frames = []
    for over, run_dir in runs:
        df = read_table(run_dir)
        for (k, _), o in zip(ax, over):
            df.insert(0, k, o.split("=", 1)[1])
        df.insert(0, "run_key", Path(str(run_dir)).name)
        frames.append(df)
    table = pd.concat(frames, ignore_index=True)
    def write(tmp: Path) -> dict[str, Any]:
        with (tmp / "sweep.csv").open("w") as f:
            table.to_csv(f, index=False)
        with (tmp / "sweep.parquet").open("wb") as f:
            table.to_parquet(f, index=False)
        shown = table.drop(columns=[c for c in table.columns if c.endswith("_key")])
        (tmp / "sweep.md").write_text(shown.to_markdown(index=False, floatfmt=".1f") + "\n")
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return {}

    publish(store, spec, t0, write, files=["sweep.csv", "sweep.md", "sweep.parquet"],
            points=[{"overrides": o, "run": Path(str(d)).name} for o, d in runs])
    return store.path(spec.folder, spec.key)
