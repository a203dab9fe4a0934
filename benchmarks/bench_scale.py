"""How PGD generation time grows with images and steps, through the pipeline's own stages
(prepare, shards written to Zarr with markers, finalize), on CPU by default.

    python benchmarks/bench_scale.py [--images 1000 2000 4000] [--steps 10 20 40] [--device cpu]

Fits time = a + b * (images * steps) by least squares and prints b (the per-image-step cost), a
(fixed cost per set), and each run's cost per image-step: if the pipeline added anything growing
faster than linearly, the last column would rise with size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from advfeatures.config import resolve  # noqa: E402
from advfeatures.synthetic import make_arrays, write_cifar_tar  # noqa: E402
from benchmarks.common import machine  # noqa: E402
from pipeline import stages  # noqa: E402
from pipeline.plan import make_plan  # noqa: E402
from pipeline.stages.dataset import source_sha256  # noqa: E402
from storage.store import Store  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, nargs="+", default=[1000, 2000, 4000])
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40])
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="advfeatures-scale-"))
    tar = write_cifar_tar(tmp / "cifar-10-python.tar.gz", make_arrays(n_train=max(a.images), n_test=100))
    base = ["source.train.epochs=1", "construct.sets=[rand]", "construct.shard_size=500",
            "construct.chunk_size=250", f"runtime.device={a.device}", "runtime.attack_batch_size=250"]
    runs = [(n, a.steps[0]) for n in a.images] + [(a.images[0], s) for s in a.steps[1:]]
    rows = []
    for n, steps in runs:
        cfg = resolve("demo", base + [f"construct.n_images={n}", f"attack.steps={steps}"], data=str(tar),
                      store=str(tmp / "store"))
        st, plan = Store(cfg.runtime.store), make_plan(cfg, source_sha256(tar))
        stages.ingest(st, cfg.data, plan.dataset)
        stages.train_model(st, plan.source, cfg.runtime)
        spec = plan.constructs["rand"]
        t0 = time.perf_counter()
        stages.generate(st, spec, cfg.runtime)
        rows.append((n, steps, time.perf_counter() - t0))
    work = np.array([n * s for n, s, _ in rows], float)
    secs = np.array([t for *_, t in rows])
    (b, a0), *_ = np.linalg.lstsq(np.stack([work, np.ones_like(work)], 1), secs, rcond=None)
    print(f"# PGD generation through the pipeline; {machine(a.device)}")
    print(f"{'images':>7} {'steps':>6} {'seconds':>8} {'ms/image-step':>14} {'fit residual':>13}")
    for (n, s, t), w in zip(rows, work):
        print(f"{n:>7} {s:>6} {t:>8.2f} {1e3 * t / w:>14.3f} {t - (a0 + b * w):>+13.2f}")
    r2 = 1 - ((secs - a0 - b * work) ** 2).sum() / ((secs - secs.mean()) ** 2).sum()
    print(f"# fit: time = {a0:.2f} s + {1e3 * b:.3f} ms x images x steps ({1 / b:.0f} image-steps/s); R^2 = {r2:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
