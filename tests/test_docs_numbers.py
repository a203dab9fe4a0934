"""The README's headline numbers are the committed table's: every "mean ± std" and (X, Y+1) cell
of the README's results table equals the over-seeds row of the same set in the results table it
names, so that a rerun committed without the README (or the reverse) fails here."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _markdown_rows(text: str, first_header: str) -> list[list[str]]:
    """The rows of the first Markdown table whose header starts with ``first_header``."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header}"))
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return rows


def test_readme_headline_table_is_the_committed_table():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## What it finds"):]
    source = re.search(r"Source: \[`(results/[^`]+\.md)`\]", section)
    assert source, "the README's headline section names no committed table (Source: [`results/...md`])"
    committed = ROOT / source.group(1)
    text = committed.read_text()
    over = text[text.index("Over seeds"):]
    seeds = _markdown_rows(over, "set ")
    header = [c.strip() for c in next(ln for ln in over.splitlines() if ln.startswith("| set ")).strip("|").split("|")]
    table = {r[0]: dict(zip(header, r)) for r in seeds}
    checked = 0
    for cells in _markdown_rows(section, "set |"):
        name = re.sub(r"\s*\(control\)", "", cells[0])
        m = re.fullmatch(r"\**([\d.]+) ± ([\d.]+)\**", cells[2])
        assert m, f"README row {cells}: acc (X, Y) is not 'mean ± std'"
        assert name in table, f"README row {name!r} is not in {committed}"
        row = table[name]
        assert (float(m.group(1)), float(m.group(2))) == (float(row["acc_xy_mean"]), float(row["acc_xy_std"])), \
            f"{name}: README {cells[2]} vs {committed}: {row['acc_xy_mean']} ± {row['acc_xy_std']}"
        assert float(cells[3]) == pytest.approx(float(row["acc_xy1_mean"])), f"{name}: (X, Y+1) {cells[3]}"
        checked += 1
    assert checked >= 6
