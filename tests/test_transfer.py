"""transfer (section 3.3): independent models and students per architecture, the det set's transfer
success to each, and the table, on tiny data."""

import pandas as pd
import pytest
import torch

from conftest import run_experiment
from advfeatures.config import ConfigError, resolve
from pipeline.experiments import get
from pipeline.experiments.transfer import build_table, to_markdown
from pipeline.stages import load_model, source_sha256
from storage import arrays as A


@pytest.fixture(scope="module")
def transfer_run(experiments_store, tiny_tar):
    return run_experiment("transfer", ["transfer.archs=[small_cnn,cnn_wide]", "construct.n_images=60"], experiments_store, tiny_tar)


def test_each_architecture_has_its_own_independent_model_and_students(transfer_run, tiny_tar):
    cfg, st, plan = transfer_run
    spectrum = get("spectrum").plan(cfg, source_sha256(tiny_tar))
    small, wide = (plan.one(role="independent", arch=a).spec for a in ("small_cnn", "cnn_wide"))
    assert small.key == spectrum.one(role="independent").key  # the source's arch: spectrum's independent model
    assert wide.config["model"]["arch"] == "cnn_wide" and small.config["seeds"] != wide.config["seeds"]
    students = plan.find(role="student")
    assert [(n.tags["arch"], n.spec.config["model"]["arch"]) for n in students] == [("small_cnn", "small_cnn"),
                                                                                  ("cnn_wide", "cnn_wide")]
    assert all(n.spec.inputs == (plan.constructs["det"].key,) for n in students)
    # the students' own architecture: the plain det student (replicate's key); another: its own seeds
    plain = get("replicate").plan(cfg, source_sha256(tiny_tar)).find(role="student", set="det")
    assert students[0].key == plain[0].key and students[1].spec.config["seeds"] != plain[0].spec.config["seeds"]
    assert plan.constructs["det"].key == get("replicate").plan(cfg, source_sha256(tiny_tar)).constructs["det"].key
    with pytest.raises(ConfigError, match="transfer.archs"):
        resolve("tiny", ["transfer.archs=[vgg99]"])


def test_the_table_is_each_architectures_transfer_and_students(transfer_run):
    cfg, st, plan = transfer_run
    df = build_table(st, plan)
    rows = A.read_rows(st.path("constructed", plan.constructs["det"].key))
    for r in df.to_dict("records"):
        ind = load_model(st, plan.one(role="independent", arch=r["arch"]).key)
        with torch.no_grad():
            pred = ind(torch.from_numpy(rows["x"]).float()).argmax(1).numpy()
        assert r["transfer_%"] == pytest.approx(round(100 * (pred == rows["y_target"]).mean(), 2))
    # the correlation line: a known answer on a made-up table
    made = pd.DataFrame({"arch": list("abc"), "set": "det", "seed": 0, "transfer_%": [10.0, 20.0, 30.0],
                         "acc_xy_%": [15.0, 25.0, 35.0], "acc_xy+1_%": 0.0, "model_key": ""})
    assert "correlation of det's transfer success with its students' (X, Y) accuracy is 1.00" in to_markdown(made)
