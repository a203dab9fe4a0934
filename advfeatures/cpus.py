"""How many CPUs this process may use: its affinity mask (``taskset``, ``docker --cpuset-cpus``)
and its cgroup's CPU quota (``docker --cpus``, Kubernetes limits), not the machine's core count,
which ``os.cpu_count()`` reports even inside a 2-CPU container on a 64-core host."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def _quota_v2(root: Path) -> float | None:
    """cgroup v2: ``cpu.max`` holds ``"<quota> <period>"`` (microseconds) or ``"max <period>"``."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _quota_v1(root: Path) -> float | None:
    """cgroup v1: ``cpu.cfs_quota_us`` (-1 = unlimited) over ``cpu.cfs_period_us``."""
    for d in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota = int((d / "cpu.cfs_quota_us").read_text())
            period = int((d / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota <= 0 or period <= 0 else quota / period
    return None


def cgroup_cpus(root: Path = CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 1.5), or None when unlimited/unknown."""
    q = _quota_v2(root)
    return q if q is not None else _quota_v1(root)


def usable_cpus(root: Path = CGROUP) -> int:
    """CPUs this process may use: min(affinity mask, cgroup quota rounded up), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = cgroup_cpus(root)
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def split_threads(workers: int, root: Path = CGROUP) -> int:
    """torch threads for each of ``workers`` concurrent stages or shards sharing this process."""
    return max(1, usable_cpus(root) // max(1, workers))
