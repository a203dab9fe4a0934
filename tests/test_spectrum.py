"""spectrum: sources adversarially trained at increasing eps, their sets, transfer and students, on
tiny data."""

import pandas as pd
import pytest

from conftest import run_experiment
from advfeatures.config import ConfigError, resolve
from pipeline.experiments import get
from pipeline.experiments.spectrum import build_table, fooling_matched, probe_rise, slopes_over_sources, to_markdown
from pipeline.stages import source_sha256

OVERRIDES = ["spectrum.eps=[0,0.5]", "spectrum.sets=[det]", "spectrum.steps=2", "spectrum.robust_eps=[0.25]",
             "evaluate.robust_steps=3", "construct.n_images=60"]


SEEDS = ["source.seeds=[0,1]", "spectrum.sets=[det,leak-det]"]


@pytest.fixture(scope="module")
def spectrum_run(experiments_store, tiny_tar):
    return run_experiment("spectrum", OVERRIDES, experiments_store, tiny_tar)


@pytest.fixture(scope="module")
def seeds_run(experiments_store, tiny_tar):
    """Two source seeds, det and its leak control, and the robust probe."""
    from advfeatures.config import resolve
    from pipeline import kinds
    from pipeline.common import Context
    from storage.store import Store

    cfg = resolve("tiny", OVERRIDES + SEEDS, data=str(tiny_tar), store=str(experiments_store))
    plan = get("spectrum").plan_of(cfg, source_sha256(tiny_tar))
    st = Store(experiments_store)
    kinds.run_all(st, plan, Context(runtime=cfg.runtime, data=cfg.data, plan=plan, config=cfg, experiment="spectrum"))
    return cfg, st, plan


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


def test_over_source_seeds_one_probe_serves_every_source(seeds_run):
    cfg, st, plan = seeds_run
    assert sorted(plan.replicates) == [0, 1]
    probes = {n.key for n in plan.find(role="probe")}
    assert len(probes) == 1  # one robust probe, of its own seed, whatever the source seed
    probe = plan.one(role="probe").spec
    assert probe.config["train"]["adversarial"]["eps"] == 0.5 and probe.config["role"] == "probe"
    sources = {sub.source.config["seeds"]["init"] for sub in plan.replicates.values()}
    assert len(sources) == 2 and probe.config["seeds"]["init"] not in sources
    df = build_table(st, plan)
    assert sorted(set(df["source_seed"])) == [0, 1] and set(df["set"]) == {"det", "leak-det"}
    assert len(df) == 2 * 2 * 2  # source seeds x eps x sets (one student each)
    for sub_seed, sub in plan.replicates.items():
        for r in df[df["source_seed"] == sub_seed].to_dict("records"):
            pt = sub.one(role="probe-transfer", kind=r["set"], train_eps=r["source_eps"])
            assert r["probe_transfer_%"] == pytest.approx(round(100 * st.manifest("evals", pt.key)["metrics"]
                                                                ["transfer_success"], 2))
    text = to_markdown(df)
    assert "Fooling-matched" in text and "probe_rise_pts" in text and "n_sources" in text


def test_slopes_are_per_source_seed_and_the_fooling_rule_takes_each_sources_lowest():
    df = pd.DataFrame({"source_seed": [0, 0, 1, 1], "source_eps": [0.0, 0.5, 0.0, 0.5], "set": "det",
                       "acc_xy_%": [20.0, 25.0, 30.0, 40.0], "fooled_t≠y_%": [99.0, 95.0, 98.0, 85.0],
                       "probe_transfer_%": [10.0, 30.0, 12.0, 40.0]})
    assert list(slopes_over_sources(df, "det")) == pytest.approx([10.0, 20.0])  # 5 / 0.5 and 10 / 0.5
    matched, low = fooling_matched(df)
    assert not matched and low == {0.0: 98.0, 0.5: 85.0}
    assert fooling_matched(df.assign(**{"fooled_t≠y_%": 95.0}))[0]
    assert probe_rise(df, "det") == pytest.approx(35.0 - 11.0)
    assert probe_rise(df.drop(columns="probe_transfer_%"), "det") is None


def test_the_figure_averages_students_within_a_source_seed_then_spreads_over_seeds(tmp_path):
    """Known answer: source seed 0's two students at eps 0 (10 and 20) count as one point, 15, beside
    seed 1's 25: mean 20, std 7.07 over the two source seeds. The figure's two panels are drawn."""
    import types

    from pipeline.experiments.spectrum import _over_source_seeds, report

    df = pd.DataFrame({"source_seed": [0, 0, 1, 0, 1], "source_eps": [0.0, 0.0, 0.0, 0.5, 0.5], "set": "det",
                       "seed": [0, 1, 0, 0, 0], "acc_xy_%": [10.0, 20.0, 25.0, 30.0, 30.0],
                       "acc_xy+1_%": 5.0, "transfer_%": [80.0, 80.0, 70.0, 50.0, 60.0],
                       "probe_transfer_%": [5.0, 5.0, 7.0, 30.0, 40.0]})
    mean, sd = _over_source_seeds(df, "acc_xy_%")
    assert list(mean) == pytest.approx([20.0, 30.0]) and list(sd) == pytest.approx([50 ** 0.5, 0.0])
    mean, sd = _over_source_seeds(df.drop(columns="source_seed").iloc[:2], "acc_xy_%")  # one source seed
    assert list(mean) == [15.0] and list(sd) == [0.0]
    drawn = []
    doc = types.SimpleNamespace(figure=lambda path, caption: drawn.append((path, caption)))
    report(doc, None, types.SimpleNamespace(table=df, config_text=""), tmp_path)
    (path, caption), = drawn
    assert path.name == "spectrum.png" and path.is_file() and "robust probe" in caption
