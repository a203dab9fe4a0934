"""Stores at fsspec URLs: the store protocol on memory://, and the whole pipeline on s3:// against
moto's S3 server, byte-identical to a run on a local folder."""

import os
import uuid

import numpy as np
import pytest
from conftest import free_port, prefect_logging_ready, run_cli

from advfeatures.config import resolve
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


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server with a bucket; yields the environment fsspec/s3fs needs to reach it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    import fsspec.config
    import s3fs

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = env["FSSPEC_S3_ENDPOINT_URL"]
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("advfeatures")
    yield env
    fsspec.config.conf["s3"].pop("endpoint_url", None)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="module")
def api(prefect_api):
    """The process's Prefect server (conftest), for the CLI runs on URL stores (refused without
    one: their locks live there)."""
    return prefect_api


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


def test_the_prefect_lock_excludes_and_a_held_one_is_waited_for(api):
    """A URL store's lock: while one thread holds an artifact's lock, a second waits for it and a
    third takes another artifact's meanwhile (its free slot in one request, never queued behind
    the wait); the second gets it when the first lets go, and the slots are free at the end."""
    import contextvars
    import threading
    import time

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.stages import prefect_lock

    x, y, events = f"test-x-{uuid.uuid4().hex[:8]}", f"test-y-{uuid.uuid4().hex[:8]}", []
    a_in, b_trying = threading.Event(), threading.Event()

    def a():
        with prefect_lock(x):
            events.append("a in")
            a_in.set()
            b_trying.wait(30)
            time.sleep(1.0)  # b is waiting now; c takes y meanwhile
            events.append("a out")

    def b():
        a_in.wait(30)
        b_trying.set()
        with prefect_lock(x):
            events.append("b in")

    def c():
        b_trying.wait(30)
        time.sleep(0.3)  # b has been told the slot is held and sleeps before its retry
        with prefect_lock(y):
            events.append("c in")

    with temporary_settings({PREFECT_API_URL: api}):
        threads = [threading.Thread(target=contextvars.copy_context().run, args=(f,)) for f in (a, b, c)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        with get_client(sync_client=True) as client:
            slots = [client.read_global_concurrency_limit_by_name(f"advfeatures-{n}").active_slots for n in (x, y)]
    # b gets x only after a let it go; c got y while b was still waiting for x (a request of b's
    # retry can meet c's, and Prefect's client then retries c's after 2 s: so not "before a out")
    assert events[0] == "a in" and events.index("a out") < events.index("b in"), events
    assert events.index("c in") < events.index("b in"), events
    assert slots == [0, 0]


@pytest.mark.slow
def test_pipeline_on_s3_matches_a_local_folder(s3, api, tiny_tar, tmp_path, caplog, monkeypatch):
    """The flow run by the CLI on s3:// (through a Prefect server, which holds the URL store's
    locks), two stages at once, against the bare executors on a local folder: the same bytes. Both
    in this process. One set (det): the other set kinds write through the same shard protocol
    (test_url_store_shards_roundtrip_and_detect_corruption), and a second set cost ~7 s here."""
    from pipeline import kinds
    from pipeline.common import Context
    from pipeline.experiments import get
    from pipeline.stages import source_sha256

    url, local = "s3://advfeatures/store", tmp_path / "local"
    common = ["--profile", "tiny", "--data", str(tiny_tar), "--set", "construct.sets=[det]"]
    # two stages at once on local threads (the tiny profile fixes runtime.threads, so each keeps the
    # bare run's threads and rounding): the same bytes as the bare executors one after another
    code, log = run_cli(caplog, monkeypatch, api, "run", *common, "--set", "runtime.stage_workers=2", "--store", url)
    assert code == 0, log[-3000:]
    from prefect.events.worker import EventsWorker

    # run_cli leaves no event worker bound to its server (one whose server later stopped hung the
    # session harness's exit): it drained and stopped them
    assert not EventsWorker._instances
    cfg = resolve("tiny", ["construct.sets=[det]"], data=str(tiny_tar), store=str(local))
    plan = get("replicate").plan(cfg, source_sha256(tiny_tar))
    kinds.run_all(Store(local), plan, Context(runtime=cfg.runtime, data=cfg.data, plan=plan, config=cfg))

    st = Store(url)
    keys = sorted(p.name for p in (local / "constructed").iterdir() if not p.name.startswith("."))
    assert len(keys) == 1
    for key in keys:
        assert st.is_complete("constructed", key)
        a, b = A.read_rows(st.path("constructed", key)), A.read_rows(local / "constructed" / key)
        assert all(np.array_equal(a[n], b[n]) for n in a), key
    for folder in ("models", "evals", "runs"):
        want = sorted(p.name for p in (local / folder).iterdir() if not p.name.startswith("."))
        assert want and all(st.is_complete(folder, k) for k in want)
    (run,) = [p.name for p in (local / "runs").iterdir() if not p.name.startswith(".")]
    from pipeline.report import read_table

    remote_table, local_table = read_table(st.path("runs", run)), read_table(local / "runs" / run)
    assert remote_table["acc_xy_%"].tolist() == local_table["acc_xy_%"].tolist()
    assert (st.path("runs", run) / "report.html").is_file() and (st.path("runs", run) / "figures" / "table1.svg").is_file()
    created = {k: st.manifest("constructed", k)["created"] for k in keys}
    code, again = run_cli(caplog, monkeypatch, api, "run", *common, "--store", url)
    assert code == 0 and "computed this run: 0.0 s" in again, again[-3000:]
    assert not (st.root / ".prefect" / "results").exists()  # no Prefect records: the manifests are the truth
    assert {k: st.manifest("constructed", k)["created"] for k in keys} == created
    model = min(p.name for p in (local / "models").iterdir() if not p.name.startswith("."))
    from flows.cli import main as cli_main

    assert cli_main(["verify", model, "--store", url]) == 0
