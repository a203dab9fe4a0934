"""The layers, proven by blocking modules in sys.modules in a fresh interpreter:

    advfeatures/  the maths: imports neither storage nor prefect, nor a display library (rich, matplotlib)
    storage/      imports neither torch nor prefect
    pipeline/     stage executors, plans, reports: imports no prefect; executors need no display library
    tasks/, flows/ alone import prefect
"""

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _modules(pkg):
    return [m.name for m in pkgutil.walk_packages([str(ROOT / pkg)], prefix=f"{pkg}.")]


def _import_with_blocked(mods, blocked):
    code = (f"import sys\nfor b in {blocked!r}: sys.modules[b] = None\n"
            f"import importlib\nfor m in {mods!r}: importlib.import_module(m)\n"
            f"bad = [k for k, v in sys.modules.items() if v and k.split('.')[0] in {blocked!r}]\n"
            "assert not bad, bad\nprint('ok')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("pkg, blocked", [("advfeatures", ["prefect", "storage", "pipeline", "tasks", "flows", "rich",
                                                          "matplotlib"]),
                                          ("storage", ["prefect", "torch", "advfeatures", "pipeline", "rich",
                                                       "matplotlib"]),
                                          ("pipeline", ["prefect", "tasks", "flows"])])
def test_layer_imports_nothing_above_it(pkg, blocked):
    mods = _modules(pkg)
    assert len(mods) >= 3, mods
    out = _import_with_blocked(mods, blocked)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_pipeline_layer_holds_the_executors():
    mods = _modules("pipeline")
    assert {"pipeline.kinds", "pipeline.plan", "pipeline.report", "pipeline.stages.construct", "pipeline.progress",
            "pipeline.figures", "pipeline.html_report", "pipeline.report_data", "pipeline.inventory"} <= set(mods)
    assert not (ROOT / "advfeatures" / "stages.py").exists()


def test_executors_and_progress_need_no_display_library():
    """Progress is a hook: the executors emit events without rich or matplotlib (the CLI's
    display imports rich; only the report imports matplotlib)."""
    mods = ["pipeline.progress", "pipeline.stages", "pipeline.inventory", "pipeline.experiments"]
    out = _import_with_blocked(mods, ["rich", "matplotlib", "prefect"])
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("mod, blocked", [("tasks.stages", "prefect"), ("pipeline.stages", "storage"),
                                          ("pipeline.stages.model", "torch")])
@pytest.mark.slow
def test_blocking_works(mod, blocked):
    """The checks above can fail: a module that needs a blocked one does not import."""
    out = _import_with_blocked([mod], [blocked])
    assert out.returncode != 0 and blocked in out.stderr
