"""`advfeatures ls` and `gc` on a store laid out by hand: what a run reaches is kept, the rest
is removed only with --yes, and an artifact whose lock (or a shard's lock) is held is never touched."""

from __future__ import annotations

import fcntl
import os
import time

import pytest

from flows.cli import main
from pipeline import inventory as I
from storage.store import Store, StoreError, atomic_write_json


def _artifact(root, folder, key, stage, config=None, inputs=(), complete=True, **extra):
    d = root / folder / key
    d.mkdir(parents=True)
    (d / "data.bin").write_bytes(b"x" * 1000)
    if complete:
        atomic_write_json(d / "manifest.json", {"kind": folder, "key": key, "created": "2026-01-02T03:04:05+00:00",
                                                "stage": {"stage": stage, "config": config or {},
                                                          "inputs": list(inputs)}, **extra})
    return d


def _old(path, hours=2.0):
    t = time.time() - hours * 3600
    for dirpath, _dirs, files in os.walk(path):
        for f in files + ["."]:
            os.utime(os.path.join(dirpath, f), (t, t))


@pytest.fixture
def store(tmp_path):
    """run R reaches dataset D, source M, its set C, the selection S of C (only through S's
    manifest: plan.json lists S, not C... and C through S's inputs), eval E. Unreached: model X,
    a half-written set H, a staging leftover of key G, a locked model L, a set P whose shard lock is held."""
    root = tmp_path / "store"
    _artifact(root, "datasets", "d" * 16, "dataset", {"source_sha256": "ab"}, classes=list("abcdefghij"))
    _artifact(root, "models", "m" * 16, "model", {"role": "source", "model": {"arch": "small_cnn"},
                                                  "train": {"epochs": 3, "seed": 0}}, ["d" * 16])
    _artifact(root, "constructed", "c" * 16, "construct", {"kind": "rand", "attack": {"norm": "l2", "eps": 0.5,
                                                                                      "steps": 6}},
              ["d" * 16, "m" * 16], summary={"n": 50})
    _artifact(root, "constructed", "s" * 16, "select", {"fraction": 0.4}, ["c" * 16, "m" * 16])
    _artifact(root, "evals", "e" * 16, "eval", {"labels": "clean"}, ["m" * 16, "d" * 16], metrics={"acc_xy": 0.5})
    run = _artifact(root, "runs", "r" * 16, "run", {"name": "tiny"}, ["e" * 16])
    atomic_write_json(run / "plan.json", [{"stage": "select", "key": "s" * 16}, {"stage": "eval", "key": "e" * 16}])
    _artifact(root, "models", "x" * 16, "model", {"role": "teacher", "train": {"epochs": 1}}, ["d" * 16])
    _artifact(root, "constructed", "h" * 16, "construct", complete=False)
    _artifact(root, "models", f".staging-{'g' * 16}-1234abcd", "model", complete=False)
    _artifact(root, "models", "l" * 16, "model", {"role": "source"})
    _artifact(root, "constructed", "p" * 16, "construct", complete=False)
    _old(root)
    return Store(root)


def test_ls_lists_and_filters(store, capsys):
    arts = I.list_artifacts(store)
    assert len(arts) == 11
    assert {a.key for a in I.list_artifacts(store, incomplete=True)} == {"h" * 16, "g" * 16, "p" * 16}
    assert [a.key for a in I.list_artifacts(store, stage="select")] == ["s" * 16]
    assert [a.key for a in I.list_artifacts(store, key="mmm")] == ["m" * 16]
    reach = I.reachable(store, I.run_folders(store, ["r" * 16]))
    assert reach >= {"r" * 16, "s" * 16, "c" * 16, "m" * 16, "d" * 16, "e" * 16} and "x" * 16 not in reach
    assert main(["ls", "--store", str(store.root), "--stage", "construct"]) == 0
    out = capsys.readouterr().out
    assert "rand, 50 rows, l2 eps 0.5 x 6 steps" in out and "NO" in out and "3 artifacts" in out
    with pytest.raises(StoreError, match="not a finished run"):
        I.run_folders(store, ["nope"])


def test_ls_and_gc_honour_the_store_environment_variable(store, monkeypatch, tmp_path, capsys):
    """Without --store, ls and gc read the store of ADVFEATURES_STORE (as verify does), not ./.advstore."""
    monkeypatch.setenv("ADVFEATURES_STORE", str(store.root))
    monkeypatch.chdir(tmp_path)
    assert main(["ls", "--stage", "construct"]) == 0
    assert "3 artifacts" in capsys.readouterr().out
    assert main(["gc"]) == 0
    out = capsys.readouterr().out  # the env store's unreached artifacts, not an empty ./.advstore
    assert "ggggg" in out and "would be deleted" in out and not (tmp_path / ".advstore").exists()


def test_gc_dry_run_then_delete_keeps_reached_recent_and_locked(store, capsys):
    unreached = {"x" * 16, "h" * 16, "g" * 16, "l" * 16, "p" * 16}
    locks = store.root / ".locks"
    locks.mkdir()
    held = [open(locks / f"models-{'l' * 16}.lock", "a+"), open(locks / f"constructed-{'p' * 16}-shard3.lock", "a+")]
    for f in held:  # a running stage holds these (a shard of P is being written)
        fcntl.flock(f, fcntl.LOCK_EX)
    try:
        assert main(["gc", "--store", str(store.root)]) == 0  # dry run: nothing removed
        out = capsys.readouterr().out
        assert "dry run: 3 artifacts" in out and "locked by a running stage" in out
        assert len(I.scan(store)) == 11
        (store.root / "models" / ("x" * 16) / "data.bin").write_bytes(b"new")  # touched just now: recent
        rows = {r["key"]: r["action"] for r in I.collect(store, delete=True)}
        assert rows == {"x" * 16: "kept: recent", "h" * 16: "deleted", "g" * 16: "deleted",
                        "l" * 16: "kept: locked by a running stage", "p" * 16: "kept: locked by a running stage"}
        left = {a.key for a in I.scan(store)}
        assert left == {"d" * 16, "m" * 16, "c" * 16, "s" * 16, "e" * 16, "r" * 16, "x" * 16, "l" * 16, "p" * 16}
    finally:
        for f in held:
            f.close()
    assert main(["gc", "--store", str(store.root), "--yes", "--min-age-hours", "0"]) == 0
    assert "deleted 3 artifacts" in capsys.readouterr().out
    assert {a.key for a in I.scan(store)} == {"d" * 16, "m" * 16, "c" * 16, "s" * 16, "e" * 16, "r" * 16}
    assert not unreached & {a.key for a in I.scan(store)}


def test_gc_with_a_run_given_removes_other_runs(store):
    other = _artifact(store.root, "runs", "o" * 16, "run", {"name": "other"}, ["x" * 16])
    atomic_write_json(other / "plan.json", [{"stage": "model", "key": "x" * 16}])
    everything = {r["key"] for r in I.collect(store, min_age_hours=0)}
    assert "x" * 16 not in everything and "o" * 16 not in everything  # every run: o reaches x
    only_r = {r["key"] for r in I.collect(store, ["r" * 16], min_age_hours=0)}
    assert {"x" * 16, "o" * 16} <= only_r and "m" * 16 not in only_r
