"""`advfeatures serve` and `advfeatures deploy`.

``deploy``: against the server at PREFECT_API_URL, create the `advfeatures` process work pool and
register prefect.yaml's deployments (`replicate` on the pool's `control` queue, `generate-shard` on
its `shards` queue). Docker's compose file runs it once before the workers start.

``serve``: a local Prefect server with its UI, ``deploy``, one controller worker (queue `control`:
runs `replicate` flow runs, which train the models and fan shards out) and N shard workers (queue
`shards`, one flow run at a time each), until Ctrl-C. Prints ``ready: <api url>`` once all is up.
How many shards run at once is bounded by the shard workers and, optionally, by a concurrency limit
on the `shards` queue (``--shard-limit``), never by locks of ours.
"""

from __future__ import annotations

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


def deploy(env: dict[str, str] | None = None, pool_limit: int | None = None,
           shard_limit: int | None = None) -> None:
    """Work pool, queues (with optional limits) and the deployments of prefect.yaml."""
    env = dict(os.environ if env is None else env)
    if not (ROOT / "prefect.yaml").is_file():
        raise RuntimeError(f"no prefect.yaml in {ROOT}: run from the advfeatures checkout or set ADVFEATURES_HOME")
    env.setdefault("ADVFEATURES_HOME", str(ROOT))
    created = _prefect("work-pool", "create", POOL, "--type", "process", env=env, check=False)
    if created.returncode and "already exists" not in created.stdout + created.stderr:
        raise RuntimeError(f"cannot create work pool {POOL}: {created.stdout}{created.stderr}")
    if pool_limit:
        _prefect("work-pool", "set-concurrency-limit", POOL, str(pool_limit), env=env)
    deployed = _prefect("--no-prompt", "deploy", "--all", env=env, check=False)
    if deployed.returncode:
        raise RuntimeError(f"prefect deploy failed:\n{deployed.stdout[-2000:]}{deployed.stderr[-2000:]}")
    if shard_limit:
        _prefect("work-queue", "set-concurrency-limit", SHARD_QUEUE, str(shard_limit), "--pool", POOL, env=env)


def worker_command(queue: str, limit: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process",
           "--work-queue", queue]
    return cmd + (["--limit", str(limit)] if limit else [])


def serve(workers: int = 2, port: int = 4200, host: str = "127.0.0.1", pool_limit: int | None = None,
          shard_limit: int | None = None) -> int:
    api = f"http://{host}:{port}/api"
    env = {**os.environ, "PREFECT_API_URL": api, "ADVFEATURES_HOME": str(ROOT),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "2")
    procs = [subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host,
                               "--port", str(port)], env=env, cwd=ROOT)]
    try:
        _wait_healthy(api, procs[0])
        deploy(env, pool_limit=pool_limit, shard_limit=shard_limit)
        procs.append(subprocess.Popen(worker_command(CONTROL_QUEUE), env=env, cwd=ROOT))
        for _ in range(workers):
            procs.append(subprocess.Popen(worker_command(SHARD_QUEUE, limit=1), env=env, cwd=ROOT))
        print(f"ready: {api} (UI at http://{host}:{port}); pool {POOL}: 1 controller worker "
              f"(queue {CONTROL_QUEUE}), {workers} shard workers (queue {SHARD_QUEUE})", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        return 1  # something died
    except KeyboardInterrupt:
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
