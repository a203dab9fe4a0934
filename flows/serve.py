"""`advfeatures serve` and `advfeatures deploy`, through Prefect's public API only.

``serve``: the `replicate` and `experiment` deployments served from this process (``prefect.serve``:
each run a subprocess of it), with prefect.yaml's descriptions, tags, parameters and schedules.
The server is the one at PREFECT_API_URL, or Prefect's own (`prefect server start`) started here
with its UI. Their runs' shards go to a Dask cluster: one LocalCluster per run by default, or the
scheduler at ``--dask-address`` (``ADVFEATURES_SET``: fanout.*/dask.* settings below each run's own
overrides, so a deployment's parameters never need to repeat them).

``deploy``: against the server at PREFECT_API_URL, the `advfeatures` process work pool and
prefect.yaml's deployments (`prefect deploy --all`); a stock `prefect worker start --pool
advfeatures` runs them (docker/compose.yaml does).

Both give their runs a heartbeat every ``heartbeat`` seconds and install Prefect's zombie-run
automation (``flows.liveness``), which marks a run Crashed when its process died without
reporting. No supervisor of ours: in Docker, compose's restart policy restarts a container.
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
from typing import Any

import yaml

from advfeatures.config import SET_ENV
from flows import liveness

ROOT = Path(os.environ.get("ADVFEATURES_HOME") or Path(__file__).resolve().parent.parent)
POOL = "advfeatures"
SERVED = {"replicate": "flows.replicate:replicate", "experiment": "flows.replicate:run_experiment"}
"""prefect.yaml's deployments by name, and the flow each serves (of the same name)."""


def deployments_yaml() -> list[dict[str, Any]]:
    path = ROOT / "prefect.yaml"
    if not path.is_file():
        raise RuntimeError(f"no prefect.yaml in {ROOT}: run from the advfeatures checkout or set ADVFEATURES_HOME")
    return yaml.safe_load(path.read_text())["deployments"]


def runner_deployments(default_overrides: list[str] | None = None) -> list[Any]:
    """prefect.yaml's deployments as deployments of this process (``flow.to_deployment``)."""
    import importlib

    from prefect.schedules import Cron

    out = []
    for d in deployments_yaml():
        module, _, name = SERVED[d["name"]].partition(":")
        fl = getattr(importlib.import_module(module), name)
        schedules = [Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
                     for s in d.get("schedules") or []]
        out.append(fl.to_deployment(d["name"], description=d.get("description"), tags=d.get("tags"),
                                    parameters=d.get("parameters"), schedules=schedules or None))
    return out


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


@contextlib.contextmanager
def _client(api: str | None = None):
    """A synchronous Prefect client of the server at ``api`` (PREFECT_API_URL's, if None)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api} if api else {}), get_client(sync_client=True) as client:
        yield client


def _work_pool(client: Any, pool_limit: int | None) -> None:
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


def deploy(pool_limit: int | None = None, heartbeat: int = 30, heartbeat_multiple: float = 3.0) -> None:
    """Work pool, prefect.yaml's deployments with their heartbeat period, and the zombie-run
    automation, on the server at PREFECT_API_URL."""
    from prefect.client.schemas.actions import DeploymentUpdate

    liveness.check_heartbeat(heartbeat, heartbeat_multiple)
    names = [d["name"] for d in deployments_yaml()]
    env = {**os.environ, "ADVFEATURES_HOME": os.environ.get("ADVFEATURES_HOME", str(ROOT))}
    with _client() as client:  # through the API, not `prefect work-pool` processes (~4 CPU-s each)
        _work_pool(client, pool_limit)
    done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"prefect deploy failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    with _client() as client:
        for name in names:
            dep = client.read_deployment_by_name(f"{name}/{name}")  # flow name = deployment name
            job = dict(dep.job_variables or {})
            job["env"] = {**(job.get("env") or {}), liveness.HEARTBEAT_ENV: str(heartbeat)}
            client.update_deployment(dep.id, DeploymentUpdate(job_variables=job))
        liveness.install_zombie_automation(client, heartbeat, heartbeat_multiple)


def server_command(host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """`prefect server start` on host:port, and its environment: its UI asks that port's API
    (PREFECT_UI_API_URL; without it the UI asks 4200, Prefect's default, and shows an error)."""
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    return cmd, {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                 "PREFECT_UI_API_URL": f"http://{host}:{port}/api"}


def serve(port: int = 4200, host: str = "127.0.0.1", dask_address: str = "", limit: int | None = None,
          heartbeat: int = 30, heartbeat_multiple: float = 3.0) -> int:
    """Serve the deployments until Ctrl-C or SIGTERM (then the server started here stops too)."""
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    liveness.check_heartbeat(heartbeat, heartbeat_multiple)
    settings = ["fanout.executor=dask"] + ([f"dask.address={dask_address}"] if dask_address else [])
    os.environ[SET_ENV] = " ".join([*os.environ.get(SET_ENV, "").split(), *settings])
    os.environ[liveness.HEARTBEAT_ENV] = str(heartbeat)  # the served runs' subprocesses inherit it
    os.environ.setdefault("ADVFEATURES_HOME", str(ROOT))
    api, server = os.environ.get("PREFECT_API_URL"), None
    if not api:
        api = f"http://{host}:{port}/api"
        cmd, env = server_command(host, port)
        server = subprocess.Popen(cmd, env=env, cwd=ROOT)
        os.environ["PREFECT_API_URL"] = api
    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        _wait_healthy(api, server)
        with temporary_settings({PREFECT_API_URL: api}):
            with _client(api) as client:
                liveness.install_zombie_automation(client, heartbeat, heartbeat_multiple)
            deployments = runner_deployments()
            for d in deployments:
                d.apply()  # registered before `ready` is said (serve registers them again, unchanged)
            shards = f"the Dask scheduler at {dask_address}" if dask_address else "a Dask LocalCluster per run"
            print(f"ready: {api} (UI at {api.removesuffix('/api')}); deployments {', '.join(SERVED)} served from this "
                  f"process; shards go to {shards}; Ctrl-C or SIGTERM stops", flush=True)
            prefect_serve(*deployments, limit=limit, print_starting_message=False)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
