"""Corrupted or truncated artifacts are detected (and repairable), never silently used."""

import shutil

import numpy as np
import pytest
from conftest import build

from advfeatures.config import resolve
from flows.cli import main as cli_main
from pipeline import stages
from storage import arrays as A
from storage.store import IntegrityError, Store


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_tar):
    cfg, st, plan = build(tiny_tar, tmp_path_factory.mktemp("pristine") / "store", ["construct.sets=[det]"])
    spec = plan.constructs["det"]
    stages.generate(st, spec, cfg.runtime)
    return cfg, st, plan, spec


@pytest.fixture()
def made(pristine, tmp_path):
    """The dataset, source and det set made once for the module, copied for each test to damage."""
    cfg, st, plan, spec = pristine
    shutil.copytree(st.root, tmp_path / "store", ignore=shutil.ignore_patterns(".locks"))
    return cfg, Store(tmp_path / "store"), plan, spec


def _x_chunk(st, spec, chunk):
    return st.path("constructed", spec.key) / "x" / "c" / str(chunk) / "0" / "0" / "0"


def test_intact_artifacts_verify(made):
    cfg, st, plan, spec = made
    for key in (plan.dataset.key, plan.source.key, spec.key):
        assert stages.verify(st, key) == []


@pytest.mark.parametrize("damage", ["truncate", "swap"])
def test_corrupt_chunk_is_detected_repaired_and_regenerated(made, damage, capsys):
    cfg, st, plan, spec = made
    path = st.path("constructed", spec.key)
    before = A.read_rows(path)
    victim = _x_chunk(st, spec, 2)  # chunk 2 of 25 rows = shard 1 (rows 50:100)
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:40])
    else:  # a well-formed chunk with the wrong rows: only the checksum can tell
        shutil.copy(_x_chunk(st, spec, 0), victim)
    problems = stages.verify(st, spec.key)
    assert len(problems) == 1 and problems[0].startswith("shard 1 rows 50:100")
    student = plan.students[0].student
    with pytest.raises(IntegrityError, match="verify .* --repair"):
        stages.train_student(st, student, cfg.runtime)
    assert not st.is_complete("models", student.key)
    from pipeline.plan import select_spec

    selection = select_spec(resolve("tiny", ["construct.select=0.5"]), spec, plan.source)
    with pytest.raises(IntegrityError, match="verify .* --repair"):  # nor is a selection made of it
        stages.select_rows(st, selection, cfg.runtime)
    assert not st.is_complete("constructed", selection.key)
    assert cli_main(["verify", spec.key, "--store", str(st.root)]) == 1
    assert "CORRUPT" in capsys.readouterr().out
    marker0 = A.marker_path(path, 0).stat().st_mtime_ns
    assert cli_main(["verify", spec.key, "--store", str(st.root), "--repair"]) == 1
    assert not st.is_complete("constructed", spec.key) and stages.prepare_construct(st, spec) == [1]
    assert stages.run_shard(st, spec, 1, cfg.runtime)["shard"] == 1
    stages.finalize_construct(st, spec)
    assert A.marker_path(path, 0).stat().st_mtime_ns == marker0  # good shards were not redone
    after = A.read_rows(path)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # bit-identical to the original
    assert cli_main(["verify", spec.key, "--store", str(st.root)]) == 0


def test_tampered_weights_are_refused(made):
    cfg, st, plan, spec = made
    w = st.path("models", plan.source.key) / "weights.pt"
    w.write_bytes(w.read_bytes()[:-100] + b"\0" * 100)
    with pytest.raises(IntegrityError, match="sha256"):
        stages.load_model(st, plan.source.key)
    assert stages.verify(st, plan.source.key) == ["weights.pt is missing or does not match its sha256"]


def test_corrupt_dataset_is_detected(made):
    cfg, st, plan, spec = made
    chunk = st.path("datasets", plan.dataset.key) / "test" / "labels" / "c" / "0"
    chunk.write_bytes(chunk.read_bytes()[:10])
    assert stages.verify(st, plan.dataset.key)[0].startswith("dataset arrays unreadable")


def test_unknown_key(made, capsys):
    cfg, st, plan, spec = made
    assert cli_main(["verify", "0123456789abcdef", "--store", str(st.root)]) == 2
    assert "no artifact" in capsys.readouterr().err


def test_verify_honours_the_store_environment_variable(made, monkeypatch, capsys):
    """`advfeatures verify KEY` without --store checks the store of ADVFEATURES_STORE (as a
    container's or worker's runs do), not ./.advstore."""
    cfg, st, plan, spec = made
    monkeypatch.setenv("ADVFEATURES_STORE", str(st.root))
    monkeypatch.chdir(st.root.parent)
    assert cli_main(["verify", spec.key]) == 0
    assert f"constructed/{spec.key}: OK" in capsys.readouterr().out
