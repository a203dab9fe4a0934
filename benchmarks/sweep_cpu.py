"""One point of a CPU sweep: run the pipeline with overrides, append its rows to a long-format table.

    python benchmarks/sweep_cpu.py --data ../shared/data/cifar10-jpeg.zip --store /tmp/sweep \\
        --lever "bf16" --profile demo --set runtime.amp=bf16 --out results/cpu/sweep.csv

Each row of the run's table (source, teacher, every student) becomes a row of ``--out`` with the
lever's name, the overrides, the run's wall time, the seconds of the stages behind the row (the
model's training; for students, also the PGD set and its selection) and whether this run computed
them or found them cached. Points share one store, so a point reuses what earlier points built.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FIELDS = ["lever", "profile", "overrides", "date", "run_wall_s", "set", "model", "seed", "n_train",
          "attack_success_%", "attack_success_t≠y_%", "share_t=y_%", "pgd_fooled_%", "pgd_fooled_t≠y_%",
          "acc_xy_%", "ci95_lo_%", "ci95_hi_%", "acc_xy+1_%",
          "source_acc_%", "model_s", "set_s", "computed", "run_key", "note"]


def pgd_fooling(store, key) -> dict[str, float]:
    """The fooling rates of the whole PGD set behind a set students trained on (before selection)."""
    nan = float("nan")
    if not isinstance(key, str) or not store.is_complete("constructed", key):
        return {"pgd_fooled_%": nan, "pgd_fooled_t≠y_%": nan}
    man = store.manifest("constructed", key)
    if "parent" in man:
        return pgd_fooling(store, man["parent"])
    summary = man.get("summary", {})
    def pct(v):
        return round(100 * v, 2) if isinstance(v, (int, float)) else nan

    return {"pgd_fooled_%": pct(summary.get("attack_success")),
            "pgd_fooled_t≠y_%": pct(summary.get("attack_success_t_ne_y"))}


def set_seconds(store, key) -> float:
    """Seconds of a constructed set's stage, plus its parent PGD set's for a margin selection."""
    if not isinstance(key, str) or not store.is_complete("constructed", key):
        return float("nan")
    man = store.manifest("constructed", key)
    return float(man.get("seconds", 0.0)) + (set_seconds(store, man["parent"]) if "parent" in man else 0.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--profile", default="demo")
    p.add_argument("--lever", required=True, help="a short name for this point")
    p.add_argument("--set", action="append", default=[], dest="overrides")
    p.add_argument("--out", default=str(ROOT / "results" / "cpu" / "sweep.csv"))
    p.add_argument("--note", default="", help="free text stored with every row of this point")
    p.add_argument("--since", type=float, default=0.0,
                   help="count models made up to this many seconds before the start as computed by this point")
    a = p.parse_args(argv)

    from storage.store import Store

    cmd = [sys.executable, "-m", "flows.cli", "run", "--profile", a.profile, "--data", a.data, "--store", a.store]
    for o in a.overrides:
        cmd += ["--set", o]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        return proc.returncode
    text = proc.stdout + proc.stderr  # Prefect's print logging may go to either
    run_dir = next(line.split("run folder:", 1)[1].strip() for line in text.splitlines() if "run folder:" in line)
    import pandas as pd

    st = Store(a.store)
    table = pd.read_csv(Path(run_dir) / "table.csv")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    with out.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for r in table.to_dict("records"):
            # tables since 2026-12-03 name the trained rows' rate apart from the whole set's; this CSV
            # keeps its columns (attack_success_*: over the trained rows; pgd_fooled_*: the whole set)
            r.setdefault("attack_success_%", r.get("fooled_trained_rows_%"))
            r.setdefault("attack_success_t≠y_%", r.get("fooled_trained_rows_t≠y_%"))
            man = st.manifest("models", r["model_key"])
            computed = pd.Timestamp(man["created"]).timestamp() >= t0 - a.since
            w.writerow({"lever": a.lever, "profile": a.profile, "overrides": " ".join(a.overrides),
                        "date": time.strftime("%Y-%m-%d"), "run_wall_s": round(wall, 1),
                        **{k: r.get(k) for k in FIELDS if k in r},
                        "model_s": round(float(man.get("seconds", float("nan"))), 1),
                        "set_s": round(set_seconds(st, r.get("construct_key")), 1),
                        **pgd_fooling(st, r.get("construct_key")),
                        "computed": computed, "run_key": Path(run_dir).name, "note": a.note})
    print(text[text.find("| set"):text.find("run folder:")])
    print(f"{a.lever}: {wall:.0f} s wall; rows appended to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
