"""Threads follow the CPUs this process may use (affinity mask, cgroup quota), not the host's
core count."""

import os

import pytest

from advfeatures import cpus


def test_cgroup_v2_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpus.cgroup_cpus(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpus.cgroup_cpus(tmp_path) is None


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus.cgroup_cpus(tmp_path) == 2.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpus.cgroup_cpus(tmp_path) is None


def test_usable_cpus_is_the_smaller_of_affinity_and_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert cpus.usable_cpus(tmp_path) == 8  # no cgroup files: the affinity mask
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # docker --cpus 2.5
    assert cpus.usable_cpus(tmp_path) == 3
    (tmp_path / "cpu.max").write_text("10000 100000\n")  # 0.1 CPU: still one thread
    assert cpus.usable_cpus(tmp_path) == 1
    assert cpus.split_threads(2, tmp_path) == 1


def test_split_threads_divides_the_usable_cpus(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert cpus.split_threads(2, tmp_path) == 2
    assert cpus.split_threads(3, tmp_path) == 1
    assert cpus.split_threads(8, tmp_path) == 1


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_this_process(monkeypatch):
    assert 1 <= cpus.usable_cpus() <= len(os.sched_getaffinity(0))


def test_bf16_on_a_cpu_without_native_bfloat16_warns_with_the_fix(monkeypatch):
    import pytest
    import torch

    from advfeatures.config import RuntimeConfig
    from pipeline import common

    monkeypatch.setattr(common, "cpu_has_fast_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="runtime.amp=none"):
        common.setup_runtime(RuntimeConfig(device="cpu", amp="bf16", threads=torch.get_num_threads()))
    monkeypatch.setattr(common, "cpu_has_fast_bf16", lambda: True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        common.setup_runtime(RuntimeConfig(device="cpu", amp="bf16", threads=torch.get_num_threads()))
        common.setup_runtime(RuntimeConfig(device="cpu", amp="none", threads=torch.get_num_threads()))
