"""Shards fanned out as flow runs of the `generate-shard` deployment to 2 process workers of a
real local Prefect server (`advfeatures serve`), against the in-process path: same bytes; and the
same with the store given as an fsspec URL (file://), where the workers' stage locks are Prefect
concurrency limits on that server and Prefect's result records live in the store."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port

from storage import arrays as A

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow



# Loaded by every process of the served stack (server, workers, their flow runs) through PYTHONPATH:
# the first shard marker written to a store whose path contains "crash-" SIGKILLs its own process
# instead, after the shard's rows and before its marker, as a dying worker would.
KILL_ONCE = """
import os
if os.environ.get("ADVFEATURES_TEST_KILL_ONCE"):
    import signal
    from pathlib import Path

    import storage.arrays as _arrays

    _flag, _write = Path(os.environ["ADVFEATURES_TEST_KILL_ONCE"]), _arrays.atomic_write_json

    def _kill_before_first_marker(path, obj):
        if "crash-" in str(path) and "_shards" in str(path) and not _flag.exists():
            _flag.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return _write(path, obj)

    _arrays.atomic_write_json = _kill_before_first_marker
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    (home / "site").mkdir()
    (home / "site" / "sitecustomize.py").write_text(KILL_ONCE)
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(home / "site"), os.environ.get("PYTHONPATH")])),
           "ADVFEATURES_TEST_KILL_ONCE": str(home / "killed")}
    log = open(home / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--workers", "2", "--port", str(port),
                             "--shard-limit", "2"],
                            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    while "ready:" not in (home / "serve.log").read_text():
        if proc.poll() is not None or time.time() - t0 > 180:
            proc.kill()
            pytest.fail(f"advfeatures serve did not come up:\n{(home / 'serve.log').read_text()[-4000:]}")
        time.sleep(1)
    yield env
    os.killpg(proc.pid, 2)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)


def _run(env, tar, store, *extra):
    over = ["construct.sets=[det]", "runtime.threads=1", *extra]
    args = [sys.executable, "-m", "flows.cli", "run", "--profile", "tiny", "--data", str(tar), "--store", str(store)]
    for o in over:
        args += ["--set", o]
    out = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def reference(server, tiny_tar, tmp_path_factory):
    """(key, rows) of the det set made in-process, without the server: what every fan-out must equal."""
    local = tmp_path_factory.mktemp("reference") / "local"
    _run({k: v for k, v in server.items() if k not in ("PREFECT_API_URL", "ADVFEATURES_TEST_KILL_ONCE")},
         tiny_tar, local)
    (key,) = [p.name for p in (local / "constructed").iterdir() if not p.name.startswith(".")
              and (local / "constructed" / p.name / "_shards").exists()]
    return key, A.read_rows(local / "constructed" / key)


def _same(rows, reference_rows) -> bool:
    return set(rows) == set(reference_rows) and all(np.array_equal(rows[k], reference_rows[k]) for k in rows)


def test_shards_fan_out_to_deployment_workers(server, reference, tiny_tar, tmp_path):
    key, b = reference
    fanned = _run(server, tiny_tar, tmp_path / "fanned", "runtime.shard_executor=deployment")
    assert _same(A.read_rows(tmp_path / "fanned" / "constructed" / key), b)
    assert "3 shard runs submitted to deployment generate-shard/generate-shard" in fanned

    from_server = subprocess.run([sys.executable, "-m", "prefect", "flow-run", "ls", "--flow-name", "generate-shard",
                                  "--state", "COMPLETED", "--limit", "50"], env=server, cwd=ROOT,
                                 capture_output=True, text=True)
    assert from_server.stdout.count("shard-") >= 3, from_server.stdout  # 3 shards ran on the workers
    queue = subprocess.run([sys.executable, "-m", "prefect", "work-queue", "inspect", "shards", "--pool", "advfeatures",
                            "-o", "json"], env=server, cwd=ROOT, capture_output=True, text=True)
    assert json.loads(queue.stdout)["concurrency_limit"] == 2, queue.stdout + queue.stderr  # serve --shard-limit 2

    url = f"file://{tmp_path}/url"
    on_url = _run(server, tiny_tar, url, "runtime.shard_executor=deployment")
    assert "3 shard runs submitted to deployment generate-shard/generate-shard" in on_url
    assert _same(A.read_rows(url + f"/constructed/{key}"), b)
    markers = [p for p in (tmp_path / "url" / "constructed" / key / "_shards").glob("*.json")]
    assert len(markers) == 3
    assert not (tmp_path / "url" / ".locks").exists()  # URL store: Prefect's locks, not flock files
    again = _run(server, tiny_tar, url, "runtime.shard_executor=deployment")
    assert "shard runs submitted" not in again and "computed this run: 0.0 s" in again
    assert any((tmp_path / "url" / ".prefect" / "results").iterdir())  # records beside the artifacts


def test_a_shard_run_killed_mid_write_is_resubmitted_and_the_set_is_identical(server, reference, tiny_tar,
                                                                               tmp_path):
    """SIGKILL of a worker's shard flow run after its rows, before its marker: the worker reports
    the run Crashed, the parent resubmits it, no marker vouches for partial data, and the set is
    byte-identical to an uninterrupted in-process run."""
    killed = Path(server["ADVFEATURES_TEST_KILL_ONCE"])
    assert not killed.exists()
    out = _run(server, tiny_tar, tmp_path / "crash-store", "runtime.shard_executor=deployment")
    assert killed.exists(), "the fault was not injected"
    assert "ended Crashed; resubmitting (try 2)" in out, out[-3000:]
    key, b = reference
    assert _same(A.read_rows(tmp_path / "crash-store" / "constructed" / key), b)
    from pipeline.stages import verify
    from storage.store import Store

    assert verify(Store(tmp_path / "crash-store"), key) == []
