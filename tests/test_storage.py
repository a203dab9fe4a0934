import json
import os

import numpy as np
import pytest

from storage import arrays as A
from storage.store import Store, StoreError, atomic_write_json


def _layout(n=230):
    return A.Layout(n=n, image_shape=(3, 4, 4), x_dtype="float16", chunk=25, shard_size=50)


def _rows(layout, i, fill):
    s, e = layout.rows(i)
    k = e - s
    return {"x": np.full((k, 3, 4, 4), fill, np.float32), "y_target": np.arange(s, e), "y_true": np.arange(s, e),
            "index": np.arange(s, e), "fooled": np.ones(k, bool), "loss": np.zeros(k, np.float32),
            "norm": np.full(k, fill, np.float32), "margin": np.full(k, fill, np.float32)}


def _chunk_files(path):
    return {os.path.relpath(os.path.join(r, f), path): os.stat(os.path.join(r, f)).st_mtime_ns
            for r, _, fs in os.walk(path) for f in fs if "/c/" in os.path.join(r, f) + "/"}


def test_shards_own_disjoint_chunks(tmp_path):
    layout = _layout()
    assert layout.num_shards == 5 and layout.rows(4) == (200, 230)
    A.create_constructed(tmp_path, layout)
    owners = {}
    for i in range(layout.num_shards):
        before = set(_chunk_files(tmp_path))
        A.write_shard(tmp_path, layout, i, _rows(layout, i, i), seconds=0.0)
        new = set(_chunk_files(tmp_path)) - before
        assert new, "each shard writes its own chunk files"
        for f in new:
            assert f not in owners
            owners[f] = i
    got = A.read_rows(tmp_path)
    assert np.array_equal(got["index"], np.arange(230))
    assert np.array_equal(got["x"][:, 0, 0, 0], np.repeat(np.arange(5), 50)[:230].astype(np.float16))


def test_interrupted_shard_is_redone_and_finished_ones_untouched(tmp_path):
    layout = _layout()
    A.create_constructed(tmp_path, layout)
    for i in (0, 1):
        A.write_shard(tmp_path, layout, i, _rows(layout, i, 1.0), seconds=0.0)
    # shard 2 "crashes": its rows are written but its marker never is
    g = __import__("zarr").open_group(str(tmp_path), mode="r+")
    g["x"][100:150] = np.full((50, 3, 4, 4), 9.0, np.float16)
    assert A.pending_shards(tmp_path, layout) == [2, 3, 4]
    with pytest.raises(StoreError, match="not finished"):
        A.read_markers(tmp_path, layout)
    snapshot = {f: t for f, t in _chunk_files(tmp_path).items()}
    marker0 = A.marker_path(tmp_path, 0).stat().st_mtime_ns
    A.create_constructed(tmp_path, layout)  # a rerun re-opens the arrays
    for i in A.pending_shards(tmp_path, layout):
        A.write_shard(tmp_path, layout, i, _rows(layout, i, 2.0), seconds=0.0)
    assert A.pending_shards(tmp_path, layout) == []
    after = _chunk_files(tmp_path)
    rows01 = [f for f in snapshot if f.startswith("x/") and int(f.split("/")[2]) < 4]  # chunks 0..3 = rows 0..99
    assert rows01 and all(after[f] == snapshot[f] for f in rows01)
    assert A.marker_path(tmp_path, 0).stat().st_mtime_ns == marker0
    x = A.read_rows(tmp_path, names=("x",))["x"]
    assert (x[:100] == 1.0).all() and (x[100:] == 2.0).all()  # the crashed rows were rewritten whole
    markers = A.read_markers(tmp_path, layout)
    assert sum(m["count"] for m in markers) == 230


def test_a_marker_half_written_by_a_killed_writer_is_removed_and_the_others_kept(tmp_path):
    layout = _layout(50)
    A.create_constructed(tmp_path, layout)
    for i in range(layout.num_shards):
        A.write_shard(tmp_path, layout, i, _rows(layout, i, 1.0), seconds=0.0)
    stale = A.marker_path(tmp_path, 1).with_name(".00001.json.0123abcd.tmp")  # atomic_write_json's, cut short
    stale.write_text('{"shard": 1, "sta')
    assert A.remove_partial_markers(tmp_path) == 1 and not stale.exists()
    assert len(A.read_markers(tmp_path, layout)) == layout.num_shards == len(list(stale.parent.iterdir()))
    assert A.remove_partial_markers(tmp_path) == 0


def test_marker_checksum_matches_rows(tmp_path):
    layout = _layout(50)
    A.create_constructed(tmp_path, layout)
    rows = _rows(layout, 0, 0.25)
    m = A.write_shard(tmp_path, layout, 0, rows, seconds=1.5)
    stored = A.read_rows(tmp_path)
    assert m["sha256"] == A.rows_sha256({k: stored[k] for k in rows})
    assert json.loads(A.marker_path(tmp_path, 0).read_text())["count"] == 50


def test_a_kinds_extra_fields_are_stored_checksummed_and_read_back(tmp_path):
    layout = A.Layout(n=60, image_shape=(3, 4, 4), x_dtype="float16", chunk=25, shard_size=50,
                      extra=(("goal", "int64"), ("distance", "float32")))
    A.create_constructed(tmp_path, layout)
    assert A.stored_layout(tmp_path) == layout  # the extra fields are part of the recorded layout
    markers = []
    for i in range(layout.num_shards):
        s, e = layout.rows(i)
        rows = {**_rows(layout, i, 0.5), "goal": np.arange(s, e) + 7, "distance": np.full(e - s, 2.5, np.float32)}
        with pytest.raises(ValueError, match="differ from the layout"):  # a shard without its extra fields
            A.write_shard(tmp_path, layout, i, {k: v for k, v in rows.items() if k != "goal"}, seconds=0.0)
        markers.append(A.write_shard(tmp_path, layout, i, rows, seconds=0.0))
    got = A.read_rows(tmp_path)
    assert np.array_equal(got["goal"], np.arange(60) + 7) and (got["distance"] == 2.5).all()
    assert not A.verify_shards(tmp_path, markers)
    __import__("zarr").open_group(str(tmp_path), mode="r+")["goal"][3] = -1  # the checksum covers them
    assert [p["shard"] for p in A.verify_shards(tmp_path, markers)] == [0]
    assert "extra" not in _layout().attrs()  # sets without extra fields record what they always did
    with pytest.raises(ValueError, match="replace"):
        A.Layout(n=1, image_shape=(3, 4, 4), x_dtype="float16", chunk=1, shard_size=1, extra=(("norm", "int64"),))


def test_layout_mismatch_is_refused(tmp_path):
    A.create_constructed(tmp_path, _layout())
    with pytest.raises(StoreError, match="Delete"):
        A.create_constructed(tmp_path, A.Layout(n=231, image_shape=(3, 4, 4), x_dtype="float16", chunk=25,
                                                shard_size=50))


def test_wrong_rows_are_refused_before_any_marker(tmp_path):
    layout = _layout()
    A.create_constructed(tmp_path, layout)
    rows = _rows(layout, 0, 1.0)
    rows["x"] = rows["x"][:10]
    with pytest.raises(ValueError, match="rows"):
        A.write_shard(tmp_path, layout, 0, rows, seconds=0)
    assert not A.shard_done(tmp_path, 0)


def test_staging_is_all_or_nothing(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with store.staging("models", "k1") as d:
            (d / "weights.pt").write_bytes(b"half")
            raise RuntimeError("boom")
    assert not store.path("models", "k1").exists()
    assert list((tmp_path / "models").iterdir()) == []
    with store.staging("models", "k1") as d:
        atomic_write_json(d / "manifest.json", {"ok": 1})
    assert store.is_complete("models", "k1") and store.manifest("models", "k1") == {"ok": 1}


def test_unwritable_store_gives_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="not writable.*runtime.store"):
        Store(blocker / "store").ensure_writable()


def test_missing_manifest_names_the_stage(tmp_path):
    with pytest.raises(StoreError, match="run the stage"):
        Store(tmp_path).manifest("models", "abc")


def test_staging_loses_a_publish_race_gracefully(tmp_path, monkeypatch):
    """Another writer publishes between our existence check and our rename: keep theirs."""
    store = Store(tmp_path)
    real_replace = os.replace

    def racing_replace(src, dst):
        if str(dst).endswith("k1") and not os.path.exists(dst):  # the other writer wins now
            os.makedirs(dst)
            atomic_write_json(os.path.join(dst, "manifest.json"), {"by": "other"})
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", racing_replace)
    with store.staging("runs", "k1") as d:
        atomic_write_json(d / "manifest.json", {"by": "us"})
    assert store.manifest("runs", "k1") == {"by": "other"}
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["k1"]  # no staging leftovers


def test_a_killed_writers_staging_folder_is_swept_on_the_next_write(tmp_path):
    """A writer SIGKILLed mid-publish leaves `.staging-<key>-<id>/`; the next write of that kind
    deletes it once nobody has written to it for a lease, and never a live writer's folder."""
    import time

    from storage.store import STAGING_LEASE_SECONDS, sweep_staging

    store = Store(tmp_path)
    dead, live = tmp_path / "models" / ".staging-k0-dead0000", tmp_path / "models" / ".staging-k2-live0000"
    for d in (dead, live):
        d.mkdir(parents=True)
        (d / "weights.pt").write_bytes(b"half")
    old = time.time() - STAGING_LEASE_SECONDS - 60
    for p in (dead / "weights.pt", dead):
        os.utime(p, (old, old))
    with store.staging("models", "k1") as d:
        atomic_write_json(d / "manifest.json", {"ok": 1})
    assert not dead.exists() and live.exists()
    assert store.is_complete("models", "k1")
    os.utime(live, (old, old))  # the folder is old but a file in it was written just now: alive
    assert sweep_staging(tmp_path / "models") == [] and live.exists()
    assert sweep_staging(tmp_path / "models", now=time.time() + STAGING_LEASE_SECONDS + 60) == [live]


@pytest.mark.parametrize("root", ["path", "memory"])
def test_a_missing_manifest_is_a_store_error_naming_the_stage(tmp_path, root):
    """Store.manifest reads at once (no existence check first: one request fewer on a URL store); a
    key with no manifest is still the store's own error, not fsspec's or the OS's."""
    st = Store(tmp_path if root == "path" else f"memory://{tmp_path.name}/store")
    (st.path("models", "abc")).mkdir(parents=True, exist_ok=True)  # a folder, no manifest yet
    for key in ("abc", "nothere"):
        with pytest.raises(StoreError, match=f"models/{key} is not in the store"):
            st.manifest("models", key)
    atomic_write_json(st.path("models", "abc") / "manifest.json", {"created": "now"})
    assert st.manifest("models", "abc") == {"created": "now"}
