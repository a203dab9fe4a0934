"""Prefect's temporary server, started while the run command imports torch and the flows.

A run without PREFECT_API_URL uses a temporary Prefect server, a uvicorn subprocess. Prefect starts it
at the flow's first API call, once this process has imported torch, Prefect and the flows (~6 s here),
and then waits for it (~7 s; ~17 s on a new database, which it migrates first). `start` launches the
same subprocess (the same command and environment as Prefect's
``prefect.server.api.server.SubprocessASGIServer``) before those imports, so that it imports and
migrates on another core meanwhile; `hand_over` then installs it as that class's instance, which
Prefect's client finds running and uses, as it uses a server it started itself. Anything unexpected
(a server already registered, a process that exits, a timeout) gives the process back and lets Prefect
start its own: the early start can cost nothing but time.

Only where Prefect would start a temporary server with nothing but the environment to go on:
PREFECT_API_URL unset, and no profile or settings file (profiles.toml, prefect.toml, .env, a
[tool.prefect] table) that could name a server or change the server's settings.
"""
from __future__ import annotations

import atexit
import os
import random
import socket
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

# Prefect's own environment for its temporary server (SubprocessASGIServer._run_uvicorn_command)
_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
_PORTS = range(8000, 9000)  # the range Prefect picks from


@dataclass
class Early:
    process: subprocess.Popen
    port: int
    started: float
    handed: bool = False


def _settings_elsewhere() -> str | None:
    """Why Prefect's settings may not come from the environment alone (None: they do)."""
    if os.environ.get("PREFECT_API_URL"):
        return "PREFECT_API_URL is set"
    for name in ("PREFECT_PROFILES_PATH", "PREFECT_PROFILE"):
        if os.environ.get(name):
            return f"{name} is set"
    for name in ("PREFECT_SERVER_EPHEMERAL_ENABLED", "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"):  # the old name too
        value = os.environ.get(name, "").strip().lower()
        if value and value not in ("1", "true", "t", "yes", "y", "on"):
            return f"{name}={value}: the temporary server may be disabled"
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    for f in (home / "profiles.toml", Path("prefect.toml"), Path(".env")):
        if f.exists():
            return f"{f} exists"
    pyproject = Path("pyproject.toml")
    if pyproject.is_file() and "[tool.prefect" in pyproject.read_text(errors="replace"):
        return "pyproject.toml has a [tool.prefect] table"
    return None


def _free_port() -> int | None:
    for _ in range(10):
        port = random.choice(_PORTS)
        with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    return None


def start(data_source: str | None = None) -> Early | None:
    """Launch the temporary server's process now (None where Prefect would not start one from the
    environment alone, where ``data_source`` is a path that does not exist (the run stops before
    its flow), or with ADVFEATURES_EARLY_SERVER=0)."""
    if os.environ.get("ADVFEATURES_EARLY_SERVER", "1") == "0" or _settings_elsewhere():
        return None
    if data_source not in (None, "torchvision") and not Path(data_source).expanduser().exists():
        return None
    try:
        import importlib.util

        spec = importlib.util.find_spec("prefect")
        if spec is None or not spec.submodule_search_locations:
            return None
        app_dir = Path(list(spec.submodule_search_locations)[0]).parent
        port = _free_port()
        if port is None:
            return None
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "error", "--lifespan", "on"],
            env={**os.environ, **_SERVER_ENV})
    except OSError:
        return None
    early = Early(process=proc, port=port, started=time.monotonic())
    atexit.register(discard, early)  # whatever path this process leaves by
    return early


def discard(early: Early | None) -> None:
    """Stop a server that was not handed over (an error, or a run with nothing to do)."""
    if early is None or early.handed or early.process.poll() is not None:
        return
    early.process.terminate()
    try:
        early.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        early.process.kill()
        early.process.wait()


def hand_over(early: Early | None) -> bool:
    """Wait until the early server answers, then install it as Prefect's temporary server. False (and
    the process stopped) where Prefect should start its own."""
    if early is None:
        return False
    import httpx
    from prefect.logging import get_logger
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled or None in SubprocessASGIServer._instances:
        discard(early)  # a server is configured, none may be started, or one is registered: not ours
        return False
    # as long as Prefect would wait for a server it started now (the early one has had a head start)
    deadline = time.monotonic() + settings.server.ephemeral.startup_timeout_seconds
    url = f"http://127.0.0.1:{early.port}/api/health"
    with httpx.Client() as client:
        while time.monotonic() < deadline and early.process.poll() is None:
            try:
                if client.get(url).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            discard(early)  # exited (a port taken meanwhile exits 3) or too slow: Prefect starts its own
            return False
    server = SubprocessASGIServer()  # the port-None instance Prefect's get_client asks for
    server.port = early.port
    server.server_process = early.process
    server.running = True
    atexit.register(server.stop)  # as Prefect registers it for a server it started
    early.handed = True
    get_logger("prefect").info(f"Temporary server on http://127.0.0.1:{early.port}, started as the command began "
                               f"(up {time.monotonic() - early.started:.1f} s later)")
    return True
