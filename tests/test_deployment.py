"""Shards fanned out as flow runs of the `generate-shard` deployment to 2 process workers of a
real local Prefect server (`advfeatures serve`), against the bare executors in this process: the
same bytes, on a URL store (file://, the workers' stage locks are Prefect concurrency limits on
that server) and on a local folder (flock). Then what happens when processes die, one scenario per
failure mode: a shard run killed alone (reported Crashed by its worker), a shard worker killed with
its run (found by its lapsed heartbeats), runs whose processes died unreported (the controller
killed with its `replicate` run, a run left Pending: both marked Crashed by the zombie-run
automation), and SIGTERM to `serve`.

One server for the module; every store starts from the reference's dataset and source model, so
the runs compute only the set under test (and, in the controller's scenario, what follows it); the
server is asked over its REST API, not through `prefect` CLI processes."""

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import build, run_cli

from storage import arrays as A

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

# Loaded by every process of the served stack (server, workers, their flow runs) through PYTHONPATH:
# - the first shard marker written to a store whose path contains "crash-" SIGKILLs its own process
#   instead, after the shard's rows and before its marker, as a dying flow run would (its worker
#   lives on and reports the run Crashed);
# - the first one written to a store whose path contains "lost-" SIGKILLs the shard worker that
#   runs this flow run and then the flow run itself: a host or container lost mid-shard, after
#   which nobody reports anything and only the heartbeats tell;
# - the first marker written to a store whose path contains "orphan-" after another one parks its
#   process (a `replicate` run making its shards locally) with its heartbeats going, until the test
#   kills it: mid-set, at a moment the test knows without polling for progress;
# - Prefect's 30-s floor on heartbeat periods is lowered (ADVFEATURES_TEST_HEARTBEAT_FLOOR), so
#   the served deployments beat every few seconds and a lost run is found in seconds, not minutes.
KILL_ONCE = """
import os
if os.environ.get("ADVFEATURES_TEST_KILL_ONCE"):
    import signal
    from pathlib import Path

    import storage.arrays as _arrays

    _flag, _write = Path(os.environ["ADVFEATURES_TEST_KILL_ONCE"]), _arrays.atomic_write_json
    _lost = Path(os.environ["ADVFEATURES_TEST_KILL_ONCE"] + "-worker")
    _parked = Path(os.environ["ADVFEATURES_TEST_KILL_ONCE"] + "-parked")

    def _cmdline(pid):
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return b""

    def _kill_before_first_marker(path, obj):
        if "crash-" in str(path) and "_shards" in str(path) and not _flag.exists():
            _flag.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        if "lost-" in str(path) and "_shards" in str(path) and not _lost.exists():
            worker = os.getppid()
            if b"worker" in _cmdline(worker):
                _lost.write_text(f"{worker} {os.getpid()}")
                os.kill(worker, signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)
        if "orphan-" in str(path) and "_shards" in str(path) and not _parked.exists() \
                and any(Path(path).parent.glob("*.json")):
            import threading

            _parked.write_text(str(os.getpid()))
            threading.Event().wait()  # mid-set, beating, until the test kills this process
        return _write(path, obj)

    _arrays.atomic_write_json = _kill_before_first_marker

if os.environ.get("ADVFEATURES_TEST_HEARTBEAT_FLOOR"):
    import importlib.abc
    import importlib.util
    import sys

    _floor = int(os.environ["ADVFEATURES_TEST_HEARTBEAT_FLOOR"])

    def _relax_settings(mod):  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY is validated >= 30
        field = mod.FlowsSettings.model_fields["heartbeat_frequency"]
        field.metadata = [m for m in field.metadata if type(m).__name__ != "Ge"]
        mod.FlowsSettings.model_rebuild(force=True)

    def _relax_engine(mod):
        mod.MINIMUM_HEARTBEAT_INTERVAL = _floor

    _hooks = {"prefect.settings.models.flows": _relax_settings, "prefect.flow_engine": _relax_engine}

    class _AfterImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in _hooks:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            load, after = spec.loader.exec_module, _hooks[name]

            def exec_module(module):
                load(module)
                after(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _AfterImport())
"""
HEARTBEAT, MULTIPLE = 3, 8  # seconds between heartbeats of the served runs; periods until lost
# (8 x 3 s: a flow-run process started on a loaded machine beats within it)
POLL = 45  # seconds between the workers' polls: runs are taken on the server's events (flows.worker)
PATIENT = "fanout.heartbeat_multiple=20"  # runs that test no loss: a slow start is not judged lost
LOST_AFTER = 5  # periods: how soon the lost-worker run's parent judges its child lost (the automation: MULTIPLE)
DET = ["construct.sets=[det]", "runtime.threads=1"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    (home / "site").mkdir()
    (home / "site" / "sitecustomize.py").write_text(KILL_ONCE)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": str(POLL),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(home / "site"), os.environ.get("PYTHONPATH")])),
           "ADVFEATURES_TEST_KILL_ONCE": str(home / "killed"), "ADVFEATURES_TEST_HEARTBEAT_FLOOR": "1"}
    from conftest import free_port, migrated_database, prefect_logging_ready

    prefect_logging_ready()  # for the runs in this process (run_cli)

    migrated_database(home / "prefect.db")  # serve's server skips the migrations
    port = free_port()
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    log = open(home / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--workers", "2", "--port", str(port),
                             "--shard-limit", "2", "--heartbeat", str(HEARTBEAT), "--heartbeat-multiple",
                             str(MULTIPLE)],
                            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    while "ready:" not in (home / "serve.log").read_text():  # serve prints it once all is up
        if proc.poll() is not None or time.time() - t0 > 180:
            proc.kill()
            pytest.fail(f"advfeatures serve did not come up:\n{(home / 'serve.log').read_text()[-4000:]}")
        time.sleep(0.5)
    yield {**env, "_SERVE_PID": str(proc.pid), "_SERVE_LOG": str(home / "serve.log")}
    if proc.poll() is None:
        os.killpg(proc.pid, 2)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


@pytest.fixture(scope="module")
def reference(tiny_tar, tmp_path_factory):
    """(store folder, key, rows) of the det set made by the bare executors in this process, without
    Prefect: what every fan-out must equal. Its dataset and source model seed every other store."""
    from pipeline import stages

    cfg, st, plan = build(tiny_tar, tmp_path_factory.mktemp("reference") / "store", DET)
    spec = plan.constructs["det"]
    stages.generate(st, spec, cfg.runtime)
    return st.root, spec.key, A.read_rows(st.path("constructed", spec.key))


def _seeded(reference, dest):
    """A store at ``dest`` holding the reference's dataset and source model (no set, no lock files)."""
    for folder in ("datasets", "models"):
        shutil.copytree(reference[0] / folder, dest / folder, ignore=shutil.ignore_patterns(".*"))
    return dest


def _run(env, caplog, monkeypatch, tar, store, *extra, until=None):
    """`advfeatures run` against serve's server, in this process (conftest.run_cli: the parent is
    not what these tests kill): its log."""
    args = ["run", "--profile", "tiny", "--data", str(tar), "--store", str(store)]
    args += ["--until", until] if until else []
    for o in [*DET, *extra]:
        args += ["--set", o]
    code, log = run_cli(caplog, monkeypatch, env["PREFECT_API_URL"], *args)
    assert code == 0, log[-3000:]
    return log


def _same(rows, reference_rows) -> bool:
    return set(rows) == set(reference_rows) and all(np.array_equal(rows[k], reference_rows[k]) for k in rows)


def _api(env, path, body=None):
    req = urllib.request.Request(env["PREFECT_API_URL"] + path, method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    # a server busy with the other tests' runs may answer 503: asked again, as Prefect's client does
    for attempt in range(5):
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read() or "null")
        except urllib.error.HTTPError as e:
            if e.code != 503 or attempt == 4:
                raise
            time.sleep(2 ** attempt)


def _runs(env, *state_types, **flow_run_filter):
    body = {"flow_runs": {"state": {"type": {"any_": list(state_types)}}, **flow_run_filter}, "limit": 200}
    return _api(env, "/flow_runs/filter", body)


def _shard_runs(env, *state_types):
    body = {"flows": {"name": {"any_": ["generate-shard"]}}, "limit": 200}
    if state_types:
        body["flow_runs"] = {"state": {"type": {"any_": list(state_types)}}}
    return _api(env, "/flow_runs/filter", body)


def _pickups(env) -> dict[str, tuple[str, float]]:
    """Per generate-shard run so far: (idempotency key, seconds from Scheduled to Pending: taken by
    a worker)."""
    out = {}
    for r in _shard_runs(env):
        first = {}
        for s in sorted(_api(env, f"/flow_run_states/?flow_run_id={r['id']}"), key=lambda s: s["timestamp"]):
            first.setdefault(s["type"], dt.datetime.fromisoformat(s["timestamp"]))
        if "SCHEDULED" in first and "PENDING" in first:
            out[r["id"]] = (r["idempotency_key"] or "", (first["PENDING"] - first["SCHEDULED"]).total_seconds())
    return out


def _fan_out_lines(out):
    return "\n".join(ln for ln in out.splitlines() if "shard" in ln and ("submitted" in ln or "resubmitting" in ln
                                                                        or "lost" in ln))


def test_shards_fan_out_to_deployment_workers_and_a_killed_shard_run_is_resubmitted(server, reference, tiny_tar,
                                                                                      tmp_path, caplog, monkeypatch):
    """A set fanned out to the workers (auto-batched: 3 shards, up to 2 per run) on a URL store,
    one of its shard runs SIGKILLed after its rows, before its marker: the worker reports the run
    Crashed, the parent resubmits it, no marker vouches for partial data, and the set is
    byte-identical to the bare executors'. Runs are taken on the server's events, not polls; the
    workers' locks are Prefect's (a URL store), and a rerun submits nothing. Only the sets are
    made (--until construct): what follows them is the same with every executor (test_flow)."""
    _, key, b = reference
    killed = Path(server["ADVFEATURES_TEST_KILL_ONCE"])
    assert not killed.exists()
    url = f"file://{tmp_path}/crash-url"
    _seeded(reference, tmp_path / "crash-url")
    fanned = _run(server, caplog, monkeypatch, tiny_tar, url, "fanout.executor=deployment", PATIENT, until="construct")
    assert killed.exists(), "the fault was not injected"
    assert "2 shard runs submitted to deployment generate-shard/generate-shard (3 shards, up to 2 per run)" in fanned
    assert "ended Crashed; resubmitting (try 2)" in fanned, _fan_out_lines(fanned)
    assert _same(A.read_rows(url + f"/constructed/{key}"), b)
    from pipeline.stages import verify
    from storage.store import Store

    assert verify(Store(url), key) == []
    markers = [p for p in (tmp_path / "crash-url" / "constructed" / key / "_shards").glob("*.json")]
    assert len(markers) == 3
    # the parent goes on once the markers are there; a shard run reports its end after its marker
    _wait_for("the shard runs ended", lambda: not _shard_runs(server, "SCHEDULED", "PENDING", "RUNNING"), 60)
    completed = [r["name"] for r in _shard_runs(server, "COMPLETED")]
    # the shards ran on the workers
    assert len(completed) >= 2, [(r["name"], r["state"]["type"], r["state"]["message"]) for r in _shard_runs(server)]
    queue = _api(server, "/work_pools/advfeatures/queues/shards")
    assert queue["concurrency_limit"] == 2, queue  # serve --shard-limit 2
    firsts = [w for key_, w in _pickups(server).values() if key_.endswith(":0")]
    # taken on events: polls are 45 s (+-30%) apart, so a poll takes a run after 31.5 s at the
    # earliest; events within seconds (25 s: room for a machine busy with a second pytest worker)
    assert len(firsts) == 2 and max(firsts) < 25, (firsts, _fan_out_lines(fanned))
    assert not (tmp_path / "crash-url" / ".locks").exists()  # URL store: Prefect's locks, not flock files
    again = _run(server, caplog, monkeypatch, tiny_tar, url, "fanout.executor=deployment", PATIENT, until="construct")
    assert "shard runs submitted" not in again and "computed this run: 0.0 s" in again
    assert not (tmp_path / "crash-url" / ".prefect").exists()  # Prefect keeps no records of its own in the store


def _wait_for(what, cond, timeout):
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = cond()
        if got:
            return got
        time.sleep(1)
    pytest.fail(f"{what}: not after {timeout} s")


def _online_shard_workers(env):
    workers = _api(env, "/work_pools/advfeatures/workers/filter", {})
    return sum(1 for w in workers if w["status"] == "ONLINE" and w["name"].startswith("shard-"))


def test_a_lost_shard_worker_is_restarted_and_its_shards_resubmitted(server, reference, tiny_tar, tmp_path, caplog,
                                                                     monkeypatch):
    """SIGKILL of a shard worker together with the shard flow run it was executing, mid-shard
    (rows written, marker not): nobody reports the run, so it stays Running until its heartbeats
    lapse; then it is marked Crashed and its shards resubmitted. The server stays healthy, serve
    restarts the worker, the set is byte-identical to an uninterrupted run, no run is left Running."""
    flag = Path(server["ADVFEATURES_TEST_KILL_ONCE"] + "-worker")
    assert not flag.exists()
    store = _seeded(reference, tmp_path / "lost-store")
    out = _run(server, caplog, monkeypatch, tiny_tar, store, "fanout.executor=deployment",
               f"fanout.heartbeat_multiple={LOST_AFTER}", until="construct")
    assert flag.exists(), "the fault was not injected"
    worker_pid, run_pid = map(int, flag.read_text().split())
    print(_fan_out_lines(out))
    assert "resubmitting (try 2)" in out, out[-3000:]
    # found by its heartbeats: by this parent ("lost: no heartbeat"), or first by the zombie automation
    assert "lost: no heartbeat for over" in out or "ended Crashed; resubmitting" in out, out[-3000:]
    _, key, b = reference
    assert _same(A.read_rows(store / "constructed" / key), b)
    from pipeline.stages import verify
    from storage.store import Store

    assert verify(Store(store), key) == []
    assert _api(server, "/health") is True  # the server never went down
    log = Path(server["_SERVE_LOG"]).read_text()
    assert f"(pid {worker_pid}) exited with code -9" in log and "restarted" in log, log[-3000:]
    _wait_for("2 shard workers online again", lambda: _online_shard_workers(server) == 2, 60)
    # nothing left Running (the parent moves on once a batch's markers are there, as its run ends)
    _wait_for("no run left Running", lambda: _runs(server, "RUNNING", "PENDING") == [], 60)


def _flow_run_pid(run_id):
    """The pid of the process executing a flow run (its environment names the run)."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                env = Path(f"/proc/{d}/environ").read_bytes()
            except OSError:
                continue
            if f"PREFECT__FLOW_RUN_ID={run_id}".encode() in env:
                return int(d)
    return None


def _deployment_run(env, params):
    """A run of the replicate deployment, as `prefect deployment run` makes one: its id."""
    deployment = _api(env, "/deployments/name/replicate/replicate")
    return _api(env, f"/deployments/{deployment['id']}/create_flow_run", {"parameters": params})["id"]


def _state(env, run_id):
    return _api(env, f"/flow_runs/{run_id}")["state"]


def _left_pending(env):
    """A run of ours that entered Pending and never ran (its process died first: a generate-set
    subflow created just before its controller was SIGKILLed): its id."""
    flow = _api(env, "/flows/", {"name": "left-pending"})
    run = _api(env, "/flow_runs/", {"flow_id": flow["id"], "tags": ["advfeatures"], "state": {"type": "SCHEDULED"}})
    _api(env, f"/flow_runs/{run['id']}/set_state", {"state": {"type": "PENDING"}})
    assert _state(env, run["id"])["type"] == "PENDING"
    return run["id"]


def test_runs_whose_processes_died_are_marked_crashed_and_a_rerun_completes(server, reference, tiny_tar, tmp_path):
    """Runs nobody will report, marked Crashed by the zombie-run automation (created by `advfeatures
    deploy`): the `replicate` deployment run whose controller worker was SIGKILLed with it mid-set
    (its heartbeats stop), and a run left Pending by a dead process (it never beat). serve restarts
    the controller, and a rerun completes from the store, keeping the shards done before the kill."""
    pending = _left_pending(server)
    store = _seeded(reference, tmp_path / "orphan-store")
    params = {"profile": "tiny", "data": str(tiny_tar), "store": str(store), "overrides": [*DET, "report.write=false"]}
    run_id = _deployment_run(server, params)
    parked = Path(server["ADVFEATURES_TEST_KILL_ONCE"] + "-parked")
    pid = int(_wait_for("the run parked mid-set", lambda: parked.exists() and parked.read_text(), 300))
    assert _flow_run_pid(run_id) == pid
    kept = {p.name: p.stat().st_mtime_ns for p in store.glob("constructed/*/_shards/*.json")}
    assert kept, "no shard was done before the kill"
    worker = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert b"control" in Path(f"/proc/{worker}/cmdline").read_bytes()
    os.kill(worker, signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)
    t0 = time.time()
    window = HEARTBEAT * MULTIPLE + 60
    for what, rid in (("the replicate run", run_id), ("the Pending run", pending)):
        state = _wait_for(f"{what} marked Crashed", lambda: (s := _state(server, rid))["type"] == "CRASHED" and s,
                          window)
        print(f"{what} marked Crashed {time.time() - t0:.0f} s after the kill: {state['message']}")
        assert "no heartbeat" in state["message"]
    _wait_for("no run left Running", lambda: _runs(server, "RUNNING", "PENDING") == [], window)
    assert "controller worker" in Path(server["_SERVE_LOG"]).read_text().split("exited with code -9")[-2][-200:]
    again = _deployment_run(server, params)
    done = _wait_for("the rerun", lambda: (s := _state(server, again))["type"] in ("COMPLETED", "FAILED", "CRASHED")
                     and s, 300)
    assert done["type"] == "COMPLETED", done
    assert list(store.glob("runs/*/table.csv"))
    markers = {p.name: p.stat().st_mtime_ns for p in store.glob("constructed/*/_shards/*.json")}
    assert len(markers) == 3 and all(markers[k] == v for k, v in kept.items())  # done shards not redone


def test_sigterm_stops_serve_and_every_child_within_30_s(server, tiny_tar, tmp_path):
    """Last (it stops the module's server): SIGTERM to `serve` while a run executes stops the
    server, every worker and every flow-run process within 30 s."""
    from flows.supervise import descendants

    serve = int(server["_SERVE_PID"])
    store = tmp_path / "sigterm-store"
    run_id = _deployment_run(server, {"profile": "tiny", "data": str(tiny_tar), "store": str(store),
                                      "overrides": ["fanout.executor=deployment", "runtime.threads=1"]})
    _wait_for("the run's process", lambda: _flow_run_pid(run_id), 60)
    tree = descendants([serve])
    assert len(tree) >= 5, tree  # server, controller, 2 shard workers, the run's process
    t0 = time.time()
    os.kill(serve, signal.SIGTERM)
    _wait_for("serve to exit", lambda: not Path(f"/proc/{serve}").exists()
              or Path(f"/proc/{serve}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", 30)
    left = [p for p in tree if Path(f"/proc/{p}").exists()
            and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert left == [], [Path(f"/proc/{p}/cmdline").read_bytes()[:200] for p in left]
    assert time.time() - t0 < 30
