"""Representation inversion (Ilyas et al. 2019, section 3.1): the image whose penultimate
representation matches another image's.

For a target image x and a start image x0 (another training image, chosen independently of x's
label), minimise ||g(x_r) - g(x)||_2 over x_r from x0, where g is the model's penultimate
representation (the input of its last linear layer), with normalised-gradient L2 steps, each
followed by a clamp to [0, 1]. The paper: steps of 0.1, 1,000 of them, unconstrained (the
robustness library's eps 1000). Li et al. (NeurIPS 2023) keep x_r within L2 distance 2.0 of x0
(``radius``). D_R is built with a robust model, D_NR with a standard one; x_r is labelled with x's
label. The model is frozen and in eval mode: only the input has a gradient.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from advfeatures.attacks import L2, advance, frozen_eval


@dataclass
class InversionResult:
    x: torch.Tensor      # (B, C, H, W) float32 in [0, 1]: the iterate of smallest distance
    distance: torch.Tensor  # (B,) ||g(x_r) - g(x)|| at x
    start_distance: torch.Tensor  # (B,) ||g(x0) - g(x)||
    trace: torch.Tensor | None = None  # (K, B) the smallest distance after each of ``trace_at``'s step counts


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's classifier: its last ``nn.Linear`` (every model of ``advfeatures.models``
    ends in one; its input is the penultimate representation)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer: no penultimate representation to invert")
    return linears[-1]


@contextlib.contextmanager
def representation(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While open, each forward pass of ``model`` appends its penultimate representation (B, D)
    to the yielded list."""
    seen: list[torch.Tensor] = []
    handle = last_linear(model).register_forward_hook(lambda _m, args, _out: seen.append(args[0].flatten(1)))
    try:
        yield seen
    finally:
        handle.remove()


def represent(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """g(x): (B, D) float32."""
    with representation(model) as seen:
        model(x)
    return seen[-1].float()


def invert(model: nn.Module, x: torch.Tensor, start: torch.Tensor, steps: int, step_size: float = 0.1,
           radius: float | None = None, amp_dtype: torch.dtype | None = None,
           trace_at: tuple[int, ...] = ()) -> InversionResult:
    """x_r from ``start`` (B,C,H,W in [0, 1]) whose representation approaches that of ``x``:
    ``steps`` normalised-gradient steps of ``step_size`` on ||g(x_r) - g(x)||, clamped to [0, 1]
    after each, projected into the L2 ball of ``radius`` around ``start`` when given; the iterate
    of smallest distance is kept. ``trace_at``: step counts after which the smallest distance so
    far is recorded (``trace``), to show where the inversion stops improving."""
    x, x0 = x.detach().float(), start.detach().float()
    ball = L2(math.inf if radius is None else radius)  # the step's norm, and the constraint if any

    def autocast():
        return torch.autocast(x0.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    with frozen_eval(model), representation(model) as seen:
        with torch.no_grad(), autocast():
            model(x)
        goal = seen.pop().float()
        xr, best_x, best_d, first_d = x0, x0, None, None
        trace = {}
        for i in range(steps + 1):
            last = i == steps
            xr = xr.detach().requires_grad_(not last)
            with torch.set_grad_enabled(not last):
                with autocast():
                    model(xr)
                d = (seen.pop().float() - goal).norm(dim=1)  # (B,)
            if not last:
                (grad,) = torch.autograd.grad(d.sum(), xr)
            d = d.detach()
            if best_d is None:
                first_d, best_x, best_d = d, xr.detach(), d
            else:
                better = d < best_d
                best_x = torch.where(better.view(-1, 1, 1, 1), xr.detach(), best_x)
                best_d = torch.where(better, d, best_d)
            if i in trace_at:
                trace[i] = best_d
            if not last:
                xr = advance(ball, xr, x0, grad, step_size)
    return InversionResult(x=best_x, distance=best_d, start_distance=first_d,
                           trace=torch.stack([trace[i] for i in trace_at]) if trace_at else None)
