"""Constructed training sets of section 3.2 and of Wallace (2019).

    rand:   t ~ U{0..C-1}                       (about 1/C of rows keep t = y)
    other:  t = (y + U{1..C-1}) mod C           (t != y always)
    det:    t = (y + 1) mod C
    errors: unmodified images, relabelled with a teacher's prediction, kept only where it is wrong

Targets and the subset are drawn once for the whole set from ``seed`` (numpy PCG64), so a row's
target does not depend on how the set is sharded or which worker runs which shard.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from advfeatures.attacks import pgd, threat_model
from advfeatures.config import AttackConfig
from advfeatures.training import to_unit


def choose_subset(n_total: int, n_images: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of size n_images (0 or >= n_total: all rows)."""
    if n_images <= 0 or n_images >= n_total:
        return np.arange(n_total, dtype=np.int64)
    rng = np.random.default_rng([seed, 0xC0FFEE])
    return np.sort(rng.choice(n_total, size=n_images, replace=False)).astype(np.int64)


def make_targets(kind: str, y: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 0x7A6])
    if kind == "rand":
        return rng.integers(0, num_classes, size=y.shape[0]).astype(np.int64)
    if kind == "other":
        return ((y + rng.integers(1, num_classes, size=y.shape[0])) % num_classes).astype(np.int64)
    if kind == "det":
        return ((y + 1) % num_classes).astype(np.int64)
    raise ValueError(f"no PGD targets for set kind {kind!r}; expected rand, other or det")


def attack_block(model: nn.Module, images: np.ndarray, targets: np.ndarray, attack: AttackConfig,
                 device: torch.device | str = "cpu", batch_size: int = 250, seed: int = 0,
                 channels_last: bool = False, amp_dtype: torch.dtype | None = None) -> dict[str, np.ndarray]:
    """Targeted PGD on a block of uint8 images (N,C,H,W). Returns float32 x and per-row records."""
    device = torch.device(device)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    threat = threat_model(attack.norm, attack.eps)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    out = {k: [] for k in ("x", "fooled", "loss", "norm")}
    for s in range(0, images.shape[0], batch_size):
        xb = to_unit(torch.from_numpy(images[s:s + batch_size]).to(device))
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        tb = torch.from_numpy(targets[s:s + batch_size]).to(device)
        r = pgd(model, xb, tb, threat, attack.steps, attack.step_size, use_best=attack.use_best,
                random_start=attack.random_start, generator=gen, amp_dtype=amp_dtype)
        out["x"].append(r.x.contiguous().cpu().numpy())
        out["fooled"].append(r.fooled.cpu().numpy())
        out["loss"].append(r.loss.cpu().numpy())
        out["norm"].append(r.norm.cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def select_errors(pred: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices where the teacher is wrong, and its (wrong) predictions there."""
    idx = np.flatnonzero(pred != y).astype(np.int64)
    return idx, pred[idx].astype(np.int64)
