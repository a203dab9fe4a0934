"""The cost of each experiment of the debate at paper scale, EXTRAPOLATED from per-image costs
measured here: images/s of a training step and of an input-gradient step (frozen weights, what PGD
and inversion do) for each architecture the paper scale uses, times the number of such passes the
paper-scale plan holds. Nothing at paper scale is run; the counts are written out below.

    python benchmarks/paper_cost.py [--device cpu|cuda] [--batch 64] [--amp]

One CSV line per measurement, then one per experiment: passes (millions) and hours on this device.
Ignores data loading, evaluation and orchestration (small beside these passes at paper scale).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, model as make_model, timed  # noqa: E402

N = 50_000          # CIFAR-10 training images
E = 150             # the paper's epochs for sources and students (SCIENCE.md)
PGD = 100           # section 3.2's PGD steps
ADV = 7             # the robustness library's adversarial-training steps


def workloads() -> dict[str, list[tuple[str, str, float]]]:
    """experiment -> [(arch, 'train' | 'grad' | 'adv', passes)]: 'train' a training step of one
    image, 'grad' an input-gradient step in eval mode, 'adv' one in train mode (adversarial
    training's attack)."""
    r50, r18 = "resnet50", "resnet18"
    return {
        # source; rand, other, det (100 steps each); errors: 2-epoch teacher and its ~18,768 errors;
        # 3 + 1 students of 150 epochs (one seed)
        "replicate": [(r50, "train", E * N), (r50, "grad", 3 * N * PGD), (r50, "train", 2 * N),
                      (r50, "train", 3 * E * N + E * 18_768)],
        # the robust source (7-step L2 PGD per batch), D_R and D_NR (1,000 inversion steps each),
        # 2 students; the standard source is replicate's
        "robust-datasets": [(r50, "train", E * N), (r50, "adv", ADV * E * N), (r50, "grad", 2 * N * 1000),
                            (r50, "train", 2 * E * N)],
        # ResNet-18 source, ensemble of 10 and a held-out model; det (10 steps) and bugs-only (10
        # steps through the source and 10 members); 2 students
        "bugs-only": [(r18, "train", 12 * E * N), (r18, "grad", N * 10 + N * 10 * 11), (r18, "train", 2 * E * N)],
        # per architecture (ResNet-18 and ResNet-50 stand for the paper's five): an independent model
        # and a det student; the source and its det are replicate's
        "transfer": [(r18, "train", 2 * E * N), (r50, "train", 2 * E * N), (r50, "train", 3 * 2 * E * N)],
        # 4 robust sources (eps 0.05 .. 0.5, 7 steps), det and rand of each of the 5 (100 steps),
        # 10 students, an independent model; the standard source is replicate's
        "spectrum": [(r50, "train", 4 * E * N), (r50, "adv", 4 * ADV * E * N), (r50, "grad", 10 * N * PGD),
                     (r50, "train", 10 * E * N), (r50, "train", E * N)],
        # the poison set is det's, relabelled: 2 students (poison, clean)
        "poison": [(r50, "train", 2 * E * N)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (on CPUs with AVX-512 BF16, or a GPU)")
    args = ap.parse_args()
    dev = args.device
    rate: dict[tuple[str, str], float] = {}
    print(f"# {machine(dev)}\narch,pass,images_per_s")
    for arch in ("resnet18", "resnet50"):
        model = make_model(arch, dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = torch.rand(args.batch, 3, 32, 32, device=dev)
        y = torch.randint(0, 10, (args.batch,), device=dev)
        ctx = (lambda: torch.autocast(dev.split(":")[0], dtype=torch.bfloat16)) if args.amp else \
            (lambda: torch.autocast(dev.split(":")[0], enabled=False))

        def train_step():
            model.train()
            opt.zero_grad(set_to_none=True)
            with ctx():
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

        def grad_step(train_mode: bool):
            model.train(train_mode)
            xr = x.clone().requires_grad_(True)
            with ctx():
                loss = torch.nn.functional.cross_entropy(model(xr), y)
            torch.autograd.grad(loss, xr)

        for name, fn in (("train", train_step), ("grad", lambda: grad_step(False)), ("adv", lambda: grad_step(True))):
            seconds, _ = timed(fn, repeats=2, warmup=1, device=dev, min_seconds=2.0)
            rate[(arch, name)] = args.batch / seconds
            print(f"{arch},{name},{rate[(arch, name)]:.1f}", flush=True)
    print("\nexperiment,passes_millions,hours_on_this_device (extrapolated)")
    total = 0.0
    for exp, items in workloads().items():
        hours = sum(p / rate[(a, k)] for a, k, p in items) / 3600
        total += hours
        print(f"{exp},{sum(p for _, _, p in items) / 1e6:.1f},{hours:.0f}")
    print(f"debate (all six, shared source),,{total:.0f}")


if __name__ == "__main__":
    main()
