"""bugs-only (Nakkiran 2019): the set kind (the det set's rows, attacked by bugs_only_pgd), the
transfer stage, the plan's keys and the table, on tiny data."""

import numpy as np
import pytest
import torch

from conftest import run_experiment
from advfeatures.attacks import bugs_only_pgd, threat_model
from advfeatures.config import ConfigError, resolve
from pipeline.experiments import get
from pipeline.experiments.bugs_only import build_table, to_markdown
from pipeline.stages import load_model, source_sha256
from pipeline.stages.transfer import transfer_metrics
from storage import arrays as A

OVERRIDES = ["bugs_only.ensemble=2", "attack.eps=2.5", "attack.step_size=0.5", "attack.steps=3",
             "attack.use_best=false", "construct.n_images=60"]


def test_transfer_metrics_are_the_known_shares():
    pred = np.array([1, 2, 3, 0, 5])
    t = np.array([1, 2, 0, 0, 4])
    y = np.array([0, 1, 3, 0, 5])  # row 3 has t = y: not counted in the transfer success
    m = transfer_metrics(pred, t, y)
    assert m["n_t_ne_y"] == 4 and m["transfer_success"] == pytest.approx(2 / 4)
    assert m["predicts_target"] == pytest.approx(3 / 5) and m["predicts_true"] == pytest.approx(3 / 5)


@pytest.fixture(scope="module")
def bugs_run(experiments_store, tiny_tar):
    return run_experiment("bugs-only", OVERRIDES, experiments_store, tiny_tar)


def test_the_plan_shares_replicates_det_and_keys_the_ensemble(bugs_run, tiny_tar):
    cfg, st, plan = bugs_run
    rep = get("replicate").plan(cfg, source_sha256(tiny_tar))
    assert plan.constructs["det"].key == rep.constructs["det"].key and plan.source.key == rep.source.key
    members = [n.spec for n in plan.find(role="ensemble")]
    holdout = plan.one(role="holdout").spec
    inits = {s.config["seeds"]["init"] for s in [plan.source, holdout, *members]}
    assert len(members) == 2 and len(inits) == 4  # every model from its own initial weights
    bugs = plan.constructs["bugs-only"]
    assert bugs.inputs == (plan.dataset.key, plan.source.key, *(m.key for m in members))
    assert bugs.config["targets"] == "det" and "amp" not in bugs.config  # the attack runs in fp32
    assert {k: v for k, v in bugs.config.items() if k not in ("kind", "targets")} == \
        {k: v for k, v in plan.constructs["det"].config.items() if k not in ("kind", "amp")}
    assert [n.spec.inputs for n in plan.find(role="transfer")] == [(plan.constructs["det"].key, holdout.key),
                                                                  (bugs.key, holdout.key)]
    with pytest.raises(ConfigError, match="bugs_only.ensemble"):
        resolve("tiny", ["bugs_only.ensemble=0"])


def test_the_set_is_the_bugs_only_attack_on_the_det_rows(bugs_run, tiny_arrays):
    cfg, st, plan = bugs_run
    bugs = A.read_rows(st.path("constructed", plan.constructs["bugs-only"].key))
    det = A.read_rows(st.path("constructed", plan.constructs["det"].key))
    assert np.array_equal(bugs["index"], det["index"]) and np.array_equal(bugs["y_target"], det["y_target"])
    assert (bugs["y_target"] == (bugs["y_true"] + 1) % 10).all()
    models = [load_model(st, key) for key in plan.constructs["bugs-only"].inputs[1:]]
    x = torch.from_numpy(tiny_arrays[0][bugs["index"][:16]]).float() / 255
    r = bugs_only_pgd(models[0], models[1:], x, torch.from_numpy(bugs["y_target"][:16]),
                      torch.from_numpy(bugs["y_true"][:16]), threat_model("l2", 2.5), 3, 0.5)
    assert np.allclose(r.x.half().numpy().astype(np.float32), bugs["x"][:16].astype(np.float32), atol=2e-3)
    assert not np.array_equal(bugs["x"], det["x"])


def test_transfer_and_the_table_are_the_models_predictions(bugs_run):
    cfg, st, plan = bugs_run
    holdout = load_model(st, plan.one(role="holdout").key)
    df = build_table(st, plan)
    assert list(df["set"]) == ["det", "bugs-only"] and df["init"].nunique() == 2
    for name in ("det", "bugs-only"):
        rows = A.read_rows(st.path("constructed", plan.constructs[name].key))
        with torch.no_grad():
            pred = holdout(torch.from_numpy(rows["x"]).float()).argmax(1).numpy()
        want = (pred == rows["y_target"]).mean()  # det targets: t != y on every row
        row = df[df["set"] == name].iloc[0]
        assert row["transfer_%"] == pytest.approx(round(100 * want, 2))
        assert row["attack_%"] == pytest.approx(round(100 * rows["fooled"].mean(), 2))
    assert "Nakkiran" in to_markdown(df)
