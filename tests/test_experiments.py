"""Experiments over one stage graph: the registry, the CLI, and one plan run two ways (the flow,
and the executors alone without Prefect) giving byte-identical artifacts."""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pytest  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from advfeatures.config import ConfigError, resolve  # noqa: E402
from flows.cli import main  # noqa: E402
from pipeline import kinds  # noqa: E402
from pipeline.common import Context  # noqa: E402
from pipeline.experiments import EXPERIMENTS, get  # noqa: E402
from pipeline.stages import source_sha256  # noqa: E402
from storage import arrays as A  # noqa: E402
from storage.store import Store  # noqa: E402


def test_registry_and_cli_list(capsys):
    assert "replicate" in EXPERIMENTS
    with pytest.raises(ConfigError, match="advfeatures experiments"):
        get("no-such-experiment")
    assert main(["experiments"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(EXPERIMENTS) and lines[0].startswith("replicate ")
    assert main(["run", "--experiment", "nope", "--profile", "tiny"]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err


def test_every_stage_kind_is_declared_once_with_an_executor():
    assert set(kinds.KINDS) == {"dataset", "model", "construct", "select", "student", "eval", "run"}
    for name, kind in kinds.KINDS.items():
        assert callable(kinds.executor(name)) and kinds.SCHEMA[name] == kind.schema
    with pytest.raises(ValueError, match="declared twice"):
        kinds.declare("model", 9, "models", "x:y", "again")
    with pytest.raises(ValueError, match="unknown stage kind"):
        kinds.StageSpec("nope", {})


def _artifacts(store: Store, plan) -> dict[str, bytes | dict]:
    """What a plan computed, byte for byte: model weights, every constructed set's arrays, the tables."""
    out = {}
    for spec in plan.stages():
        path = store.path(spec.folder, spec.key)
        if spec.folder == "models":
            out[spec.key] = (path / "weights.pt").read_bytes()
        elif spec.folder == "constructed":
            out[spec.key] = {k: v.tobytes() for k, v in A.read_rows(path).items()}
        elif spec.folder == "evals":
            out[spec.key] = store.manifest(spec.folder, spec.key)["metrics"]
        elif spec.folder == "runs":
            out[spec.key] = (path / "table.csv").read_text()
    return out


def test_the_flow_and_the_bare_executors_compute_the_same_bytes(tmp_path, tiny_tar):
    over = ["construct.select=0.5"]  # every kind of stage, selection included
    cfg = resolve("tiny", over, data=str(tiny_tar), store=str(tmp_path / "bare"))
    plan = get("replicate").plan(cfg, source_sha256(tiny_tar))
    bare = Store(cfg.runtime.store)
    ctx = Context(runtime=cfg.runtime, data=cfg.data, plan=plan, config=cfg)
    assert kinds.run_all(bare, plan, ctx) == plan.run.key
    from flows.replicate import run_experiment

    with prefect_test_harness():
        out = run_experiment(experiment="replicate", profile="tiny", overrides=over, data=str(tiny_tar),
                             store=str(tmp_path / "flow"))
    assert out["run_key"] == plan.run.key and out["experiment"] == "replicate"
    a, b = _artifacts(bare, plan), _artifacts(Store(tmp_path / "flow"), plan)
    assert a.keys() == b.keys() and len(a) == len([s for s in plan.stages() if s.stage != "dataset"])
    for key in a:
        assert a[key] == b[key], key
