"""Targeted projected gradient descent (Madry et al. 2018), written once for every norm.

For a target t, each step descends the target cross-entropy L(x) = CE(f(x), t):

    L2:   x <- x - alpha * g / ||g||_2       (per example)
    Linf: x <- x - alpha * sign(g)
    then  delta <- Proj_{||delta|| <= eps}(x - x0),  x <- clamp(x0 + delta, 0, 1)

The model is put in eval mode and its weights frozen for the attack (restored afterwards); the
gradient is taken w.r.t. the input only. With ``use_best`` the result is, per example, the
iterate with the lowest target loss among all iterates, the start included.

With ``amp_dtype`` (e.g. torch.bfloat16) only the model runs under autocast: x, delta, the
gradient step and the projection stay in fp32 (bf16 resolves pixels to ~0.003, close to the mean
per-pixel perturbation), and the returned loss and fooled flags are re-computed in fp32.
The loop never synchronises with the host.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


def _norms(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1)  # (B,)


def _bcast(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s.view(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class L2:
    eps: float

    def step(self, x: torch.Tensor, g: torch.Tensor, alpha: float) -> torch.Tensor:
        return x - alpha * g / _bcast(_norms(g).clamp_min(1e-12), g)

    def project(self, delta: torch.Tensor) -> torch.Tensor:
        n = _norms(delta)
        scale = torch.where(n > self.eps, self.eps / n.clamp_min(1e-12), torch.ones_like(n))
        return delta * _bcast(scale, delta)

    def random_start(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Uniform direction, radius eps * U^(1/d): uniform in the ball."""
        d = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        d = d / _bcast(_norms(d).clamp_min(1e-12), d)
        r = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype) ** (1.0 / x[0].numel())
        return d * _bcast(r * self.eps, d)

    def size(self, delta: torch.Tensor) -> torch.Tensor:
        return _norms(delta)


@dataclass(frozen=True)
class Linf:
    eps: float

    def step(self, x: torch.Tensor, g: torch.Tensor, alpha: float) -> torch.Tensor:
        return x - alpha * g.sign()

    def project(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.clamp(-self.eps, self.eps)

    def random_start(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (2 * u - 1) * self.eps

    def size(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.flatten(1).abs().amax(dim=1)


THREATS = {"l2": L2, "linf": Linf}


def threat_model(norm: str, eps: float):
    if norm not in THREATS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {sorted(THREATS)}")
    return THREATS[norm](eps)


def advance(threat, x: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, step_size: float) -> torch.Tensor:
    """One descent step of ``threat``'s normalised kind from x, projected into its ball around x0
    and clamped to [0, 1]: the update of every iterative attack here (PGD, bugs-only, inversion)."""
    return (x0 + threat.project(threat.step(x.detach(), grad, step_size) - x0)).clamp(0, 1)


@dataclass
class PGDResult:
    x: torch.Tensor       # (B, C, H, W) adversarial images, float32, in [0, 1]
    fooled: torch.Tensor  # (B,) bool: the model predicts the target at x
    loss: torch.Tensor    # (B,) float32: target cross-entropy at x
    norm: torch.Tensor    # (B,) float32: ||x - x0|| in the threat model's norm


@contextlib.contextmanager
def frozen_eval(model: nn.Module):
    """Eval mode and requires_grad=False on every parameter, restored on exit."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def pgd(model: nn.Module, x: torch.Tensor, target: torch.Tensor, threat, steps: int, step_size: float,
        use_best: bool = True, random_start: bool = False,
        generator: torch.Generator | None = None, amp_dtype: torch.dtype | None = None,
        start: torch.Tensor | None = None, fp32_records: bool = True, untargeted: bool = False) -> PGDResult:
    """Targeted PGD on a batch. ``x`` (B,C,H,W) in [0, 1]; ``target`` (B,) int64 class indices.
    With ``untargeted``, ``target`` is the true label and PGD maximises its loss instead (``fooled``:
    the prediction differs from it; ``use_best`` keeps the iterate of largest loss).

    The first iterate is x, or with ``random_start`` x plus a random point of the threat ball drawn
    with ``generator``, or x plus ``start`` (B,C,H,W) when given (projected, clamped to [0, 1]):
    callers that need per-row randomness independent of the batch pass ``start``.
    With ``amp_dtype``, loss and fooled are recomputed in fp32 at the end unless ``fp32_records``
    is False (for callers that compute their own records, e.g. on the images as stored)."""
    x0 = x.detach().float()
    target = target.to(x0.device)
    if start is None and random_start:
        start = threat.random_start(x0, generator)

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(x0.device.type, dtype=amp_dtype)

    with frozen_eval(model):
        xa = x0
        if start is not None:
            xa = (x0 + threat.project(start.to(x0))).clamp(0, 1)
        best_x, best_loss, best_pred = x0, None, None
        for i in range(steps + 1):
            last = i == steps
            xa = xa.detach().requires_grad_(not last)
            with torch.set_grad_enabled(not last):
                with autocast():
                    logits = model(xa)
                loss = F.cross_entropy(logits.float(), target, reduction="none")  # (B,) fp32
                objective = -loss if untargeted else loss  # minimised
            if not last:
                (grad,) = torch.autograd.grad(objective.sum(), xa)
            obj_d, pred = objective.detach(), logits.detach().argmax(1)
            if best_loss is None or not use_best:
                best_x, best_loss, best_pred = xa.detach(), obj_d, pred
            else:
                better = obj_d < best_loss
                best_x = torch.where(_bcast(better, xa), xa.detach(), best_x)
                best_loss = torch.where(better, obj_d, best_loss)
                best_pred = torch.where(better, pred, best_pred)
            if not last:
                xa = advance(threat, xa, x0, grad, step_size)
        if amp_dtype is not None and fp32_records:  # the records must not depend on low-precision logits
            with torch.no_grad():
                logits = model(best_x).float()
            best_loss = F.cross_entropy(logits, target, reduction="none")
            best_pred = logits.argmax(1)
        elif untargeted:
            best_loss = -best_loss
    fooled = best_pred != target if untargeted else best_pred == target
    return PGDResult(x=best_x, fooled=fooled, loss=best_loss.float(), norm=threat.size(best_x - x0).float())


def robust_predictions(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat, steps: int, step_size: float,
                       batch_size: int = 500, device: torch.device | str = "cpu",
                       amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(N,) predictions on untargeted PGD adversarial examples of x (uint8 or [0, 1] floats) with
    true labels y, no random start: the iterate with the largest loss on the true label."""
    device = torch.device(device)
    model = model.to(device)
    out = []
    for s in range(0, len(y), batch_size):
        xb = x[s:s + batch_size].to(device)
        xb = xb.float().div(255.0) if xb.dtype == torch.uint8 else xb.float()
        yb = y[s:s + batch_size].to(device)
        r = pgd(model, xb, yb, threat, steps, step_size, use_best=True, amp_dtype=amp_dtype, untargeted=True)
        with torch.no_grad(), frozen_eval(model):
            out.append(model(r.x).float().argmax(1).cpu())
    return torch.cat(out)


def strongest_predictions(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat, steps: int, step_size: float,
                          restarts: int, seed: int = 0, batch_size: int = 500, device: torch.device | str = "cpu",
                          amp_dtype: torch.dtype | None = None, alive: torch.Tensor | None = None,
                          prior: torch.Tensor | None = None) -> torch.Tensor:
    """(1 + restarts, N) predictions on untargeted PGD adversarial examples of x: row 0 from the
    image (no random start), row r from a random start in the threat ball, each restart's start
    drawn from a CPU generator seeded with ``seed + r`` over the whole of x (the same starts
    whatever the batch size or the points attacked). A point is robust to the strongest attack
    when every row predicts its label: the check that a robust accuracy is not an artefact of a
    weak attack. Each attack runs only on the points that no earlier one fooled (and that
    ``alive``, a boolean mask, keeps): a fooled point's later rows repeat its fooling prediction
    (for a point ``alive`` leaves out: its ``prior`` prediction, else its label), so the
    robust-to-all answer is that of attacking every point, at a fraction of the cost."""
    device = torch.device(device)
    model = model.to(device)
    x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
    alive = torch.ones(len(y), dtype=torch.bool) if alive is None else alive.clone()
    out, last = [], (y if prior is None else prior).clone()
    for r in range(restarts + 1):
        start = None if r == 0 else threat.random_start(x, torch.Generator().manual_seed(seed + r))
        pred, idx = last.clone(), alive.nonzero().flatten()
        for s in range(0, len(idx), batch_size):
            i = idx[s:s + batch_size]
            xb, yb = x[i].to(device), y[i].to(device)
            sb = None if start is None else start[i].to(device)
            adv = pgd(model, xb, yb, threat, steps, step_size, use_best=True, amp_dtype=amp_dtype, untargeted=True,
                      start=sb)
            with torch.no_grad(), frozen_eval(model):
                pred[i] = model(adv.x).float().argmax(1).cpu()
        alive &= pred == y
        out.append(pred)
        last = pred
    return torch.stack(out)


def bugs_only_pgd(model: nn.Module, ensemble: list[nn.Module], x: torch.Tensor, target: torch.Tensor,
                  y: torch.Tensor, threat, steps: int, step_size: float) -> PGDResult:
    """Nakkiran's "adversarial examples that are only bugs" (Distill 2019): PGD that descends on
    L(f, x, t) + mean_i L(f_i, x, y), so it moves ``model`` toward ``target`` while an ensemble
    of independently trained models keeps the true label ``y``: the perturbation exploits what is
    particular to ``model`` (its bugs), not features that other models share. Normalised steps in
    ``threat``'s norm from x, clamped to [0, 1]; the last iterate is returned. Records are the
    source's: ``fooled`` (it predicts ``target``), ``loss`` (its target cross-entropy)."""
    if not ensemble:
        raise ValueError("bugs_only_pgd needs an ensemble of at least one model")
    x0 = x.detach().float()
    target, y = target.to(x0.device), y.to(x0.device)
    with contextlib.ExitStack() as stack:
        for m in (model, *ensemble):
            stack.enter_context(frozen_eval(m))
        xa = x0
        for _ in range(steps):
            xa = xa.detach().requires_grad_(True)
            objective = F.cross_entropy(model(xa).float(), target, reduction="sum")
            keep = sum(F.cross_entropy(m(xa).float(), y, reduction="sum") for m in ensemble) / len(ensemble)
            (grad,) = torch.autograd.grad(objective + keep, xa)
            xa = advance(threat, xa, x0, grad, step_size)
        with torch.no_grad():
            logits = model(xa).float()
    loss = F.cross_entropy(logits, target, reduction="none")
    return PGDResult(x=xa.detach(), fooled=logits.argmax(1) == target, loss=loss, norm=threat.size(xa - x0).float())
