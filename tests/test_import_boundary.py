"""advfeatures/ and storage/ must work without prefect (blocked in sys.modules)."""

import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules(pkg):
    return [f"{pkg}.{m.name}" for m in pkgutil.iter_modules([str(ROOT / pkg)])]


def test_library_and_storage_import_without_prefect():
    mods = _modules("advfeatures") + _modules("storage")
    assert "advfeatures.attacks" in mods and "storage.arrays" in mods
    code = ("import sys; sys.modules['prefect'] = None\n"
            f"import importlib\nfor m in {mods!r}: importlib.import_module(m)\n"
            "assert not any(k == 'prefect' or k.startswith('prefect.') for k, v in sys.modules.items() if v)\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_blocking_works():
    """The check above can fail: importing tasks/ with prefect blocked raises."""
    code = "import sys; sys.modules['prefect'] = None\nimport tasks.stages"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "prefect" in out.stderr
