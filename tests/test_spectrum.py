"""spectrum: sources adversarially trained at increasing eps, their sets, transfer and students, on
tiny data."""

import pandas as pd
import pytest

from conftest import run_experiment
from advfeatures.config import ConfigError, resolve
from pipeline.experiments import get
from pipeline.experiments.spectrum import build_table, to_markdown
from pipeline.stages import source_sha256

OVERRIDES = ["spectrum.eps=[0,0.5]", "spectrum.sets=[det]", "spectrum.steps=2", "spectrum.robust_eps=[0.25]",
             "evaluate.robust_steps=3", "construct.n_images=60"]


@pytest.fixture(scope="module")
def spectrum_run(experiments_store, tiny_tar):
    return run_experiment("spectrum", OVERRIDES, experiments_store, tiny_tar)


def test_sources_differ_only_in_their_adversarial_training(spectrum_run, tiny_tar):
    cfg, st, plan = spectrum_run
    rep = get("replicate").plan(cfg, source_sha256(tiny_tar))
    (robust,) = [n.spec for n in plan.find(role="spectrum-source")]
    assert plan.source.key == rep.source.key  # eps 0 is the standard source
    assert robust.config["train"]["adversarial"]["eps"] == 0.5 and robust.config["train"]["adversarial"]["steps"] == 2
    same = {k: v for k, v in robust.config["train"].items() if k != "adversarial"}
    assert same == plan.source.config["train"] and robust.config["seeds"] == plan.source.config["seeds"]
    own = get("spectrum").plan(resolve("tiny", OVERRIDES + ["spectrum.shared_init=false"], data=str(tiny_tar)),
                               source_sha256(tiny_tar))
    assert own.one(role="spectrum-source").spec.config["seeds"] != plan.source.config["seeds"]
    w0, w1 = (st.manifest("models", k)["weights_sha256"] for k in (plan.source.key, robust.key))
    assert w0 != w1
    with pytest.raises(ConfigError, match="spectrum.eps"):
        resolve("tiny", ["spectrum.eps=[0.5]"])


def test_the_table_reads_each_sources_stages(spectrum_run):
    cfg, st, plan = spectrum_run
    df = build_table(st, plan)
    assert list(df["source_eps"]) == [0.0, 0.5] and "source_robust_0.25_%" in df.columns
    for r in df.to_dict("records"):
        s = plan.get(role="set", kind="det", train_eps=r["source_eps"])
        src_eval = plan.evals_of(s.inputs[1])[0]
        assert r["source_acc_%"] == pytest.approx(round(100 * st.manifest("evals", src_eval.key)["metrics"]["acc_xy"], 2))
        tr = st.manifest("evals", plan.one(role="transfer", kind="det", train_eps=r["source_eps"]).key)["metrics"]
        assert r["transfer_%"] == pytest.approx(round(100 * tr["transfer_success"], 2))
    assert "Per source and set" in to_markdown(df)


def test_the_markdown_prints_each_radius_as_given():
    """A radius is a label: 0.25 stays 0.25 (the tables' .1f once printed it as 0.2)."""
    df = pd.DataFrame({"source_eps": [0.0, 0.25], "set": "det", "seed": 0, "source_acc_%": 70.0,
                       "fooled_t≠y_%": 90.0, "transfer_%": 80.0, "acc_xy_%": [30.0, 40.0], "acc_xy+1_%": 15.0,
                       "model_key": ""})
    text = to_markdown(df)
    assert "eps 0.25" in text and "eps 0.2 " not in text
