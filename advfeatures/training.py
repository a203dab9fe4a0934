"""Training and evaluation loops over tensors resident on the device.

Images arrive as uint8 (0..255) or floating point in [0, 1], shape (N, C, H, W); batches are
cast to float32 on the device, so there are no per-batch host copies. Augmentation (random crop
with 4 px zero padding + horizontal flip) is done on the batch tensor with a seeded generator.
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

from advfeatures.config import TrainConfig

Callback = Callable[[dict], None]


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 or float [0,1] -> float32 [0,1]."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip of a (B, C, H, W) float batch."""
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dev = x.device
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # (B,1,H,1)
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # (B,1,1,W)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    out = xp[bi, ci, rows, cols]
    flip = torch.rand(b, generator=generator, device=dev) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "step":
        return lambda it: cfg.gamma ** (it // (cfg.step_epochs * steps_per_epoch))
    if cfg.schedule == "onecycle":
        up = max(1, int(cfg.warmup * total))
        return lambda it: (it + 1) / up if it < up else max(0.0, (total - it) / max(1, total - up))
    return lambda it: 1.0


def _generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


@dataclass
class FitResult:
    seconds: float
    images_per_second: float
    history: list[dict]


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
        device: torch.device | str = "cpu", channels_last: bool = False,
        callback: Callback | None = None, amp_dtype: torch.dtype | None = None,
        forward: nn.Module | None = None) -> FitResult:
    """Train ``model`` in place with SGD on (x, y). Seeded by ``cfg.seed`` (shuffle + augment).

    Weight decay applies to every parameter, as in the paper's recipe (torch SGD semantics).
    ``amp_dtype`` runs forward/backward under autocast (the loss and the weights stay fp32);
    ``forward`` is an optional compiled wrapper of ``model`` used for the forward pass.
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
    gen = _generator(cfg.seed, device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, steps_per_epoch))
    history, t0 = [], time.perf_counter()
    model.train()
    for epoch in range(cfg.epochs):
        te = time.perf_counter()
        perm = torch.randperm(n, generator=gen, device=device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for s in range(steps_per_epoch):
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            xb, yb = to_unit(x[idx]), y[idx]
            if cfg.augment:
                xb = augment_batch(xb, gen)
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
        event = {"epoch": epoch + 1, "epochs": cfg.epochs, "train_loss": loss_sum.item() / n,
                 "train_acc": correct.item() / n, "lr": opt.param_groups[0]["lr"],
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
    return (max(0.0, centre - half), min(1.0, centre + half))
