"""How far representation inversion gets per step budget, for the sources of a robust-datasets run:
the sweep that chose ``robust_datasets.steps`` of the robust-datasets profile.

    python benchmarks/sweep_inversion.py --store STORE --model KEY [--model KEY ...]
                                         [--images 256] [--steps 25 50 100 200 400] [--no-amp]
                                         [--trace] [--step-size 0.1 0.2 ...]

For each model and step budget: the same goal images (a seeded subset of the store's dataset) and
start images (``construct.inversion_starts``), inverted with each step size (0.1, the profile's,
by default); prints, per budget, the median ratio ||g(x_r) - g(x)|| / ||g(x0) - g(x)||, the
mean ||x_r - x0||_2, the share of x_r the model classifies as the goal's label, the seconds and
image-steps/s, the step size (one CSV line each).

With ``--trace``: one inversion of the largest budget per model, its median ratio read after each
of the budgets (the distances the inversion computed; the goal-label share and the norm only at
the end): where the ratio stops falling, at a fifth of the cost of separate runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from advfeatures import construct as C  # noqa: E402
from pipeline.common import load_model  # noqa: E402
from storage import arrays as A  # noqa: E402
from storage.store import Store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--model", action="append", required=True, help="model key (repeat)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100, 200, 400])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--trace", action="store_true", help="one run of the largest budget, read at each budget")
    ap.add_argument("--step-size", type=float, nargs="+", default=[0.1],
                    help="inversion step sizes (robust_datasets.step_size), each a sweep of its own")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    store = Store(args.store)
    (dataset_key,) = [p.name for p in store.path("datasets", "x").parent.iterdir() if p.is_dir()][:1]
    path = store.path("datasets", dataset_key)
    y_all = A.read_rows(path / "train", names=("labels",))["labels"]
    goal = C.choose_subset(len(y_all), args.images, seed=0)
    start = C.inversion_starts(goal, len(y_all), seed=0)
    goals, starts = A.read_images(path, "train", goal), A.read_images(path, "train", np.sort(start))
    starts = starts[np.searchsorted(np.sort(start), start)]
    amp = None if args.no_amp else torch.bfloat16
    print("model,steps,images,median_distance_ratio,mean_norm,model_says_goal_label,seconds,image_steps_per_s,"
          "step_size")
    models = {key: load_model(store, key, "cpu") for key in args.model}  # each read once
    for key, size in [(k, z) for k in args.model for z in args.step_size]:
        model = models[key]
        if args.trace:
            at = tuple(sorted(args.steps))
            t0 = time.perf_counter()
            out = C.invert_block(model, goals, starts, y_all[goal], at[-1], size, batch_size=args.batch,
                                 amp_dtype=amp, store_dtype="float16", trace_at=at)
            s = time.perf_counter() - t0
            for j, steps in enumerate(at):
                ratio = np.median(out["trace"][:, j] / np.maximum(out["start_distance"], 1e-12))
                last = steps == at[-1]
                print(f"{key},{steps},{len(goal)},{ratio:.4f},{out['norm'].mean() if last else float('nan'):.3f},"
                      f"{out['fooled'].mean() if last else float('nan'):.3f},{s * steps / at[-1]:.1f},"
                      f"{len(goal) * at[-1] / s:.0f},{size:g}", flush=True)
            continue
        for steps in args.steps:
            t0 = time.perf_counter()
            out = C.invert_block(model, goals, starts, y_all[goal], steps, size, batch_size=args.batch,
                                 amp_dtype=amp, store_dtype="float16")
            s = time.perf_counter() - t0
            ratio = np.median(out["distance"] / np.maximum(out["start_distance"], 1e-12))
            print(f"{key},{steps},{len(goal)},{ratio:.4f},{out['norm'].mean():.3f},{out['fooled'].mean():.3f},"
                  f"{s:.1f},{len(goal) * steps / s:.0f},{size:g}", flush=True)


if __name__ == "__main__":
    main()
