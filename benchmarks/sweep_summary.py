"""One sweep's table pivoted for reading: per set (rows) and sweep value (columns), the students'
mean clean accuracy on (X, Y) ± its std over seeds, then (X, Y+1) and the rows trained on.

    python benchmarks/sweep_summary.py SWEEP_FOLDER_OR_CSV SETTING OUT_PREFIX

writes OUT_PREFIX.csv (long: set, value, n, acc_xy_mean, acc_xy_std, acc_xy1_mean, n_train) and
OUT_PREFIX.md (the pivot), e.g. ``results/demo/select-sweep/by-fraction``.
"""

import sys
from pathlib import Path

import pandas as pd


def summary(df: pd.DataFrame, setting: str) -> pd.DataFrame:
    rows = []
    for (kind, value), g in df.groupby(["set", setting], sort=False):
        rows.append({"set": kind, setting: value, "n": len(g), "acc_xy_mean": round(g["acc_xy_%"].mean(), 1),
                     "acc_xy_std": round(g["acc_xy_%"].std(), 1), "acc_xy1_mean": round(g["acc_xy+1_%"].mean(), 1),
                     "n_train": int(g["n_train"].iloc[0])})
    return pd.DataFrame(rows)


def pivot(s: pd.DataFrame, setting: str) -> str:
    values = list(dict.fromkeys(s[setting]))
    lines = [f"| set | " + " | ".join(f"{setting}={v}: (X, Y) / (X, Y+1) / rows" for v in values) + " |",
             "|---|" + "---:|" * len(values)]
    for kind, g in s.groupby("set", sort=False):
        by = {r[setting]: r for r in g.to_dict("records")}
        cells = [f"{by[v]['acc_xy_mean']:.1f} ± {by[v]['acc_xy_std']:.1f} / {by[v]['acc_xy1_mean']:.1f} / "
                 f"{by[v]['n_train']:,}" if v in by else "" for v in values]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    src, setting, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    df = pd.read_csv(src / "sweep.csv" if src.is_dir() else src)
    df = df[~df["set"].isin(["D (source)", "teacher (errors)"])]
    s = summary(df, setting)
    s.to_csv(out.with_suffix(".csv"), index=False)
    out.with_suffix(".md").write_text(pivot(s, setting))
