"""Shared helpers for the benchmarks: FLOP counts, timing, models and inputs, machine description."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from advfeatures.config import CIFAR_MEAN, CIFAR_STD
from advfeatures.models import build_model


def forward_flops(model: torch.nn.Module, shape=(1, 3, 32, 32)) -> float:
    """FLOPs of one forward pass of one image (a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(*shape, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    return fc.get_total_flops() / shape[0]


def timed(fn: Callable[[], object], repeats: int = 3, warmup: int = 1, device: str = "cpu",
          min_seconds: float = 3.0) -> tuple[float, object]:
    """(median wall seconds of ``fn``, last result): after ``warmup`` runs, at least ``repeats``
    runs and at least ``min_seconds`` of them, so short kernels are not timed once."""
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    sync()
    times, out = [], None
    while len(times) < repeats or sum(times) < min_seconds:
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def model(arch: str, device: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(arch, 10, CIFAR_MEAN, CIFAR_STD).to(device).eval()


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads of {os.cpu_count()} cores, torch {torch.__version__}"


def pick_device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
