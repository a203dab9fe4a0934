"""The layers, proven by blocking modules in sys.modules in a fresh interpreter:

    advfeatures/  the maths: imports neither storage nor prefect, nor a display library (rich, matplotlib)
    storage/      imports neither torch nor prefect
    pipeline/     stage executors, plans, reports: imports no prefect; executors need no display library
    tasks/, flows/ alone import prefect

Every check runs in one interpreter, one after another (each start imports torch: ~5 CPU-s). Before
each, the project's own modules are forgotten, so a layer imported by an earlier check is imported
again, or refused, by the next. A third-party module is never blocked after it was imported: the
checks that block torch come first, and each check blocks the display libraries and prefect if a
later one does.
"""

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("advfeatures", "storage", "pipeline", "tasks", "flows")
DISPLAY = ["rich", "matplotlib"]


def _modules(pkg):
    return [m.name for m in pkgutil.walk_packages([str(ROOT / pkg)], prefix=f"{pkg}.")]


# (name, modules, blocked, whether the import must fail), in the order they run
CHECKS = [
    ("storage", _modules("storage"), ["prefect", "torch", "advfeatures", "pipeline", "tasks", "flows", *DISPLAY], False),
    ("pipeline.stages.model needs torch", ["pipeline.stages.model"], ["torch", "prefect", *DISPLAY], True),
    ("advfeatures", _modules("advfeatures"), ["prefect", "storage", "pipeline", "tasks", "flows", *DISPLAY], False),
    ("pipeline.stages needs storage", ["pipeline.stages"], ["storage", "prefect", *DISPLAY], True),
    # progress is a hook: the executors emit events without rich or matplotlib (the CLI's display
    # imports rich; only the report imports matplotlib)
    ("executors", ["pipeline.progress", "pipeline.stages", "pipeline.inventory", "pipeline.experiments"],
     ["prefect", "tasks", "flows", *DISPLAY], False),
    ("pipeline", _modules("pipeline"), ["prefect", "tasks", "flows"], False),
    ("tasks.stages needs prefect", ["tasks.stages"], ["prefect"], True),
]

RUNNER = """
import importlib, json, sys, traceback
checks, project = json.loads(sys.argv[1]), tuple(sys.argv[2].split())
out = {}
for name, mods, blocked, _ in checks:
    for k in [k for k in sys.modules if k.split(".")[0] in project]:
        del sys.modules[k]
    for b in blocked:
        sys.modules[b] = None
    try:
        for m in mods:
            importlib.import_module(m)
        bad = sorted(k for k, v in sys.modules.items() if v is not None and k.split(".")[0] in blocked)
        out[name] = {"ok": not bad, "error": f"imported {bad}" if bad else ""}
    except ImportError:
        out[name] = {"ok": False, "error": traceback.format_exc()[-2000:]}
    for b in blocked:
        if sys.modules.get(b, 0) is None:
            del sys.modules[b]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def results():
    out = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(CHECKS), " ".join(PROJECT)], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [c[0] for c in CHECKS if not c[3]])
def test_layer_imports_nothing_above_it(results, name):
    mods = next(c[1] for c in CHECKS if c[0] == name)
    assert len(mods) >= 3, mods
    assert results[name]["ok"], results[name]["error"]


@pytest.mark.parametrize("name", [c[0] for c in CHECKS if c[3]])
def test_blocking_works(results, name):
    """The checks above can fail: a module that needs a blocked one does not import."""
    blocked = next(c[2][0] for c in CHECKS if c[0] == name)
    assert not results[name]["ok"] and blocked in results[name]["error"], results[name]


def test_pipeline_layer_holds_the_executors():
    mods = _modules("pipeline")
    assert {"pipeline.kinds", "pipeline.plan", "pipeline.report", "pipeline.stages.construct", "pipeline.progress",
            "pipeline.figures", "pipeline.html_report", "pipeline.report_data", "pipeline.inventory"} <= set(mods)
    assert not (ROOT / "advfeatures" / "stages.py").exists()
