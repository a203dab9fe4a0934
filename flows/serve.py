"""`advfeatures serve` and `advfeatures deploy`.

``deploy``: against the server at PREFECT_API_URL, create the `advfeatures` process work pool,
register prefect.yaml's deployments (`replicate` on the pool's `control` queue, `generate-shard` on
its `shards` queue), give their runs a heartbeat every ``heartbeat`` seconds (job variable
PREFECT_FLOWS_HEARTBEAT_FREQUENCY) and install Prefect's zombie-run automation, which marks a run
of them Crashed once it has sent no heartbeat for ``heartbeat_multiple`` periods
(``flows.liveness``). Docker's compose file runs it once before the workers start.

``serve``: a local Prefect server with its UI, ``deploy``, one controller worker (queue `control`:
runs `replicate` flow runs, which train the models and fan shards out) and N shard workers (queue
`shards`, one flow run at a time each), supervised (``flows.supervise``): a worker that exits is
restarted with a back-off and never takes the server or the other workers down; SIGTERM or Ctrl-C
stops everything. Prints ``ready: <api url>`` once all is up. How many shards run at once is
bounded by the shard workers and, optionally, by a concurrency limit on the `shards` queue
(``--shard-limit``), never by locks of ours.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(os.environ.get("ADVFEATURES_HOME") or Path(__file__).resolve().parent.parent)
POOL = "advfeatures"
CONTROL_QUEUE, SHARD_QUEUE = "control", "shards"
QUERY_SECONDS = "15"
"""How often each worker polls the server for runs (PREFECT_WORKER_QUERY_SECONDS, unless set), as the
fallback only: workers (``flows.worker``, which applies it) take runs when the server's events say
one was scheduled, taken or ended. Each poll costs the server CPU (~45 ms here: an idle server with
2 workers used 18.7% of a core polling every 1 s, 12% every 5 s, 8.3% every 30 s with event
wake-ups), and two PGD processes beside it ran ~10% slower with 1-s polls. Under 60 s, so Prefect's
foreman keeps the queues ready."""


def _prefect(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=ROOT, check=check,
                          capture_output=True, text=True)


def _wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the Prefect server at {url} did not become healthy in {timeout:.0f} s")


DEPLOYMENTS = ("replicate/replicate", "experiment/experiment", "generate-shard/generate-shard")


def deploy(env: dict[str, str] | None = None, pool_limit: int | None = None, shard_limit: int | None = None,
           heartbeat: int = 30, heartbeat_multiple: float | None = None) -> None:
    """Work pool, queues (with optional limits), the deployments of prefect.yaml with their
    heartbeat period, and the zombie-run automation."""
    env = dict(os.environ if env is None else env)
    multiple = _check_heartbeat(heartbeat, heartbeat_multiple)
    if not (ROOT / "prefect.yaml").is_file():
        raise RuntimeError(f"no prefect.yaml in {ROOT}: run from the advfeatures checkout or set ADVFEATURES_HOME")
    env.setdefault("ADVFEATURES_HOME", str(ROOT))
    api = env.get("PREFECT_API_URL")
    with _client(api) as client:  # through the API, not `prefect work-pool` processes (~4 CPU-s each)
        _work_pool(client, pool_limit)
    deployed = _prefect("--no-prompt", "deploy", "--all", env=env, check=False)
    if deployed.returncode:
        raise RuntimeError(f"prefect deploy failed:\n{deployed.stdout[-2000:]}{deployed.stderr[-2000:]}")
    with _client(api) as client:
        if shard_limit:  # the queue exists once a deployment names it
            queue = client.read_work_queue_by_name(SHARD_QUEUE, work_pool_name=POOL)
            client.update_work_queue(queue.id, concurrency_limit=shard_limit)
        _heartbeats(client, heartbeat, multiple)


@contextlib.contextmanager
def _client(api: str | None):
    """A synchronous Prefect client of the server at ``api`` (PREFECT_API_URL's, if None)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api} if api else {}), get_client(sync_client=True) as client:
        yield client


def _work_pool(client, pool_limit: int | None) -> None:
    """The process work pool (kept if it exists, as `prefect work-pool create` would) and its limit."""
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    try:
        client.create_work_pool(WorkPoolCreate(name=POOL, type=ProcessWorker.type,
                                               base_job_template=ProcessWorker.get_default_base_job_template()))
    except ObjectAlreadyExists:
        pass
    if pool_limit:
        client.update_work_pool(POOL, WorkPoolUpdate(concurrency_limit=pool_limit))


def _check_heartbeat(heartbeat: int, multiple: float | None) -> float:
    """The multiple to use (fanout.heartbeat_multiple's default unless given), after checking both."""
    from flows.settings import FanoutConfig
    from flows import liveness

    multiple = multiple or FanoutConfig().heartbeat_multiple
    if heartbeat < liveness.min_period() or multiple <= 1:
        raise ValueError(f"--heartbeat {heartbeat} --heartbeat-multiple {multiple:g}: the period must be >= "
                         f"{liveness.min_period()} s (Prefect's minimum) and the multiple > 1")
    return multiple


def _heartbeats(client, heartbeat: int, multiple: float) -> None:
    """Each deployment's runs beat every ``heartbeat`` s (their job variables' environment), and
    the automation crashes those that stop for ``multiple`` periods."""
    from prefect.client.schemas.actions import DeploymentUpdate

    from flows import liveness

    for name in DEPLOYMENTS:
        d = client.read_deployment_by_name(name)
        job = dict(d.job_variables or {})
        job["env"] = {**(job.get("env") or {}), liveness.HEARTBEAT_ENV: str(heartbeat)}
        client.update_deployment(d.id, DeploymentUpdate(job_variables=job))
    liveness.install_zombie_automation(client, heartbeat, multiple)


def worker_command(queue: str, limit: int | None = None, name: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "flows.worker", "--pool", POOL, "--work-queue", queue]  # flows/worker.py
    return cmd + (["--limit", str(limit)] if limit else []) + (["--name", name] if name else [])


def serve(workers: int = 2, port: int = 4200, host: str = "127.0.0.1", pool_limit: int | None = None,
          shard_limit: int | None = None, heartbeat: int = 30, heartbeat_multiple: float | None = None) -> int:
    from flows.fanout import CONTROL_WORKER_PREFIX
    from flows.supervise import Child, Stop, Supervisor, become_subreaper, install_sigterm

    _check_heartbeat(heartbeat, heartbeat_multiple)  # before anything starts
    install_sigterm()
    become_subreaper()
    api = f"http://{host}:{port}/api"
    env = {**os.environ, "PREFECT_API_URL": api, "ADVFEATURES_HOME": str(ROOT),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    sup = Supervisor(log=lambda msg: print(f"serve: {msg}", flush=True))
    server = sup.start(Child("prefect server", [sys.executable, "-m", "prefect", "server", "start", "--host", host,
                                                "--port", str(port)], env, str(ROOT)))
    workers_: list = []
    try:
        _wait_healthy(api, server.proc)
        deploy(env, pool_limit=pool_limit, shard_limit=shard_limit, heartbeat=heartbeat,
               heartbeat_multiple=heartbeat_multiple)
        name = f"{CONTROL_WORKER_PREFIX}-{port}"
        workers_.append(sup.start(Child(f"controller worker {name}", worker_command(CONTROL_QUEUE, name=name),
                                        env, str(ROOT))))
        for i in range(workers):
            name = f"shard-{i + 1}-{port}"
            workers_.append(sup.start(Child(f"shard worker {name}", worker_command(SHARD_QUEUE, limit=1, name=name),
                                            env, str(ROOT))))
        print(f"ready: {api} (UI at http://{host}:{port}); pool {POOL}: 1 controller worker "
              f"(queue {CONTROL_QUEUE}), {workers} shard workers (queue {SHARD_QUEUE}); workers that exit are "
              "restarted; Ctrl-C or SIGTERM stops all", flush=True)
        sup.run()
        return 0
    except (KeyboardInterrupt, Stop):
        print("serve: stopping the workers, their flow runs and the server", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sup.stop(first=workers_, last=[server])
