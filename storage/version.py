"""The code version every manifest records (``code_version``): the package's installed version
and, run from a git checkout, its commit and whether tracked files differ from it.

Read from the installed distribution's metadata, not from ``advfeatures.__version__``: storage
imports nothing of the library (tests/test_import_boundary.py, tests/test_version.py).
"""

from __future__ import annotations

import functools
import importlib.metadata
import subprocess
from pathlib import Path
from typing import Any

DISTRIBUTION = "advfeatures"
UNKNOWN = "0+unknown"  # a PEP 440 local version: not installed (run from a bare source tree)


def package_version(distribution: str = DISTRIBUTION) -> str:
    """The installed version of ``distribution`` (pyproject's ``version``), else ``UNKNOWN``."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return UNKNOWN


def git_state(folder: Path) -> dict[str, Any]:
    """``{"git": commit, "dirty": tracked files differ}`` of the checkout holding ``folder``; {}
    outside one (or without git)."""
    out: dict[str, Any] = {}
    try:
        sha = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if sha.returncode == 0:
            out["git"] = sha.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5)
            out["dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """Package version and, when run from a git checkout, the commit and whether it is dirty:
    ``{"package": "0.1.0", "git": "<sha>", "dirty": False}``."""
    return {"package": package_version(), **git_state(Path(__file__).resolve().parent.parent)}
