"""docs/python.md runs as written: its ```python blocks, in order, in one namespace, in an empty
folder, on the tiny synthetic data set it makes itself (a Prefect flow run against the process's
temporary server, conftest's ``prefect_api``)."""

import re
import time
from pathlib import Path

import pytest

pytest.importorskip("prefect")

PAGE = Path(__file__).resolve().parent.parent / "docs" / "python.md"


def blocks(text: str) -> list[str]:
    """The page's ```python blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_page_has_code():
    code = blocks(PAGE.read_text())
    assert len(code) >= 5, "docs/python.md lost its code blocks"
    assert any("run_experiment(" in c for c in code) and any("load_model(" in c for c in code)


@pytest.mark.slow
def test_python_page_runs(tmp_path, monkeypatch, prefect_api, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ADVFEATURES_STORE", raising=False)
    namespace: dict = {"__name__": "__docs__"}
    t0, took = time.perf_counter(), []
    for i, code in enumerate(blocks(PAGE.read_text())):
        tb = time.perf_counter()
        try:
            exec(compile(code, f"docs/python.md block {i + 1}", "exec"), namespace)
        except Exception as e:  # noqa: BLE001 - say which block, keep the traceback
            raise AssertionError(f"docs/python.md block {i + 1} failed: {type(e).__name__}: {e}\n{code}") from e
        took.append(f"block {i + 1}: {time.perf_counter() - tb:.1f} s")
    seconds = time.perf_counter() - t0
    # what the page says it shows: a run of the det set in ./store, its table, set and student
    out, table, x = namespace["out"], namespace["table"], namespace["x"]
    assert Path(out["run_dir"]) == (tmp_path / "store" / "runs" / out["run_key"]).resolve()
    assert list(table["set"]) == ["D (source)", "det"]
    assert x.shape == (120, 3, 32, 32) and (namespace["y_target"] == (namespace["y_true"] + 1) % 10).all()
    det = table[table["set"] == "det"].iloc[0]
    assert round(100 * (namespace["pred"] == namespace["y_test"]).mean(), 2) == det["acc_xy_%"]
    assert "det student" in capsys.readouterr().out
    print(f"docs/python.md ran in {seconds:.1f} s ({', '.join(took)})")  # pytest -rP shows it
