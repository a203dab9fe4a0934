"""The tests' migrated Prefect database: a server started on a copy of it skips the migrations
(~13 s wall, ~8 CPU-s on 2 cores). Made once per Prefect version, in Prefect's home of the tests,
by one process at a time (a file lock: pytest-xdist's workers and its controller share it).

`python tests/prefect_template.py` makes it: under pytest-xdist the controller starts that at
once (`conftest.pytest_configure`), so the template is made while the workers start and collect."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

MIGRATE = ("import asyncio\nfrom prefect.server.database import provide_database_interface as db\n"
           "asyncio.run(db().create_db())")


def template_path() -> Path:
    return Path(os.environ["PREFECT_HOME"]) / f"test-template-{version('prefect')}.db"


def ensure_template() -> Path:
    """The template's path, made first if it is not there (waiting for another process making it)."""
    import filelock

    template = template_path()
    template.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(template) + ".lock"):
        if not template.exists():
            tmp = template.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            env = {**os.environ, "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp}"}
            subprocess.run([sys.executable, "-c", MIGRATE], env=env, check=True, capture_output=True, timeout=300)
            os.replace(tmp, template)
    return template


if __name__ == "__main__":
    ensure_template()
