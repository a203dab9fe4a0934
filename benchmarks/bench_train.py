"""Student-training throughput: ours (dataset resident on the device as uint8, crop+flip on the
batch tensor, channels_last) vs a plain DataLoader + torchvision-transforms loop (PIL images,
RandomCrop(32, 4) + RandomHorizontalFlip + ToTensor per sample), same model, batch and optimiser.

    python benchmarks/bench_train.py [--model small_cnn] [--images 10000] [--batch 128]
                                     [--device auto] [--workers 0 2] [--amp]

Prints images/s, achieved GFLOP/s (one training image = 3x the forward FLOPs) and the ratio.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from advfeatures.config import TrainConfig  # noqa: E402
from advfeatures.synthetic import make_arrays  # noqa: E402
from advfeatures.training import fit  # noqa: E402
from benchmarks.common import forward_flops, machine, model, pick_device  # noqa: E402


class PILDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray):
        import torchvision.transforms as T

        self.images = images.transpose(0, 2, 3, 1)  # (N, H, W, C) as PIL wants
        self.labels = labels
        self.tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.tf(Image.fromarray(self.images[i])), int(self.labels[i])


def dataloader_epoch(m, ds, batch: int, workers: int, device: str, cfg: TrainConfig) -> float:
    opt = torch.optim.SGD(m.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                         pin_memory=device.startswith("cuda"))
    m.train()
    t0 = time.perf_counter()
    for xb, yb in loader:
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        loss = F.cross_entropy(m(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--amp", action="store_true", help="also time ours under bf16 autocast")
    a = p.parse_args(argv)
    device = pick_device(a.device)
    x, y, _, _ = make_arrays(n_train=a.images, n_test=1, seed=2)
    base = model(a.model, device)
    flops = 3 * forward_flops(base)
    cfg = TrainConfig(epochs=1, batch_size=a.batch, lr=0.05, augment=True, schedule="constant")
    print(f"# training {a.model}, {a.images} images, batch {a.batch}, crop+flip, SGD; {machine(device)}")
    rows = []
    fit(copy.deepcopy(base), torch.from_numpy(x[:512]), torch.from_numpy(y[:512]), cfg, device, True)  # warm-up
    variants = [("ours (resident, channels_last)", dict(channels_last=True)), ("ours, contiguous", {})]
    if a.amp:
        variants.append(("ours bf16 autocast", dict(channels_last=True, amp_dtype=torch.bfloat16)))
    for name, kw in variants:
        r = fit(copy.deepcopy(base), torch.from_numpy(x), torch.from_numpy(y), cfg, device, **kw)
        rows.append((name, a.images / r.seconds))
    ds = PILDataset(x, y)
    for w in a.workers:
        secs = dataloader_epoch(copy.deepcopy(base), ds, a.batch, w, device, cfg)
        rows.append((f"DataLoader+transforms, {w} workers", a.images / secs))
    best_peer = max(r for n, r in rows if n.startswith("DataLoader"))
    print(f"{'method':<36} {'images/s':>9} {'GFLOP/s':>8} {'vs best DataLoader':>19}")
    for name, rate in rows:
        print(f"{name:<36} {rate:>9.0f} {rate * flops / 1e9:>8.1f} {rate / best_peer:>18.2f}x")
    print(f"# ours/DataLoader: {rows[0][1] / best_peer:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
