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
    """A committed run table's summary rows, by set: over sources x students (``acc_xy_std``
    then the spread between sources), else over seeds (one seed: its rows, acc_xy_% as the mean)."""
    text = path.read_text()
    for head in ("Over sources", "Over seeds"):
        if head in text:
            over = text[text.index(head):]
            header = [c.strip() for c in next(ln for ln in over.splitlines() if ln.startswith("| set ")).strip("|")
                      .split("|")]
            rows = {r[0]: dict(zip(header, r)) for r in _markdown_rows(over, "set ")}
            for r in rows.values():
                r.setdefault("acc_xy_std", r.get("acc_xy_between_std", ""))
            return rows
    header = [c.strip() for c in text.splitlines()[0].strip("|").split("|")]
    return {r[0]: {**dict(zip(header, r)), "acc_xy_mean": dict(zip(header, r))["acc_xy_%"]}
            for r in _markdown_rows(text, "set ")}


def test_readme_results_tables_are_the_committed_tables():
    """Each table of "What it finds" follows the line naming its source (Source: [`results/...md`]);
    its "acc (X, Y)" cell is the summary's mean ± std (over sources: ± the spread between sources),
    its "acc (X, Y+1)" cell the summary's mean, a "within" column the spread within sources and an
    "interval" column the 95% interval; a column headed "without selection" is checked against the
    table named by its own line (Without selection: [`results/...md`]), n = 1 there."""
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
        col = {h: j for j, h in enumerate(header)}
        xy = next(j for h, j in col.items() if h.startswith("acc (X, Y)"))
        xy1 = next(j for h, j in col.items() if h.startswith("acc (X, Y+1)"))
        for cells in _markdown_rows(part, "set |"):
            name = re.sub(r"\s*\(control\)", "", cells[0])
            m = re.fullmatch(r"\**([\d.]+) ± ([\d.]+)\**", cells[xy])
            assert m, f"README row {cells}: acc (X, Y) is not 'mean ± std'"
            assert name in table, f"README row {name!r} is not in {committed}"
            row = table[name]
            assert (float(m.group(1)), float(m.group(2))) == (float(row["acc_xy_mean"]), float(row["acc_xy_std"])), \
                f"{name}: README {cells[xy]} vs {committed}: {row['acc_xy_mean']} ± {row['acc_xy_std']}"
            assert float(cells[xy1]) == pytest.approx(float(row["acc_xy1_mean"])), f"{name}: (X, Y+1) {cells[xy1]}"
            checked += 1
            for h, cell in zip(header, cells):
                if h.startswith("within") and cell:
                    assert float(cell) == float(row["acc_xy_within_std"]), f"{name}: {h} {cell}"
                if h.startswith("95%") and cell:
                    lo, hi = (float(v) for v in re.findall(r"-?[\d.]+", cell))
                    assert (lo, hi) == (float(row["acc_xy_ci95_lo"]), float(row["acc_xy_ci95_hi"])), f"{name}: {cell}"
                if "without selection" in h and cell not in ("", "-", "—"):
                    assert nosel, "a 'without selection' column with no 'Without selection: [`results/...md`]' line"
                    other = _over_seeds(ROOT / nosel.group(1))
                    assert float(cell.strip("*")) == float(other[name]["acc_xy_mean"]), f"{name}: {h} {cell}"
                    checked += 1
    assert checked >= 6


# ---------------------------------------------------------------------------------------------
# docs/results.md: every table that names its source file agrees with that file

EXEMPT = re.compile(r"paper|replication|reference|rebuild|nakkiran|published|cost|time|wall|train on|when|what|"
                    r"lever|setting", re.I)
"""Columns whose numbers are not from the named file: published references, costs, prose."""
NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?![\w])")


def numbers(text: str) -> list[tuple[float, int]]:
    """Every number of a text, with its decimals (thousands separators dropped)."""
    out = []
    for m in NUMBER.finditer(str(text).replace("−", "-")):
        tok = m.group(0).replace(",", "")
        out.append((float(tok), len(tok.split(".")[1]) if "." in tok else 0))
    return out


def _label(text: str) -> str:
    """A row's label as both tables write it: no markup, no parentheses, numbers as floats."""
    t = re.sub(r"\*\*|`", "", str(text))
    if re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", t):
        return repr(float(t))
    t = re.sub(r"\([^)]*\)", "", t)
    return re.sub(r"\s+", " ", t.replace(" students", "").replace("standard ", "")).strip().lower()


def tables(text: str) -> list[tuple[int, list[str], list[list[str]]]]:
    """Every Markdown table of a text: (line number of its header, header, rows)."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"\|[\s:|-]+\|$", lines[i + 1].strip()):
            cells = lambda ln: [c.strip() for c in ln.strip().strip("|").split("|")]  # noqa: E731
            header, rows, j = cells(lines[i]), [], i + 2
            while j < len(lines) and lines[j].startswith("|"):
                rows.append(cells(lines[j]))
                j += 1
            out.append((i, header, rows))
            i = j
        else:
            i += 1
    return out


def source_rows(path: Path) -> list[list[str]]:
    """The rows of a committed table file (every table of a Markdown file; a CSV's rows)."""
    import csv

    if path.suffix == ".csv":
        with path.open() as f:
            return [list(r) for r in list(csv.reader(f))[1:]]
    return [r for _, _, rows in tables(path.read_text()) for r in rows]


def candidates(rows: list[list[str]], label: str) -> list[float]:
    """The numbers of the source rows labelled ``label`` (in any cell), or of every row if none
    is; with the mean of each column over those rows (a mean over seeds)."""
    mine = [r for r in rows if any(_label(c) == label for c in r)] or rows
    out = [v for r in mine for c in r for v, _ in numbers(c)]
    for col in range(max(map(len, mine))):
        vals = [numbers(r[col])[0][0] for r in mine if col < len(r) and len(numbers(r[col])) == 1]
        if len(vals) > 1:
            out.append(sum(vals) / len(vals))
    return out


def named_tables(text: str):
    """(table, its source files) for every table after a 'Source:' line naming files under
    results/ (the line since the previous table or heading)."""
    lines, src, out = text.splitlines(), None, []
    starts = {i: (h, r) for i, h, r in tables(text)}
    i = 0
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("#"):
            src = None
        m = re.match(r"Source: (.*)", ln)
        if m:
            src = re.findall(r"`(results/[^`]+\.(?:md|csv))`", m.group(1))
        if i in starts:
            header, rows = starts[i]
            if src:
                out.append((i + 1, header, rows, src))
            src = None
            i += len(rows) + 2
            continue
        i += 1
    return out


def mismatches(text: str) -> list[str]:
    bad = []
    for line, header, rows, files in named_tables(text):
        source = [r for f in files for r in source_rows(ROOT / f)]
        for row in rows:
            pool = candidates(source, _label(row[0]))
            for col, cell in zip(header[1:], row[1:]):
                if EXEMPT.search(col):
                    continue
                for x, d in numbers(cell):
                    if not any(abs(c - x) <= 0.5 * 10 ** -d + 1e-9 for c in pool):
                        bad.append(f"line {line} ({files[0]}): {row[0]!r}, {col!r}: {x} is not in the source")
    return bad


DIFFERENCE = re.compile(r"(-?\d+(?:\.\d+)?) [−-] (-?\d+(?:\.\d+)?) = (-?\d+(?:\.\d+)?)")


def wrong_differences(text: str) -> list[str]:
    """Every quoted difference 'A − B = D' must be A minus B, to D's rounding."""
    bad = []
    for m in DIFFERENCE.finditer(text):
        a, b, d = (float(g) for g in m.groups())
        dec = len(m.group(3).split(".")[1]) if "." in m.group(3) else 0
        if abs(a - b - d) > 0.5 * 10 ** -dec + 1e-9:
            bad.append(m.group(0))
    return bad


def test_results_page_tables_equal_their_named_sources():
    text = (ROOT / "docs" / "results.md").read_text()
    assert len(named_tables(text)) >= 10, "docs/results.md names the source of too few tables"
    assert mismatches(text) == []
    assert wrong_differences(text) == [] and wrong_differences((ROOT / "README.md").read_text()) == []


def test_the_docs_check_finds_a_changed_cell_and_a_wrong_difference():
    page = ("Source: `results/cpu/controls/table.md`\n\n| set | acc (X, Y), seeds 0 / 1 / 2 | mean |\n|---|---:|---:|\n"
            "| rand | 64.3 / 63.9 / 64.5 | 64.2 ± 0.3 |\n")
    assert mismatches(page) == []
    assert len(mismatches(page.replace("63.9", "63.2"))) == 1
    assert wrong_differences("rand 64.2 − 57.0 = 7.2") == [] and wrong_differences("64.2 − 57.0 = 7.9")
