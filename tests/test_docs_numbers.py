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


def _over_seeds(path: Path) -> dict[str, dict[str, str]]:
    """A committed run table's over-seeds rows, by set (one seed: its rows, acc_xy_% as the mean)."""
    text = path.read_text()
    if "Over seeds" not in text:
        header = [c.strip() for c in text.splitlines()[0].strip("|").split("|")]
        return {r[0]: {**dict(zip(header, r)), "acc_xy_mean": dict(zip(header, r))["acc_xy_%"]}
                for r in _markdown_rows(text, "set ")}
    over = text[text.index("Over seeds"):]
    header = [c.strip() for c in next(ln for ln in over.splitlines() if ln.startswith("| set ")).strip("|").split("|")]
    return {r[0]: dict(zip(header, r)) for r in _markdown_rows(over, "set ")}


def test_readme_results_tables_are_the_committed_tables():
    """Each table of "What it finds" follows the line naming its source (Source: [`results/...md`]);
    a column headed "without selection" is checked against the table named by its own line
    (Without selection: [`results/...md`]), n = 1 there."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## What it finds"):]
    section = section[:section.index("\n## ", 1)]
    sources = list(re.finditer(r"Source: \[`(results/[^`]+\.md)`\]", section))
    assert sources, "the README's headline section names no committed table (Source: [`results/...md`])"
    checked = 0
    for i, source in enumerate(sources):
        part = section[source.end():sources[i + 1].start() if i + 1 < len(sources) else len(section)]
        committed = ROOT / source.group(1)
        table = _over_seeds(committed)
        nosel = re.search(r"Without selection: \[`(results/[^`]+\.md)`\]", part)
        header = [c.strip() for c in next(ln for ln in part.splitlines() if ln.startswith("| set |")).strip("|").split("|")]
        for cells in _markdown_rows(part, "set |"):
            name = re.sub(r"\s*\(control\)", "", cells[0])
            m = re.fullmatch(r"\**([\d.]+) ± ([\d.]+)\**", cells[2])
            assert m, f"README row {cells}: acc (X, Y) is not 'mean ± std'"
            assert name in table, f"README row {name!r} is not in {committed}"
            row = table[name]
            assert (float(m.group(1)), float(m.group(2))) == (float(row["acc_xy_mean"]), float(row["acc_xy_std"])), \
                f"{name}: README {cells[2]} vs {committed}: {row['acc_xy_mean']} ± {row['acc_xy_std']}"
            assert float(cells[3]) == pytest.approx(float(row["acc_xy1_mean"])), f"{name}: (X, Y+1) {cells[3]}"
            checked += 1
            for col, cell in zip(header, cells):
                if "without selection" in col and cell not in ("", "-", "—"):
                    assert nosel, "a 'without selection' column with no 'Without selection: [`results/...md`]' line"
                    other = _over_seeds(ROOT / nosel.group(1))
                    assert float(cell.strip("*")) == float(other[name]["acc_xy_mean"]), f"{name}: {col} {cell}"
                    checked += 1
    assert checked >= 6
