"""storage's own version source: manifests record the installed package's version, the git
commit and dirtiness, without importing the library (advfeatures) at all."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

from storage import version as V

ROOT = Path(__file__).resolve().parent.parent


def test_code_version_needs_no_library_and_keeps_its_fields(tmp_path):
    code = ("import sys, json\nsys.modules['advfeatures'] = None\nfrom storage.store import Store\n"
            f"print(json.dumps(Store({str(tmp_path)!r}).manifest_body('k', 'x', {{}})['code_version']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    cv = json.loads(out.stdout)
    assert cv["package"] == importlib.metadata.version("advfeatures")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout: the commit and whether tracked files differ, as before
        assert set(cv) == {"package", "git", "dirty"} and cv["git"] == head.stdout.strip()
        assert isinstance(cv["dirty"], bool)


def test_package_version_falls_back_when_not_installed(monkeypatch, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    assert V.package_version("no-such-distribution-here") == V.UNKNOWN == "0+unknown"
    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert V.code_version.__wrapped__()["package"] == "0+unknown"  # uncached: as a fresh process would
    assert V.git_state(tmp_path) == {}  # no checkout: no git fields


def test_storage_never_imports_the_library():
    pattern = re.compile(r"^\s*(import advfeatures|from advfeatures\b)", re.M)
    bad = [p.name for p in (ROOT / "storage").glob("*.py") if pattern.search(p.read_text())]
    assert bad == []
