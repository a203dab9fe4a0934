"""robust-datasets (section 3.1): the inversion set kind (sharded like PGD sets) and the
experiment's plan, keys and table, on tiny data."""

import numpy as np
import pytest
import torch

from conftest import run_experiment
from advfeatures import construct as C
from advfeatures.config import ConfigError, resolve
from pipeline.experiments import get
from pipeline.experiments.robust_datasets import build_table, to_markdown
from pipeline.sets import inversion
from pipeline.stages import load_model, source_sha256
from pipeline.stages.construct import generate
from storage import arrays as A
from storage.store import Store

OVERRIDES = ["robust_datasets.steps=6", "robust_datasets.n_images=60", "robust_datasets.adversarial.steps=2",
             "robust_datasets.robust_eps=[0.25]", "evaluate.robust_steps=3"]


def test_starts_are_other_images_drawn_independently_of_labels():
    goals = np.arange(5000)
    starts = C.inversion_starts(goals, 5000, seed=3)
    assert (starts != goals).all() and starts.min() >= 0 and starts.max() < 5000
    assert np.array_equal(starts, C.inversion_starts(goals, 5000, seed=3))  # from the seed alone
    assert not np.array_equal(starts, C.inversion_starts(goals, 5000, seed=4))
    y = np.arange(5000) % 10  # a start's label is the goal's about 1/C of the time, as for independent draws
    assert abs((y[starts] == y[goals]).mean() - 0.1) < 0.02
    with pytest.raises(ValueError, match="at least 2"):
        C.inversion_starts(np.zeros(1, np.int64), 1, 0)


def sets_of(plan):
    return plan.constructs


@pytest.fixture(scope="module")
def rd_run(experiments_store, tiny_tar):
    return run_experiment("robust-datasets", OVERRIDES + ["robust_datasets.li_radius=0.3", "robust_datasets.epochs=[1,2]",
                                                          "evaluate.check_restarts=1", "evaluate.check_n=50"],
                          experiments_store, tiny_tar)


def test_the_plan_reuses_replicates_source_and_trains_a_robust_one_from_its_own_weights(rd_run, tiny_tar):
    cfg, st, plan = rd_run
    rep = get("replicate").plan(cfg, source_sha256(tiny_tar))
    assert plan.source.key == rep.source.key
    robust = plan.one(role="robust-source").spec
    assert robust.config["train"]["adversarial"] == {"norm": "l2", "eps": 0.5, "steps": 2, "step_size": None}
    short = plan.one(role="robust-source-budget").spec  # the plateau check: the same recipe, fewer epochs
    assert robust.config["train"]["epochs"] == 2 and short.config["train"]["epochs"] == 1
    assert short.config["seeds"] == robust.config["seeds"] and short.key != robust.key
    assert get("robust-datasets").plan(resolve("tiny", OVERRIDES), "x").one(role="robust-source").key == \
        get("robust-datasets").plan(resolve("tiny", OVERRIDES + ["robust_datasets.epochs=[2]"]), "x").one(
            role="robust-source").key == get("robust-datasets").plan(resolve("tiny", OVERRIDES), "x").one(
            role="robust-source").key  # one budget equal to the source's: the key it always had
    with pytest.raises(ConfigError, match="robust_datasets.epochs"):
        resolve("tiny", ["robust_datasets.epochs=[4,2]"])
    # a larger budget after the one that makes D_R (maker_epochs): D_R and its source keep their keys
    check = get("robust-datasets").plan(resolve("tiny", OVERRIDES + ["robust_datasets.epochs=[1,2,3]",
                                                                     "robust_datasets.maker_epochs=2"]), "x")
    two = get("robust-datasets").plan(resolve("tiny", OVERRIDES + ["robust_datasets.epochs=[1,2]"]), "x")
    assert check.one(role="robust-source").key == two.one(role="robust-source").key
    assert check.constructs["D_R"].key == two.constructs["D_R"].key
    assert sorted(n.tags["epochs"] for n in check.find(role="robust-source-budget")) == [1, 3]
    with pytest.raises(ConfigError, match="maker_epochs=5 is not one of"):
        resolve("tiny", ["robust_datasets.epochs=[1,2]", "robust_datasets.maker_epochs=5"])
    # D: the goal images of D_R, clean, with their labels; its students train like the others
    assert plan.constructs["D"].config == {"kind": "inversion-goals"}
    assert plan.constructs["D"].inputs == (sets_of(plan)["D_R"].key, plan.dataset.key)
    assert "adversarial" not in plan.source.config["train"]
    assert robust.config["seeds"]["init"] != plan.source.config["seeds"]["init"]
    sets = sets_of(plan)
    assert sets["D_R"].inputs == (plan.dataset.key, robust.key) and sets["D_NR"].inputs == (plan.dataset.key,
                                                                                              plan.source.key)
    assert "radius" not in sets["D_NR"].config and sets["D_NR-li"].config["radius"] == 0.3
    assert sets["D_NR-li"].config["step_size"] == 0.01
    with pytest.raises(ConfigError, match="li_radius"):
        resolve("tiny", ["robust_datasets.li_radius=-1"])


def test_inversion_sets_hold_the_inverted_rows_with_the_goals_labels(rd_run, tiny_arrays):
    cfg, st, plan = rd_run
    x_train, y_train = tiny_arrays[0], tiny_arrays[1]
    spec = plan.constructs["D_R"]
    rows = A.read_rows(st.path("constructed", spec.key))
    goal = C.choose_subset(len(y_train), 60, 0)
    assert np.array_equal(rows["goal"], goal) and np.array_equal(rows["y_target"], y_train[goal])
    assert np.array_equal(rows["index"], C.inversion_starts(goal, len(y_train), 0))
    assert np.array_equal(rows["y_true"], y_train[rows["index"]])
    # the rows are what inverting their starts toward their goals through the robust source gives
    model = load_model(st, plan.one(role="robust-source").key)
    want = C.invert_block(model, x_train[goal[:8]], x_train[rows["index"][:8]], y_train[goal[:8]], 6, 0.1,
                          store_dtype="float16", amp_dtype=None)
    assert np.allclose(want["x"].astype(np.float32), rows["x"][:8].astype(np.float32), atol=2e-3)
    assert np.allclose(want["distance"], rows["distance"][:8], rtol=1e-3, atol=1e-3)
    x0 = x_train[rows["index"]].astype(np.float32) / 255
    moved = np.sqrt(((rows["x"].astype(np.float32) - x0) ** 2).reshape(60, -1).sum(1))
    assert np.allclose(moved, rows["norm"], atol=2e-2) and (moved > 0.1).all()  # the images changed
    assert (rows["distance"] < rows["start_distance"]).mean() > 0.9  # and moved toward their goals
    li = A.read_rows(st.path("constructed", plan.constructs["D_NR-li"].key))
    assert li["norm"].max() <= 0.3 + 2e-2  # D_NR-li stays within its radius of the start
    man = st.manifest("constructed", spec.key)
    assert man["summary"]["n"] == 60 and man["layout"]["extra"] == [list(e) for e in inversion.EXTRA]
    assert man["summary"]["median_distance_ratio"] < 1
    trace = man["summary"]["ratio_trace"]  # the mean ratio after every tenth of the steps, over every shard
    assert trace["steps"] == [0, 1, 2, 3, 4, 5, 6] and trace["mean_ratio"][0] == pytest.approx(1.0)
    ratio = rows["distance"] / rows["start_distance"]
    assert trace["mean_ratio"][-1] == pytest.approx(ratio.mean(), rel=2e-2)  # as computed vs on the stored rows
    assert all(a >= b - 1e-6 for a, b in zip(trace["mean_ratio"], trace["mean_ratio"][1:]))  # the best so far
    assert trace["fall_last_fifth"] == pytest.approx(trace["mean_ratio"][5] - trace["mean_ratio"][6], abs=1e-4)


def test_inversion_sets_are_the_same_however_they_are_sharded(rd_run, tmp_path):
    """Shards in any order, in another store, with other shard sizes: the same bytes."""
    cfg, st, plan = rd_run
    spec = plan.constructs["D_NR"]
    other = Store(tmp_path)
    for folder, key in (("datasets", plan.dataset.key), ("models", plan.source.key)):
        import shutil

        shutil.copytree(st.path(folder, key), other.path(folder, key))
    resharded = type(spec)(spec.stage, spec.config, spec.inputs, options={"shard_size": 25, "chunk_size": 25})
    steps = inversion.SHARDS
    pending = steps.prepare(other, resharded)
    assert pending == [0, 1, 2]
    for i in reversed(pending):
        steps.shard(other, resharded, i, cfg.runtime)
    assert generate(other, resharded, cfg.runtime) == spec.key
    a, b = A.read_rows(st.path("constructed", spec.key)), A.read_rows(other.path("constructed", spec.key))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_the_table_is_the_manifests_numbers(rd_run):
    cfg, st, plan = rd_run
    df = build_table(st, plan)
    assert list(df["model"]) == ["source", "robust source 1 ep", "robust source", "D", "D_R", "D_NR", "D_NR-li"]
    assert df["init"].nunique() == 6 and "robust_0.25_%" in df.columns  # the budgets share their weights' init
    assert list(df["epochs"][:3]) == [2, 1, 2]
    assert (df["n_train"][3:] == 60).all()
    x, y = (torch.from_numpy(a) for a in A.read_split(st.path("datasets", plan.dataset.key), "test"))
    for row in df.to_dict("records"):
        with torch.no_grad():
            pred = load_model(st, row["model_key"])(x.float() / 255).argmax(1)
        assert row["acc_%"] == pytest.approx(round(100 * (pred == y).float().mean().item(), 2))
    d_r = df[df["model"] == "D_R"].iloc[0]
    summary = st.manifest("constructed", plan.constructs["D_R"].key)["summary"]
    assert d_r["set_distance_ratio"] == pytest.approx(summary["median_distance_ratio"], abs=1e-4)
    assert d_r["paper_%"] == "84 / 48 / -" and d_r["n_train"] == 60
    md = to_markdown(df)
    assert "Students over seeds" in md and "86.8 / 49.9 / 19.2" in md
    assert "Attack strength check" in md and "Signature" in md
    # every check: its own metrics' accuracy, never above the evaluation's attack on the same images
    for node in plan.find(role="check"):
        m = st.manifest("evals", node.key)["metrics"]
        assert m["n_checked"] == 50 and m["acc_xy"] <= m["acc_base"] + 1e-9
        assert m["strength_drop"] == pytest.approx(m["acc_base"] - m["acc_xy"])
        after = m["acc_after_each_attack"]
        assert len(after) == 3 and after == sorted(after, reverse=True) and m["acc_xy"] == pytest.approx(after[-1])
    row = df[df["model"] == "robust source"].iloc[0]
    check = st.manifest("evals", plan.checks_of(row["model_key"])[0].key)["metrics"]
    assert row["check_0.25_drop"] == pytest.approx(round(100 * check["strength_drop"], 2))
    # D's rows are D_R's goals, clean
    goals = A.read_rows(st.path("constructed", plan.constructs["D"].key))
    d_r = A.read_rows(st.path("constructed", plan.constructs["D_R"].key), names=("goal", "y_target"))
    assert np.array_equal(goals["index"], d_r["goal"]) and np.array_equal(goals["y_target"], d_r["y_target"])
    x_train = A.read_split(st.path("datasets", plan.dataset.key), "train")[0]
    assert np.array_equal(goals["x"], (x_train[d_r["goal"]] / 255).astype(np.float16))
