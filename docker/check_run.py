"""Checks the store of a Docker replication (docker/test.sh): the run's table exists in all three
formats with one row per expected set, accuracies are percentages, every PGD set is sealed, and its
shards were written by at least MIN_HOSTS different containers, all of them Dask workers, and
(with --same-as) that every constructed set holds the same rows, byte for byte, as the one of the
same key in another store (a run of the same config with its shards elsewhere).

    python docker/check_run.py STORE_DIR [--min-hosts 2] [--workers HOST,HOST] [--sets rand,other,det,errors]
                               [--same-as OTHER_STORE]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's storage package


def check(store: Path, sets: list[str], min_hosts: int, workers: set[str] | None = None) -> list[str]:
    errors: list[str] = []
    runs = [p for p in (store / "runs").glob("*") if (p / "manifest.json").is_file()]
    if len(runs) != 1:
        return [f"expected one finished run under {store / 'runs'}, found {len(runs)}"]
    run = runs[0]
    for name in ("table.csv", "table.md", "table.parquet"):
        if not (run / name).is_file():
            errors.append(f"{run.name}: {name} is missing")
    df = pd.read_csv(run / "table.csv")
    for s in sets:
        rows = df[df["set"] == s]
        if rows.empty:
            errors.append(f"table has no row for set {s!r}: {sorted(df['set'].unique())}")
    for col in [c for c in df.columns if c.startswith("acc")]:
        bad = [v for v in df[col].dropna() if not (0.0 <= float(v) <= 100.0) or math.isnan(float(v))]
        if bad:
            errors.append(f"column {col} has values outside [0, 100]: {bad}")
    hosts: set[str] = set()
    n_markers = 0
    for d in (store / "constructed").glob("*"):
        if not (d / "manifest.json").is_file():
            errors.append(f"constructed/{d.name} has no manifest (not sealed)")
            continue
        if json.loads((d / "manifest.json").read_text())["stage"]["config"]["kind"] == "errors":
            continue  # built by the controller, not fanned out
        for m in (d / "_shards").glob("*.json"):
            marker = json.loads(m.read_text())
            hosts.add(marker.get("host", "?"))
            n_markers += 1
    if workers is not None and not hosts <= workers:
        errors.append(f"shards written by {sorted(hosts - workers)}, which are not Dask workers {sorted(workers)}")
    if len(hosts) < min_hosts:
        errors.append(f"{n_markers} shards were written by {len(hosts)} host(s) {sorted(hosts)}; "
                      f"expected at least {min_hosts} worker containers")
    print(df.to_markdown(index=False))
    print(f"\n{n_markers} PGD shards written by {len(hosts)} containers: {sorted(hosts)}")
    return errors


def same_sets(store: Path, other: Path) -> list[str]:
    """Every constructed set of ``store`` has the same rows as ``other``'s of the same key."""
    from storage import arrays as A

    errors, n = [], 0
    for d in sorted((store / "constructed").glob("*")):
        ref = other / "constructed" / d.name
        if not (ref / "manifest.json").is_file():
            errors.append(f"constructed/{d.name} is not in {other}")
            continue
        got, want = A.read_rows(d), A.read_rows(ref)
        bad = [k for k in want if k not in got or not np.array_equal(got[k], want[k])]
        if bad:
            errors.append(f"constructed/{d.name}: {bad} differ from {ref}")
        n += 1
    print(f"{n} constructed sets compared with {other}: {n - len(errors)} identical")
    return errors


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("store", type=Path)
    ap.add_argument("--min-hosts", type=int, default=2)
    ap.add_argument("--workers", default=None, help="comma-separated hostnames of the Dask worker containers")
    ap.add_argument("--sets", default="rand,other,det,errors")
    ap.add_argument("--same-as", type=Path, default=None, help="a store whose sets must be byte-identical")
    args = ap.parse_args()
    workers = set(args.workers.split(",")) if args.workers else None
    errors = check(args.store, args.sets.split(","), args.min_hosts, workers)
    if args.same_as is not None:
        errors += same_sets(args.store, args.same_as)
    for e in errors:
        print(f"FAIL: {e}", file=sys.stderr)
    print("docker replication: OK" if not errors else f"docker replication: {len(errors)} problem(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
