"""Crash safety of the shard protocol: a worker SIGKILLed while writing a shard, or hitting a
full disk, leaves no marker; a rerun completes the set bit-identically to an uninterrupted run."""

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import build

from advfeatures.config import resolve
from pipeline import stages
from pipeline.plan import make_plan
from pipeline.stages.dataset import source_sha256
from storage import arrays as A
from storage.store import Store

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = ["construct.sets=[rand]", "construct.n_images=150", "source.train.epochs=1"]

# Runs every pending shard of the rand set in a fresh process; dies by SIGKILL at a chosen point.
WORKER = textwrap.dedent("""
    import os, signal, sys
    import zarr
    from pipeline import stages
    from advfeatures.config import resolve
    from pipeline.stages.dataset import source_sha256
    from pipeline.plan import make_plan
    from storage import arrays as A
    from storage.store import Store

    tar, store, kill_at, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    cfg = resolve("tiny", overrides, data=tar, store=store)
    st, plan = Store(store), make_plan(cfg, source_sha256(tar))
    spec = plan.constructs["rand"]
    writes = {"n": 0}
    if kill_at == "mid-rows":  # SIGKILL after the 2nd array assignment of the 2nd shard
        orig = zarr.Array.__setitem__
        def setitem(self, key, value):
            orig(self, key, value)
            writes["n"] += 1
            if writes["n"] == len(A.CONSTRUCTED_FIELDS) + 1 + 2:
                os.kill(os.getpid(), signal.SIGKILL)
        zarr.Array.__setitem__ = setitem
    elif kill_at == "before-marker":  # SIGKILL with all rows of the 1st shard written, no marker yet
        def die(path, obj):
            os.kill(os.getpid(), signal.SIGKILL)
        A.atomic_write_json = die
    for i in stages.prepare_construct(st, spec):
        stages.run_shard(st, spec, i, cfg.runtime)
    print("finished")
""")


def _prepare(store_dir, tar):
    cfg, st, plan = build(tar, store_dir, OVERRIDES)
    return cfg, st, plan.constructs["rand"]


def _worker(tar, store_dir, kill_at):
    return subprocess.run([sys.executable, "-c", WORKER, str(tar), str(store_dir), kill_at, *OVERRIDES],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_tar):
    """The same set generated without interruption."""
    cfg, st, spec = _prepare(tmp_path_factory.mktemp("ref"), tiny_tar)
    stages.generate(st, spec, cfg.runtime)
    return A.read_rows(st.path("constructed", spec.key))


@pytest.mark.parametrize("kill_at", ["mid-rows", "before-marker"])
def test_sigkill_mid_shard_then_rerun_is_bit_identical(tmp_path, tiny_tar, reference, kill_at):
    cfg, st, spec = _prepare(tmp_path, tiny_tar)
    proc = _worker(tiny_tar, tmp_path, kill_at)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    path = st.path("constructed", spec.key)
    layout_shards = 3  # 150 rows / 50
    done = [i for i in range(layout_shards) if A.shard_done(path, i)]
    assert done == ([0] if kill_at == "mid-rows" else [])  # the killed shard has no marker
    assert not st.is_complete("constructed", spec.key)
    with pytest.raises(Exception, match="not finished"):
        stages.finalize_construct(st, spec)
    proc = _worker(tiny_tar, tmp_path, "never")  # the rerun
    assert proc.returncode == 0 and "finished" in proc.stdout, proc.stderr[-2000:]
    stages.finalize_construct(st, spec)
    got = A.read_rows(path)
    assert all(np.array_equal(got[k], reference[k]) for k in reference)
    assert stages.verify(st, spec.key) == []


def test_disk_full_mid_shard_leaves_no_marker(tmp_path, tiny_tar, reference, monkeypatch):
    cfg, st, spec = _prepare(tmp_path, tiny_tar)
    pending = stages.prepare_construct(st, spec)
    import zarr

    orig = zarr.Array.__setitem__
    calls = {"n": 0}

    def full(self, key, value):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        orig(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", full)
    with pytest.raises(OSError, match="No space left"):
        stages.run_shard(st, spec, pending[0], cfg.runtime)
    path = st.path("constructed", spec.key)
    assert not A.shard_done(path, pending[0]) and not st.is_complete("constructed", spec.key)
    monkeypatch.undo()
    stages.generate(st, spec, cfg.runtime)
    got = A.read_rows(path)
    assert all(np.array_equal(got[k], reference[k]) for k in reference)


def test_staged_artifact_on_full_disk_is_not_published(tmp_path, tiny_tar, monkeypatch):
    cfg = resolve("tiny", OVERRIDES, data=str(tiny_tar), store=str(tmp_path))
    st, plan = Store(cfg.runtime.store), make_plan(cfg, source_sha256(tiny_tar))
    stages.ingest(st, cfg.data, plan.dataset)
    import torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space left"):
        stages.train_model(st, plan.source, cfg.runtime)
    assert not st.path("models", plan.source.key).exists()
    assert [p.name for p in (tmp_path / "models").iterdir()] == []  # no staging leftovers
