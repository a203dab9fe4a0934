"""Training and evaluation loops over tensors resident on the device.

Images arrive as uint8 (0..255) or floating point in [0, 1], shape (N, C, H, W); batches are
cast to float32 on the device, so there are no per-batch host copies. Augmentation (crop + flip,
or the robustness library's crop + flip + colour jitter + rotation) is done on the batch tensor;
its random numbers and the data order come from a seeded CPU generator (device-independent).
The loop knows nothing of logging: callers pass ``callback(event: dict)``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from advfeatures import attacks
from advfeatures.config import TrainConfig
from advfeatures.seeds import cpu_generator

Callback = Callable[[dict], None]


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 or float [0,1] -> float32 [0,1]."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip of a (B, C, H, W) float batch.
    The random numbers come from the CPU ``generator`` (device-independent), then move to x's device."""
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dev = x.device
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(dev)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(dev)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # (B,1,H,1)
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # (B,1,1,W)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    out = xp[bi, ci, rows, cols]
    flip = (torch.rand(b, generator=generator) < 0.5).to(dev)
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma, torchvision's rgb_to_grayscale weights."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f * a + (1 - f) * b).clamp(0, 1)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter on a batch in [0, 1]: brightness, contrast and saturation with
    per-example ``factors`` (B, 3), applied in the per-example ``order`` (B, 3), a permutation of
    0 = brightness, 1 = contrast, 2 = saturation (torchvision draws the order per call)."""
    f = factors.to(x.dtype)[:, :, None, None, None]  # (B, 3, 1, 1, 1)
    for pos in range(3):
        op = order[:, pos][:, None, None, None]  # (B,1,1,1)
        bright = _blend(x, torch.zeros_like(x), f[:, 0])
        contrast = _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f[:, 1])
        sat = _blend(x, _gray(x), f[:, 2])
        x = torch.where(op == 0, bright, torch.where(op == 1, contrast, sat))
    return x


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image of (B, C, H, W) counter-clockwise by ``degrees`` (B,) about its centre,
    nearest neighbour, zero fill: torchvision's RandomRotation defaults, batched."""
    a = torch.deg2rad(degrees.to(x.dtype))
    cos, sin = torch.cos(a), torch.sin(a)
    zero = torch.zeros_like(a)
    # output pixel -> input location in normalised coordinates (y pointing down): rotating the
    # image counter-clockwise samples it clockwise
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # (B,2,3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def robustness_augment(x: torch.Tensor, generator: torch.Generator, jitter: float = 0.25,
                       max_degrees: float = 2.0) -> torch.Tensor:
    """The robustness library's CIFAR training transforms on a batch: crop (pad 4) + flip,
    ColorJitter(jitter, jitter, jitter), RandomRotation(max_degrees). CPU-drawn randomness."""
    b = x.shape[0]
    x = augment_batch(x, generator)
    factors = 1 - jitter + 2 * jitter * torch.rand(b, 3, generator=generator)  # U[1-j, 1+j]
    order = torch.rand(b, 3, generator=generator).argsort(1)
    degrees = (2 * torch.rand(b, generator=generator) - 1) * max_degrees
    x = color_jitter(x, factors.to(x.device), order.to(x.device))
    return rotate(x, degrees.to(x.device))


AUGMENT: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "crop_flip": augment_batch, "robustness": robustness_augment}


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "step":
        return lambda it: cfg.gamma ** (it // (cfg.step_epochs * steps_per_epoch))
    if cfg.schedule == "onecycle":
        up = max(1, int(cfg.warmup * total))
        return lambda it: (it + 1) / up if it < up else max(0.0, (total - it) / max(1, total - up))
    return lambda it: 1.0


@dataclass
class FitResult:
    seconds: float
    images_per_second: float
    history: list[dict]


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
        device: torch.device | str = "cpu", channels_last: bool = False,
        callback: Callback | None = None, amp_dtype: torch.dtype | None = None,
        forward: nn.Module | None = None, seed: int | None = None, drop_single: bool = False) -> FitResult:
    """Train ``model`` in place with SGD on (x, y). Data order and augmentation are drawn from a
    CPU generator seeded by ``seed`` (default ``cfg.seed``), so they are the same on every device.

    Weight decay applies to every parameter, as in the paper's recipe (torch SGD semantics).
    ``amp_dtype`` runs forward/backward under autocast (the loss and the weights stay fp32);
    ``forward`` is an optional compiled wrapper of ``model`` used for the forward pass.
    With ``cfg.adversarial``, each step trains on untargeted PGD examples of its (augmented) batch
    made against the model as it is (``AdversarialTraining``); ``train_acc`` is then the accuracy
    on those. ``drop_single``: an epoch's last batch, when it holds one image, is left out (batch
    norm cannot train on one value per channel, as in a timm ResNet's 1x1 maps at 32x32).
    """
    device = torch.device(device)
    n = x.shape[0]
    if n == 0:
        raise ValueError("cannot train on an empty dataset")
    if y.shape[0] != n:
        raise ValueError(f"x has {n} rows but y has {y.shape[0]}")
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    x, y = x.to(device), y.to(device)
    forward = model if forward is None else forward
    gen = cpu_generator(cfg.seed if seed is None else seed)
    augment = AUGMENT.get(cfg.augment)  # None for 'none'
    adv = cfg.adversarial
    adversary = attacks.threat_model(adv.norm, adv.eps) if adv is not None else None

    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    seen = n
    if drop_single and n % cfg.batch_size == 1 and n > 1:
        steps_per_epoch, seen = steps_per_epoch - 1, n - 1
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, steps_per_epoch))
    history, t0 = [], time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()  # every epoch: a callback may have evaluated the model in between
        te = time.perf_counter()
        perm = torch.randperm(n, generator=gen).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for s in range(steps_per_epoch):
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            xb, yb = to_unit(x[idx]), y[idx]
            if augment is not None:
                xb = augment(xb, gen)
            if adversary is not None:  # in eval mode, weights frozen; train mode again after
                xb = attacks.pgd(forward, xb, yb, adversary, adv.steps, adv.step, use_best=True,
                                 amp_dtype=amp_dtype, fp32_records=False, untargeted=True).x
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
                logits = forward(xb)
            loss = F.cross_entropy(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * idx.numel()
            correct += (logits.detach().argmax(1) == yb).sum()
        event = {"epoch": epoch + 1, "epochs": cfg.epochs, "train_loss": loss_sum.item() / seen,
                 "train_acc": correct.item() / seen, "lr": opt.param_groups[0]["lr"],
                 "seconds": time.perf_counter() - te}
        if not math.isfinite(event["train_loss"]):
            raise FloatingPointError(f"training diverged at epoch {epoch + 1} (loss {event['train_loss']}); "
                                     f"lower train.lr (now {cfg.lr})")
        history.append(event)
        if callback:
            callback(event)
    model.eval()
    secs = time.perf_counter() - t0
    return FitResult(seconds=secs, images_per_second=n * cfg.epochs / max(secs, 1e-9), history=history)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1000,
            device: torch.device | str = "cpu", channels_last: bool = False) -> torch.Tensor:
    """Predicted classes (N,) int64 on the CPU, model in eval mode."""
    device = torch.device(device)
    model.to(device).eval()
    out = []
    for s in range(0, x.shape[0], batch_size):
        xb = to_unit(x[s:s + batch_size].to(device))
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        out.append(model(xb).argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def accuracy_metrics(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict:
    """Accuracy of predictions ``pred`` (N,) against the true labels Y and against Y+1 mod C (what
    a student that learned the robust features of D_det predicts), with 95% Wilson intervals."""
    pred, y = pred.cpu().long(), y.cpu().long()
    n = int(y.shape[0])
    if n == 0 or pred.shape != y.shape:
        raise ValueError(f"need one prediction per label, got {tuple(pred.shape)} for {tuple(y.shape)}")
    k_xy = int((pred == y).sum())
    k_xy1 = int((pred == (y + 1) % num_classes).sum())
    return {"n_test": n, "correct_xy": k_xy, "acc_xy": k_xy / n, "ci95_xy": list(wilson_interval(k_xy, n)),
            "correct_xy1": k_xy1, "acc_xy1": k_xy1 / n, "ci95_xy1": list(wilson_interval(k_xy1, n)),
            "chance": 1.0 / num_classes, "confusion": confusion_matrix(pred, y, num_classes)}


def confusion_matrix(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[list[int]]:
    """Counts (C, C): row = true label, column = prediction. For a det student, mass on the
    diagonal is (X, Y) accuracy and on the cyclic super-diagonal (column y+1) is (X, Y+1)."""
    flat = y.cpu().long() * num_classes + pred.cpu().long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes).tolist()


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return (pred == y.to(pred.device)).float().mean().item()


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    # the interval contains p (exactly, also at k = 0 and k = n, where rounding could leave it out)
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))
