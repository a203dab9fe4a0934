"""Prefect through its public API only (issue 38, point 5): no module of flows/, tasks/ or
pipeline/ imports a Prefect name that begins with an underscore, imports a Prefect module outside
its documented API, or reaches for an underscored attribute of something it imported from Prefect.
A Prefect upgrade then cannot break a run through an internal we leaned on."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INTERNAL_MODULES = ("prefect.server.api.server", "prefect.workers.base", "prefect.utilities.processutils",
                    "prefect.flow_engine", "prefect.task_engine", "prefect.cli")
"""Modules outside Prefect's documented API (the server's app and its subprocess runner, worker
internals, signal plumbing, engine constants, the CLI's code)."""


def _internal(module: str) -> bool:
    return any(p.startswith("_") for p in module.split(".")) or any(
        module == m or module.startswith(m + ".") for m in INTERNAL_MODULES)


def _private_uses(source: str) -> list[str]:
    """Each private use of Prefect in a module's source, as 'line: what'."""
    tree, found, from_prefect = ast.parse(source), [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "prefect":
                    from_prefect.add((a.asname or a.name).split(".")[0])
                    if _internal(a.name):
                        found.append(f"{node.lineno}: import {a.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "prefect":
            mod = node.module
            if _internal(mod):
                found.append(f"{node.lineno}: from {mod} import ...")
            for a in node.names:
                from_prefect.add(a.asname or a.name)
                if a.name.startswith("_"):
                    found.append(f"{node.lineno}: from {mod} import {a.name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in from_prefect):
            found.append(f"{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_private_prefect_api_in_flows_tasks_or_pipeline():
    bad = {str(p.relative_to(ROOT)): uses for pkg in ("flows", "tasks", "pipeline")
           for p in sorted((ROOT / pkg).rglob("*.py")) if (uses := _private_uses(p.read_text()))}
    assert bad == {}, f"private Prefect API (use its public API, or put it behind one tested function): {bad}"


def test_the_check_finds_each_kind_of_private_use():
    """The rule's own known answers: each line below is a private use, and public imports are not."""
    assert _private_uses("from prefect.server.api.server import SubprocessASGIServer") != []
    assert _private_uses("from prefect.utilities.processutils import setup_signal_handlers_worker") != []
    assert _private_uses("from prefect import flow_engine") == []  # the name is public; its constants are not:
    assert _private_uses("from prefect.flow_engine import MINIMUM_HEARTBEAT_INTERVAL") != []
    assert _private_uses("from prefect.logging import _private") != []
    assert _private_uses("import prefect._internal.compatibility") != []
    assert _private_uses("from prefect.server.api.server import X\nX._instances") != []
    assert _private_uses("from prefect import flow, task\nfrom prefect.states import Completed\n"
                         "from prefect.client.orchestration import get_client") == []
