"""flows.early_server: Prefect's temporary server started as the run command begins, then handed to
Prefect as the server it would have started itself."""
import os
import signal
import subprocess
import sys
import textwrap

from conftest import migrated_database
from flows import early_server

# In a process of its own: hand_over installs the server as Prefect's process-wide temporary server,
# which this test process (the prefect_api harness of other modules) must not get.
SCRIPT = textwrap.dedent("""
    import os, sys
    from flows import early_server

    # a server that exits before it is up: Prefect starts its own, as without an early start
    gone = early_server.start()
    gone.process.kill(); gone.process.wait()
    assert early_server.hand_over(gone) is False
    from prefect.server.api.server import SubprocessASGIServer
    assert None not in SubprocessASGIServer._instances

    # the run command: its server started as it began, handed over, used by the flow
    from flows.cli import main
    assert main(["run", "--profile", "tiny", "--data", sys.argv[1], "--store", sys.argv[2], "--until", "dataset"]) == 0
    server = SubprocessASGIServer()
    from prefect import get_client
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
    assert [r.name for r in runs] and str(server.port) in str(client.api_url), client.api_url
    print("early server used", server.server_process.pid, flush=True)
""")


def test_the_early_server_is_the_one_prefect_uses(tmp_path, tiny_tar):
    """`advfeatures run`'s flow talks to the server started as the command began (no second
    server: Prefect's own start logs "Starting temporary server"), and a process that died first is
    given back for Prefect to start its own; the server stops with the process."""
    db = tmp_path / "prefect.db"
    migrated_database(db)  # ~15 CPU-s of migrations a fresh database would cost
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{db}",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120", ADVFEATURES_EARLY_SERVER="1")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tiny_tar), str(tmp_path / "store")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # a hang (seen when Prefect starts a second server beside ours)
            os.killpg(proc.pid, signal.SIGKILL)  # the servers with it
            proc.wait()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "early server used" in stdout
    assert "Starting temporary server" not in stdout + stderr  # Prefect's line for its own start
    assert "started as the command began" in stdout + stderr
    pid = int(stdout.split("early server used")[1].split()[0])
    assert not _alive(pid), "the server outlived its process (Prefect's exit hook did not stop it)"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()  # a zombie has exited
    except FileNotFoundError:
        return False


def test_no_early_start_where_settings_may_name_a_server(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    for name in ("PREFECT_API_URL", "PREFECT_PROFILES_PATH", "PREFECT_PROFILE", "PREFECT_SERVER_EPHEMERAL_ENABLED"):
        monkeypatch.delenv(name, raising=False)
    assert early_server._settings_elsewhere() is None
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert "PREFECT_API_URL" in early_server._settings_elsewhere()
    assert early_server.start() is None
    monkeypatch.delenv("PREFECT_API_URL")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "profiles.toml").write_text('active = "x"\n')
    assert "profiles.toml" in early_server._settings_elsewhere()
    (tmp_path / "home" / "profiles.toml").unlink()
    (tmp_path / "pyproject.toml").write_text("[tool.prefect]\napi.url = 'http://x'\n")
    assert "tool.prefect" in early_server._settings_elsewhere()
    (tmp_path / "pyproject.toml").unlink()
    monkeypatch.setenv("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "f")  # the old name, a false Prefect reads
    assert "ALLOW_EPHEMERAL_MODE" in early_server._settings_elsewhere()
    monkeypatch.delenv("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE")
    monkeypatch.setenv("ADVFEATURES_EARLY_SERVER", "1")
    assert early_server.start(str(tmp_path / "missing.zip")) is None  # the run stops before its flow
    monkeypatch.setenv("ADVFEATURES_EARLY_SERVER", "0")
    assert early_server._settings_elsewhere() is None and early_server.start() is None
