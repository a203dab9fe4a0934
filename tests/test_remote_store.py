"""Stores at fsspec URLs: the store protocol on memory://. The whole pipeline on s3:// against moto's
S3 server, byte-identical to a run on a local folder: test_flow (beside that module's first run)."""

import uuid

import numpy as np
import pytest
from conftest import prefect_logging_ready

from storage import arrays as A
from storage.store import Store, StoreError, atomic_write_json


@pytest.fixture(scope="module", autouse=True)
def _logging():
    """Prefect's logging set up before any test (one using capsys would bind it to its stream)."""
    prefect_logging_ready()


def _mem_store() -> Store:
    return Store(f"memory://advfeatures-test-{uuid.uuid4().hex[:8]}/store")


def test_url_store_publishes_with_the_manifest_last_and_leaves_nothing_on_failure():
    st = _mem_store()
    assert st.remote and st.url.startswith("memory://")
    with st.staging("models", "good") as d:
        (d / "weights.pt").write_bytes(b"w" * 10)
        assert not st.is_complete("models", "good")  # written in place, but not published yet
        atomic_write_json(d / "manifest.json", {"a": 1})
    assert st.is_complete("models", "good") and st.manifest("models", "good") == {"a": 1}
    assert (st.path("models", "good") / "weights.pt").read_bytes() == b"w" * 10

    with pytest.raises(RuntimeError, match="crash"):
        with st.staging("models", "bad") as d:
            (d / "weights.pt").write_bytes(b"half")
            raise RuntimeError("crash")
    assert not st.is_complete("models", "bad") and not (st.path("models", "bad") / "weights.pt").exists()

    (st.path("models", "left") / "junk").write_bytes(b"a crashed writer's leftovers")
    with st.staging("models", "left") as d:
        atomic_write_json(d / "manifest.json", {})
    assert st.is_complete("models", "left") and not (st.path("models", "left") / "junk").exists()


def test_url_store_shards_roundtrip_and_detect_corruption():
    st = _mem_store()
    path = st.path("constructed", "k")
    layout = A.Layout(n=10, image_shape=(3, 2, 2), x_dtype="float16", chunk=5, shard_size=5)
    A.create_constructed(path, layout)
    rng = np.random.default_rng(0)
    for i in range(2):
        n = 5
        rows = {"x": rng.random((n, 3, 2, 2)).astype("float16"), "y_target": np.arange(n), "y_true": np.arange(n),
                "index": np.arange(n) + 5 * i, "fooled": np.ones(n, bool), "loss": np.zeros(n, "float32"),
                "norm": np.ones(n, "float32"), "margin": np.ones(n, "float32")}
        A.write_shard(path, layout, i, rows, seconds=0.1)
    markers = A.read_markers(path, layout)
    assert [m["count"] for m in markers] == [5, 5] and A.verify_shards(path, markers) == []
    assert A.read_rows(path)["index"].tolist() == list(range(10))
    # overwrite the first chunk of x behind the store's back: the shard checksum catches it
    g = __import__("zarr").open_group(str(path), mode="r+")
    g["x"][0:5] = np.zeros((5, 3, 2, 2), "float16")
    assert [p["shard"] for p in A.verify_shards(path, markers)] == [0]


def test_url_store_without_a_cross_host_lock_says_how_to_get_one(monkeypatch):
    monkeypatch.setattr(Store, "remote_lock", None)
    with pytest.raises(StoreError, match="cross-host lock"):
        _mem_store().once("models", "k", lambda: False, lambda: 1, skipped=0)


def test_unknown_url_protocol_is_a_clear_error():
    with pytest.raises(StoreError, match="fsspec backend"):
        Store("nosuchproto://bucket/store")


# --- s3:// against moto ------------------------------------------------------------------------------


def test_url_store_without_a_prefect_server_is_refused(tmp_path, capsys, monkeypatch):
    """A URL store's locks are global concurrency limits on the Prefect server: with the temporary
    server of a run without PREFECT_API_URL they would be private to that process, so the run is
    refused before anything starts, naming the fix."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        code = main(["run", "--profile", "tiny", "--data", str(tmp_path), "--store", f"file://{tmp_path}/store"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "temporary Prefect server" in err and "PREFECT_API_URL" in err
    assert not (tmp_path / "store").exists()
