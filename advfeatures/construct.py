"""Constructed training sets of section 3.2 and of Wallace (2019).

    rand:   t ~ U{0..C-1}                       (about 1/C of rows keep t = y)
    other:  t = (y + U{1..C-1}) mod C           (t != y always)
    det:    t = (y + 1) mod C
    errors: unmodified images, relabelled with a teacher's prediction, kept only where it is wrong
    inversion (section 3.1): from another training image, the image whose representation matches
            the goal image's (D_R with a robust model, D_NR with a standard one), labelled y_goal

Targets and the subset are drawn once for the whole set from ``seed`` (numpy PCG64), and a row's
random start (if any) from ``seed`` and the row's image index, so nothing about a row depends on
how the set is sharded or batched, or which worker runs which shard. The records stored beside
each row (fooled, loss, norm) describe the image as stored (float16 after rounding), not the
fp32 iterate.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from advfeatures.attacks import frozen_eval, pgd, threat_model
from advfeatures.config import AttackConfig
from advfeatures.seeds import cpu_generator, derive_seed
from advfeatures.training import to_unit


def choose_subset(n_total: int, n_images: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of size n_images (0 or >= n_total: all rows)."""
    if n_images <= 0 or n_images >= n_total:
        return np.arange(n_total, dtype=np.int64)
    rng = np.random.default_rng([seed, 0xC0FFEE])
    return np.sort(rng.choice(n_total, size=n_images, replace=False)).astype(np.int64)


def make_targets(kind: str, y: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """Targets of set ``kind`` (rand, other or det) for true labels ``y``, drawn from ``seed``."""
    rng = np.random.default_rng([seed, 0x7A6])
    if kind == "rand":
        return rng.integers(0, num_classes, size=y.shape[0]).astype(np.int64)
    if kind == "other":
        return ((y + rng.integers(1, num_classes, size=y.shape[0])) % num_classes).astype(np.int64)
    if kind == "det":
        return ((y + 1) % num_classes).astype(np.int64)
    raise ValueError(f"no PGD targets for set kind {kind!r}; expected rand, other or det")


def leak_patterns(num_classes: int, shape: tuple[int, ...], norm: str, eps: float, seed: int) -> torch.Tensor:
    """(C, *shape): one fixed random pattern per class, of L2 norm eps (l2) or entries +-eps
    (linf), drawn on the CPU from derive_seed("leak", seed, class)."""
    out = torch.empty((num_classes, *shape))
    for c in range(num_classes):
        z = torch.randn(shape, generator=cpu_generator(derive_seed("leak", seed, c)))
        out[c] = z * (eps / z.norm()) if norm == "l2" else z.sign() * eps
    return out


def add_leak(images: torch.Tensor, targets: torch.Tensor, patterns: torch.Tensor,
             keep: torch.Tensor | None = None) -> torch.Tensor:
    """Float images in [0, 1] plus their target's pattern, clipped to [0, 1]; rows where ``keep``
    is true stay unperturbed."""
    x = (images + patterns[targets]).clamp_(0, 1)
    if keep is not None:
        x[keep] = images[keep]
    return x


@torch.no_grad()
def pattern_block(model: nn.Module, images: np.ndarray, targets: np.ndarray, threat, device: torch.device | str,
                  batch_size: int, store_dtype: str, patterns: torch.Tensor | None = None,
                  unperturbed: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """No attack: uint8 images (N,C,H,W) plus their target's fixed pattern (``patterns``, (C, ...);
    None: the images as they are), rows where ``unperturbed`` is true left clean, stored as
    ``store_dtype``, with the records under ``model`` computed on the stored images as for PGD
    (fooled, loss, norm, margin)."""
    sdtype = getattr(torch, store_dtype)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("x", "fooled", "loss", "norm", "margin")}
    for s in range(0, len(targets), batch_size):
        x0 = to_unit(torch.from_numpy(images[s:s + batch_size]))
        tb = torch.from_numpy(targets[s:s + batch_size])
        x = x0.clone()
        if patterns is not None:
            keep = torch.from_numpy(unperturbed[s:s + batch_size]) if unperturbed is not None else None
            x = add_leak(x0, tb, patterns, keep)
        xs, rec = stored_records(model, x0.to(device), x.to(device), tb.to(device), threat, sdtype)
        out["x"].append(xs.to(sdtype).cpu().numpy())
        for k, v in rec.items():
            out[k].append(v.cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def random_starts(threat, shape: tuple[int, ...], seed: int, rows: np.ndarray) -> torch.Tensor:
    """One random start per row (len(rows), *shape), each drawn on the CPU from
    derive_seed("start", seed, *row): the same for a row whatever shard or batch it falls in.
    ``rows`` is (N,) image indices, or (N, 2) (image index, copy) for augmented copies."""
    out = torch.empty((len(rows), *shape))
    for i, r in enumerate(rows):
        parts = [int(v) for v in np.atleast_1d(r)]
        out[i] = threat.random_start(torch.zeros(1, *shape), cpu_generator(derive_seed("start", seed, *parts)))[0]
    return out


def copy_rows(idx: np.ndarray, copies: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a set with ``copies`` augmented copies per image (0 = none, one row per image):
    (image index, copy number) per row, an image's copies consecutive."""
    if copies <= 0:
        return np.asarray(idx, np.int64), np.zeros(len(idx), np.int64)
    return np.repeat(idx, copies).astype(np.int64), np.tile(np.arange(copies, dtype=np.int64), len(idx))


def copy_params(seed: int, idx: np.ndarray, copy: np.ndarray, pad: int = 4) -> np.ndarray:
    """(N, 3) int: crop offsets (oy, ox) in [0, 2*pad] and flip (0/1) of each augmented copy, drawn
    on the CPU from derive_seed("copy", seed, image index, copy)."""
    out = np.empty((len(idx), 3), np.int64)
    for n, (i, j) in enumerate(zip(idx, copy)):
        g = cpu_generator(derive_seed("copy", seed, int(i), int(j)))
        out[n, :2] = torch.randint(0, 2 * pad + 1, (2,), generator=g).numpy()
        out[n, 2] = int(torch.rand(1, generator=g).item() < 0.5)
    return out


def crop_flip(images: np.ndarray, params: np.ndarray, pad: int = 4) -> np.ndarray:
    """Apply (oy, ox, flip) per image to (N, C, H, W) images: a crop of the image zero-padded by
    ``pad``, then a horizontal flip where flip = 1 (the training augmentation crop_flip, fixed)."""
    n, c, h, w = images.shape
    padded = np.zeros((n, c, h + 2 * pad, w + 2 * pad), images.dtype)
    padded[:, :, pad:pad + h, pad:pad + w] = images
    out = np.empty_like(images)
    for k, (oy, ox, flip) in enumerate(params):
        crop = padded[k, :, oy:oy + h, ox:ox + w]
        out[k] = crop[:, :, ::-1] if flip else crop
    return out


@torch.no_grad()
def stored_records(model: nn.Module, x0: torch.Tensor, x: torch.Tensor, target: torch.Tensor, threat,
                   store_dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Round adversarial images ``x`` to the storage dtype and compute the records on what is
    stored, in fp32: whether the model predicts the target, the target loss, ||x_stored - x0||,
    and the target margin logit_t - max_{j != t} logit_j (> 0 exactly when fooled, up to ties)."""
    xs = x.to(store_dtype).float()
    with frozen_eval(model):
        logits = model(xs).float()
    return xs, {"fooled": logits.argmax(1) == target, "loss": F.cross_entropy(logits, target, reduction="none"),
                "norm": threat.size(xs - x0).float(), "margin": target_margin(logits, target)}


def target_margin(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) logit of the target minus the largest other logit."""
    t = logits.gather(1, target[:, None])[:, 0]
    others = logits.scatter(1, target[:, None], float("-inf"))
    return t - others.amax(1)


def attack_block(model: nn.Module, images: np.ndarray, targets: np.ndarray, attack: AttackConfig,
                 device: torch.device | str = "cpu", batch_size: int = 250, seed: int = 0,
                 channels_last: bool = False, amp_dtype: torch.dtype | None = None,
                 rows: np.ndarray | None = None, store_dtype: str = "float32",
                 on_batch: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """Targeted PGD on a block of uint8 images (N,C,H,W). Returns x as it will be stored
    (``store_dtype``) and the per-row records (fooled, loss, norm, margin) computed on those stored images.

    ``rows`` (N,) identifies each row (its training-image index) for its random start, drawn from
    ``seed`` and the row alone; defaults to 0..N-1. ``on_batch(rows_done, N)`` is called after each
    batch (progress displays; it sees counts only, so it cannot change a result)."""
    device = torch.device(device)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    threat = threat_model(attack.norm, attack.eps)
    rows = np.arange(images.shape[0]) if rows is None else np.asarray(rows)
    sdtype = getattr(torch, store_dtype)
    out = {k: [] for k in ("x", "fooled", "loss", "norm", "margin")}
    for s in range(0, images.shape[0], batch_size):
        xb = to_unit(torch.from_numpy(images[s:s + batch_size]).to(device))
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        tb = torch.from_numpy(targets[s:s + batch_size]).to(device)
        start = None
        if attack.random_start:
            start = random_starts(threat, tuple(xb.shape[1:]), seed, rows[s:s + batch_size]).to(device)
        r = pgd(model, xb, tb, threat, attack.steps, attack.step_size, use_best=attack.use_best,
                start=start, amp_dtype=amp_dtype, fp32_records=False)  # records: on the stored images, below
        xs, rec = stored_records(model, xb, r.x, tb, threat, sdtype)
        out["x"].append(xs.to(sdtype).contiguous().cpu().numpy())
        for k, v in rec.items():
            out[k].append(v.cpu().numpy())
        if on_batch is not None:
            on_batch(min(s + batch_size, images.shape[0]), images.shape[0])
    return {k: np.concatenate(v) for k, v in out.items()}


def inversion_starts(goals: np.ndarray, n_total: int, seed: int) -> np.ndarray:
    """For each goal image index, the index of its start image: uniform over the other training
    images, independent of labels, drawn once from ``seed`` (never the goal itself)."""
    if n_total < 2:
        raise ValueError("inversion needs at least 2 training images (a start other than the goal)")
    rng = np.random.default_rng([seed, 0x1F0E])
    starts = rng.integers(0, n_total - 1, size=len(goals))
    return (starts + (starts >= goals)).astype(np.int64)  # skip the goal: uniform over the rest


def invert_block(model: nn.Module, goals: np.ndarray, starts: np.ndarray, targets: np.ndarray, steps: int,
                 step_size: float, radius: float | None = None, device: torch.device | str = "cpu",
                 batch_size: int = 250, amp_dtype: torch.dtype | None = None, store_dtype: str = "float32",
                 channels_last: bool = False,
                 on_batch: Callable[[int, int], None] | None = None,
                 trace_at: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    """Representation inversion of a block: for goal images and start images (uint8, N,C,H,W),
    ``advfeatures.inversion.invert`` from each start toward its goal's representation. Returns x
    as stored and, computed on the stored images in fp32, the records of a constructed set toward
    ``targets`` (the goals' labels: fooled = the model predicts it, loss, margin), norm = ||x -
    start||_2, and the representation distances to the goal at the start and at x
    (``start_distance``, ``distance``); with ``trace_at``, ``trace`` (N, K): the smallest distance
    after each of those step counts, as the inversion computed it."""
    from advfeatures.attacks import L2
    from advfeatures.inversion import invert, represent

    device = torch.device(device)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    sdtype = getattr(torch, store_dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = {k: [] for k in ("x", "fooled", "loss", "norm", "margin", "distance", "start_distance",
                           *(("trace",) if trace_at else ()))}
    for s in range(0, goals.shape[0], batch_size):
        xg = to_unit(torch.from_numpy(goals[s:s + batch_size]).to(device)).contiguous(memory_format=fmt)
        x0 = to_unit(torch.from_numpy(starts[s:s + batch_size]).to(device)).contiguous(memory_format=fmt)
        tb = torch.from_numpy(targets[s:s + batch_size]).to(device)
        r = invert(model, xg, x0, steps, step_size, radius=radius, amp_dtype=amp_dtype, trace_at=trace_at)
        xs, rec = stored_records(model, x0, r.x, tb, L2(float("inf")), sdtype)
        if trace_at:
            rec["trace"] = r.trace.T
        with frozen_eval(model), torch.no_grad():
            goal = represent(model, xg)
            rec["distance"] = (represent(model, xs) - goal).norm(dim=1)
            rec["start_distance"] = (represent(model, x0) - goal).norm(dim=1)
        out["x"].append(xs.to(sdtype).contiguous().cpu().numpy())
        for k, v in rec.items():
            out[k].append(v.float().cpu().numpy() if v.dtype.is_floating_point else v.cpu().numpy())
        if on_batch is not None:
            on_batch(min(s + batch_size, goals.shape[0]), goals.shape[0])
    return {k: np.concatenate(v) for k, v in out.items()}


def select_by_margin(margin: np.ndarray, fraction: float, strata: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of the rows with the largest margin: ceil(fraction * n) of the n rows of each
    stratum (ties: lower index). For rand the strata are t = y and t != y: rows whose target is
    their own label have large margins without any attack, and a selection over all rows would
    raise their share (measured: 9.9% -> 24.3% at fraction 0.4), training students on more
    correctly labelled clean images; per stratum, the share stays what it was."""
    strata = np.zeros(len(margin), bool) if strata is None else np.asarray(strata)
    keep = []
    for s in np.unique(strata):
        rows = np.flatnonzero(strata == s)
        k = max(1, int(np.ceil(fraction * len(rows) - 1e-9)))
        order = np.argsort(-margin[rows].astype(np.float64), kind="stable")
        keep.append(rows[order[:k]])
    return np.sort(np.concatenate(keep)).astype(np.int64)


def select_errors(pred: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices where the teacher is wrong, and its (wrong) predictions there."""
    idx = np.flatnonzero(pred != y).astype(np.int64)
    return idx, pred[idx].astype(np.int64)
