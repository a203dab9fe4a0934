"""Crash safety of the shard protocol: a worker SIGKILLed while writing a shard (mid-rows, or with
its rows written and its marker not), or hitting a full disk, leaves no marker; a rerun completes
the set bit-identically to an uninterrupted run."""

import errno
import os
import shutil
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
SHARD = 50  # rows per shard of the tiny profile: 150 rows, 3 shards

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
    elif kill_at == "before-marker":  # SIGKILL with all rows of the first pending shard written, no marker yet
        write = A.atomic_write_json
        def die(path, obj):
            if "_shards" in str(path):
                os.kill(os.getpid(), signal.SIGKILL)
            return write(path, obj)
        A.atomic_write_json = die
    for i in stages.prepare_construct(st, spec):
        stages.run_shard(st, spec, i, cfg.runtime)
    print("finished")
""")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_tar):
    """The same set generated without interruption: (store, rows)."""
    cfg, st, plan = build(tiny_tar, tmp_path_factory.mktemp("ref"), OVERRIDES)
    spec = plan.constructs["rand"]
    stages.generate(st, spec, cfg.runtime)
    return st, A.read_rows(st.path("constructed", spec.key))


def _prepare(store_dir, tar, reference):
    """A store holding the reference's dataset and source model, not its set: (cfg, store, spec)."""
    for folder in ("datasets", "models"):
        shutil.copytree(reference[0].root / folder, Path(store_dir) / folder, ignore=shutil.ignore_patterns(".*"))
    cfg = resolve("tiny", OVERRIDES, data=str(tar), store=str(store_dir))
    return cfg, Store(store_dir), make_plan(cfg, source_sha256(tar)).constructs["rand"]


def _worker(tar, store_dir, kill_at):
    return subprocess.run([sys.executable, "-c", WORKER, str(tar), str(store_dir), kill_at, *OVERRIDES],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sigkill_mid_shard_then_rerun_is_bit_identical(tmp_path, tiny_tar, reference):
    """One set, two workers killed in it: the first mid-rows of its 2nd shard (the 1st is done), the
    second after rewriting that shard's rows in full, before its marker. Neither leaves a marker for
    the killed shard, the set cannot be finalised, and a rerun (here) completes it bit-identically."""
    cfg, st, spec = _prepare(tmp_path, tiny_tar, reference)
    path, want = st.path("constructed", spec.key), reference[1]
    for kill_at in ("mid-rows", "before-marker"):
        proc = _worker(tiny_tar, tmp_path, kill_at)
        assert proc.returncode == -signal.SIGKILL, (kill_at, proc.stderr[-2000:])
        assert [i for i in range(3) if A.shard_done(path, i)] == [0], kill_at  # the killed shard has no marker
        assert not st.is_complete("constructed", spec.key)
        with pytest.raises(Exception, match="not finished"):
            stages.finalize_construct(st, spec)
    import zarr

    g = zarr.open_group(str(path), mode="r")  # killed before its marker: shard 1's rows all written
    assert all(np.array_equal(g[k][SHARD:2 * SHARD], want[k][SHARD:2 * SHARD]) for k in want)
    for i in stages.prepare_construct(st, spec):  # the rerun, in this process (a third one costs ~5 CPU-s)
        stages.run_shard(st, spec, i, cfg.runtime)
    stages.finalize_construct(st, spec)
    got = A.read_rows(path)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert stages.verify(st, spec.key) == []


def test_disk_full_mid_shard_leaves_no_marker(tmp_path, tiny_tar, reference, monkeypatch):
    cfg, st, spec = _prepare(tmp_path, tiny_tar, reference)
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
    assert all(np.array_equal(got[k], reference[1][k]) for k in reference[1])


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
