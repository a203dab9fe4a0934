"""The documentation: the README stays short, its links and the docs pages' links resolve, the
docs site builds with ``mkdocs build --strict``, and every CLI command is documented."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
COMMANDS = ("experiments", "run", "show-config", "verify", "serve", "deploy", "report", "ls", "gc", "synth")

# [text](target) and ![alt](target), not inside inline code; the target up to a space or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def relative_links(path: Path) -> list[str]:
    """Every relative link target of a Markdown file, outside fenced code blocks and inline code."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    out = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http(s):, mailto:, an anchor of the same page
        out.append(target)
    return out


def test_readme_is_under_200_lines():
    n = len(README.read_text().splitlines())
    assert n < 200, f"README.md has {n} lines; move detail into docs/ (the limit is 199)"


def test_readme_links_point_to_existing_files():
    links = relative_links(README)
    assert links, "README.md links to no file of the repository"
    missing = [t for t in links if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README.md links to missing paths: {missing}"


def test_docs_links_point_to_existing_files():
    missing = []
    for page in sorted(DOCS.glob("*.md")):
        for target in relative_links(page):
            if not (page.parent / target.split("#")[0]).exists():
                missing.append(f"{page.name}: {target}")
    assert not missing, f"docs pages link to missing paths: {missing}"


def test_every_cli_command_is_documented():
    text = "\n".join(p.read_text() for p in sorted(DOCS.glob("*.md")))
    missing = [c for c in COMMANDS if f"advfeatures {c}" not in text]
    assert not missing, f"commands not documented as `advfeatures <command>` in docs/: {missing}"


def test_every_docs_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {p.name for p in DOCS.glob("*.md")}
    absent = sorted(p for p in pages if not re.search(rf":\s*{re.escape(p)}\s*$", nav, re.M))
    assert not absent, f"docs pages missing from mkdocs.yml's nav: {absent}"


def test_mkdocs_builds_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs or mkdocs-material is not installed (pip install mkdocs mkdocs-material)")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                        "-d", str(tmp_path / "site")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stdout}\n{r.stderr}"
    assert (tmp_path / "site" / "index.html").exists()
