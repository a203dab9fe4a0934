"""`advfeatures serve`: a local Prefect server with its UI, the `advfeatures` process work pool,
the deployments of prefect.yaml, and N process workers, until Ctrl-C.

Prints `ready: <api url>` once everything is up. Flow runs of the `replicate` deployment (or
`advfeatures run ... --set runtime.shard_executor=deployment` with PREFECT_API_URL set) then
fan their shards out to the workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POOL = "advfeatures"


def _prefect(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=ROOT, check=check,
                          capture_output=True, text=True)


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the Prefect server at {url} did not become healthy in {timeout:.0f} s")


def serve(workers: int = 2, port: int = 4200, host: str = "127.0.0.1", pool_limit: int | None = None) -> int:
    api = f"http://{host}:{port}/api"
    env = {**os.environ, "PREFECT_API_URL": api, "ADVFEATURES_HOME": str(ROOT),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "2")
    procs = [subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host,
                               "--port", str(port)], env=env, cwd=ROOT)]
    try:
        _wait_healthy(api, procs[0])
        created = _prefect("work-pool", "create", POOL, "--type", "process", env=env, check=False)
        if created.returncode and "already exists" not in created.stdout + created.stderr:
            raise RuntimeError(f"cannot create work pool {POOL}: {created.stdout}{created.stderr}")
        if pool_limit:
            _prefect("work-pool", "set-concurrency-limit", POOL, str(pool_limit), env=env)
        deployed = _prefect("--no-prompt", "deploy", "--all", env=env, check=False)
        if deployed.returncode:
            raise RuntimeError(f"prefect deploy failed:\n{deployed.stdout[-2000:]}{deployed.stderr[-2000:]}")
        for _ in range(workers):
            procs.append(subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL,
                                           "--type", "process", "--limit", "1"], env=env, cwd=ROOT))
        print(f"ready: {api} (UI at http://{host}:{port}); {workers} workers on pool {POOL}", flush=True)
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
