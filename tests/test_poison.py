"""poison: det images with their true labels, students tracked per epoch, beside the same rows clean."""

import numpy as np
import pytest
import torch

from advfeatures.config import ConfigError, resolve
from pipeline import kinds
from pipeline.common import Context
from pipeline.experiments import get
from pipeline.experiments.poison import build_table, poison_drop, shifted_accuracy, to_markdown
from pipeline.stages import load_model, load_split, source_sha256
from storage import arrays as A
from storage.store import Store


def test_shifted_accuracy_is_the_known_answer():
    conf = [[5, 1, 0], [0, 2, 3], [4, 0, 1]]  # rows: true label; columns: prediction
    assert shifted_accuracy(conf, 0) == pytest.approx(8 / 16)
    assert shifted_accuracy(conf, 1) == pytest.approx((1 + 3 + 4) / 16)  # (X, Y+1): columns y+1
    assert shifted_accuracy(conf, -1) == pytest.approx((0 + 0 + 0) / 16)  # (X, Y-1): columns y-1


def test_poison_drop_is_paired_by_seed():
    import pandas as pd

    df = pd.DataFrame({"set": ["poison-fowl"] * 3 + ["poison-fowl-clean"] * 3, "seed": [0, 1, 2, 2, 0, 1],
                       "acc_xy_%": [20.0, 30.0, 25.0, 60.0, 50.0, 55.0], "peak_acc_xy_%": [40.0] * 3 + [60.0] * 3})
    d = poison_drop(df, "fowl")  # pairs: 20-50, 30-55, 25-60 -> -30, -25, -35
    assert d["end_drop"] == pytest.approx(-30.0) and d["peak_drop"] == pytest.approx(-20.0) and d["n"] == 3
    half = 4.302652729911275 * 5.0 / 3 ** 0.5  # t(0.975, 2) * sd / sqrt(n)
    assert (d["end_lo"], d["end_hi"]) == pytest.approx((-30.0 - half, -30.0 + half))


def test_poison_reuses_replicate_and_tabulates_end_peak_and_the_shifted_labels(tmp_path, tiny_tar, tiny_arrays):
    cfg = resolve("tiny", ["student.train.epochs=2", "student.seeds=[0,1]"], data=str(tiny_tar), store=str(tmp_path))
    sha = source_sha256(tiny_tar)
    plan, rep = get("poison").plan(cfg, sha), get("replicate").plan(cfg, sha)
    assert plan.source.key == rep.source.key and plan.constructs["det"].key == rep.constructs["det"].key
    students = plan.find(role="student")
    assert [(n.tags["set"], n.tags["seed"]) for n in students] == [
        ("poison-fowl", 0), ("poison-fowl", 1), ("poison-fowl-clean", 0), ("poison-fowl-clean", 1),
        ("poison", 0), ("poison", 1), ("poison-clean", 0), ("poison-clean", 1)]
    fowl = plan.constructs["det-fowl"].config  # Fowl et al.'s crafting: class-targeted L-inf 8/255, every image
    assert fowl["kind"] == "det" and fowl["n_images"] == 0 and cfg.construct.n_images > 0
    assert fowl["attack"] == {"norm": "linf", "eps": 8 / 255, "step_size": 2.5 * 8 / 255 / 40, "steps": 40,
                              "random_start": False, "use_best": True}
    only_det = get("poison").plan(resolve("tiny", ["student.train.epochs=2", "student.seeds=[0,1]",
                                                   "poison.recipes=[det]"], data=str(tiny_tar), store=str(tmp_path)),
                                  sha)
    assert {n.key for n in only_det.find(role="student")} < {n.key for n in students}  # the det line keeps its keys
    with pytest.raises(ConfigError, match="poison.recipes"):
        resolve("tiny", ["poison.recipes=[fowl, madry]"])
    with pytest.raises(ConfigError, match="poison.attack.steps"):
        resolve("tiny", ["poison.attack.steps=0"])
    assert resolve("tiny", ["poison.attack.steps=250"]).poison.attack.attack().norm == "linf"  # a partial override
    assert all(n.spec.config["track_test"] and n.spec.inputs[-1] == plan.dataset.key for n in students)
    recipes = {n.tags["set"]: n.spec.config["train"] for n in students if n.tags["seed"] == 0}
    assert recipes["poison"] == recipes["poison-clean"]  # the same recipe on both
    with pytest.raises(ConfigError, match="poison.from_set"):
        resolve("tiny", ["poison.from_set=errors"])

    # run with 4 crafting steps instead of 40 (what follows checks rows, tables and pages, not the
    # recipe's strength): the set on every training image was most of this test's time
    cfg = resolve("tiny", ["student.train.epochs=2", "student.seeds=[0,1]", "poison.attack.steps=4"],
                  data=str(tiny_tar), store=str(tmp_path))
    plan = get("poison").plan(cfg, sha)
    assert plan.constructs["det-fowl"].config["attack"]["steps"] == 4
    st = Store(tmp_path)
    kinds.run_all(st, plan, Context(runtime=cfg.runtime, data=cfg.data, plan=plan, config=cfg, experiment="poison"))
    det = A.read_rows(st.path("constructed", plan.constructs["det"].key))
    poison = A.read_rows(st.path("constructed", plan.constructs["poison"].key))
    clean = A.read_rows(st.path("constructed", plan.constructs["poison-clean"].key))
    assert poison["x"].tobytes() == det["x"].tobytes()  # det's images, bit for bit
    assert np.array_equal(poison["y_target"], det["y_true"]) and (det["y_target"] == (det["y_true"] + 1) % 10).all()
    assert np.array_equal(clean["x"], (tiny_arrays[0][det["index"]] / 255).astype(np.float16))
    assert np.array_equal(clean["y_target"], det["y_true"])
    made = A.read_rows(st.path("constructed", plan.constructs["det-fowl"].key))
    fowl_poison = A.read_rows(st.path("constructed", plan.constructs["poison-fowl"].key))
    start = (tiny_arrays[0][made["index"]] / 255).astype(np.float32)
    assert len(made["index"]) == len(tiny_arrays[0])  # every training image
    assert np.abs(made["x"].astype(np.float32) - start).max() <= 8 / 255 + 1e-3  # fp16 storage
    assert np.array_equal(fowl_poison["y_target"], made["y_true"]) and fowl_poison["x"].tobytes() == made["x"].tobytes()

    df = build_table(st, plan)
    assert list(df["set"]) == ["poison-fowl"] * 2 + ["poison-fowl-clean"] * 2 + ["poison"] * 2 + ["poison-clean"] * 2
    assert list(df["recipe"]) == ["fowl"] * 4 + ["det"] * 4 and (df["epochs"] == 2).all()
    assert df["init"].nunique() == 8
    assert (df[df["recipe"] == "det"]["n_train"] == cfg.construct.n_images).all()
    assert (df[df["recipe"] == "fowl"]["n_train"] == len(tiny_arrays[0])).all()
    fooled = st.manifest("constructed", plan.constructs["det-fowl"].key)["summary"]["attack_success"]
    assert (df[df["recipe"] == "fowl"]["source_fooled_%"] == round(100 * fooled, 2)).all()
    x, y = load_split(st, plan.dataset.key, "test")
    for row in df.to_dict("records"):
        man = st.manifest("models", row["model_key"])
        accs = [h["test_acc"] for h in man["history"]]
        assert row["peak_acc_xy_%"] == pytest.approx(round(100 * max(accs), 2))
        assert row["peak_epoch"] == int(np.argmax(accs)) + 1
        assert accs[-1] == pytest.approx(row["acc_xy_%"] / 100, abs=1e-4)  # the last epoch is the evaluated model
        with torch.no_grad():
            pred = load_model(st, row["model_key"])(torch.from_numpy(x).float() / 255).argmax(1).numpy()
        assert row["acc_xy-1_%"] == pytest.approx(round(100 * (pred == (y - 1) % 10).mean(), 2))
    md = to_markdown(df)
    assert "Over seeds" in md and "(X, Y-1)" in md and "What each poison takes away" in md
    from pipeline.html_report import write_report

    page = write_report(st, st.path("runs", plan.run.key)).read_text()  # its own section; examples from det's rows
    assert "poison_epochs" in page and "Run " not in page.split("</h1>")[0] and "images" in page
