"""End-to-end wall time of a profile (default: demo), per stage, and of a fully cached rerun.

    python benchmarks/bench_e2e.py --data ../shared/data/cifar10-jpeg.zip [--profile demo]
                                   [--store DIR] [--set k=v ...] [--cached-only]

The runs are `advfeatures run` subprocesses (the cached rerun twice: as it is, which prints what
the store holds without starting Prefect; and with --record, a flow run of cached stages, Prefect
starting its temporary server), so the times are what a user waits, Prefect's
start-up included. Per stage: seconds from its manifest and GFLOP/s from the model's FLOP count
(training image = 3x forward, PGD image-step = 2x forward, inference = 1x).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from advfeatures.config import resolve  # noqa: E402
from benchmarks.common import forward_flops, machine, model  # noqa: E402
from storage.store import Store  # noqa: E402


def stage_flops(spec, man, store: Store, fwd: dict[str, float]) -> float:
    cfg = spec.config
    if spec.stage in ("model", "student"):
        return 3 * fwd[cfg["model"]["arch"]] * man["n_train"] * cfg["train"]["epochs"]
    if spec.stage == "construct":
        arch = store.manifest("models", spec.inputs[1])["stage"]["config"]["model"]["arch"]
        if cfg["kind"] == "errors":
            return fwd[arch] * man["summary"]["n"] / max(man["summary"]["teacher_train_error"], 1e-9)
        return fwd[arch] * man["summary"]["n"] * (2 * cfg["attack"]["steps"] + 1)
    if spec.stage == "eval":
        arch = store.manifest("models", spec.inputs[0])["stage"]["config"]["model"]["arch"]
        return fwd[arch] * man["metrics"]["n_test"]
    return 0.0


def run_cli(args: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", *args], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, env={**os.environ, **(env or {})})
    if out.returncode:
        sys.exit(f"advfeatures run failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="demo")
    p.add_argument("--data", default=None)
    p.add_argument("--store", default=None, help="default: a fresh temporary folder")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--cached-only", action="store_true", help="only time the cached rerun")
    a = p.parse_args(argv)
    store_dir = a.store or tempfile.mkdtemp(prefix="advfeatures-e2e-")
    args = ["--profile", a.profile, "--store", store_dir, *sum((["--set", s] for s in a.overrides), [])]
    if a.data:
        args += ["--data", a.data]
    first = None if a.cached_only else run_cli(args)
    cached = run_cli(args)  # everything in the store: printed without starting Prefect
    # the same rerun as a flow run (temporary server, cached stages), twice, the faster kept (the first
    # flow run on a new Prefect database also migrates it)
    recorded = min(run_cli(args + ["--record"]) for _ in range(2))

    from pipeline.experiments import plan_for
    from pipeline.runs import stage_timings

    cfg = resolve(a.profile, a.overrides, data=a.data, store=store_dir)
    store, plan = Store(store_dir), plan_for(cfg)
    specs = {s.key: s for s in plan.stages()}
    archs = {cfg.source.model.arch, cfg.teacher.model.arch, cfg.student.model.arch}
    fwd = {arch: forward_flops(model(arch, "cpu")) for arch in archs}
    print(f"# {a.profile} profile end to end; {machine(cfg.runtime.device if cfg.runtime.device != 'auto' else 'cpu')}")
    print(f"{'stage':<10} {'what':<16} {'seconds':>8} {'GFLOP/s':>8}")
    total = 0.0
    for t in stage_timings(store, plan, since=0):
        spec = specs[t["key"]]
        flops = stage_flops(spec, store.manifest(spec.folder, spec.key), store, fwd)
        total += t["seconds"]
        rate = f"{flops / t['seconds'] / 1e9:8.1f}" if flops and t["seconds"] else f"{'-':>8}"
        print(f"{t['stage']:<10} {t['what']:<16} {t['seconds']:>8.1f} {rate}")
    print(f"# sum of stages {total:.1f} s" + (f"; first run wall time {first:.1f} s" if first else ""))
    print(f"# fully cached rerun wall time: {cached:.1f} s (target < 10 s); with --record (a Prefect flow run of "
          f"cached stages, the temporary server's start included): {recorded:.1f} s; ratio {recorded / cached:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
