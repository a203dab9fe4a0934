"""The stage executors on a tiny dataset, without Prefect: artifacts, invariants, idempotence."""

import numpy as np
import pytest
import torch
from conftest import build

from advfeatures.config import resolve
from pipeline import stages
from pipeline.plan import make_plan
from storage import arrays as A
from storage.store import Store


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_tar):
    cfg, st, plan = build(tiny_tar, tmp_path_factory.mktemp("store"))
    stages.train_model(st, plan.teacher, cfg.runtime)
    for kind, spec in plan.constructs.items():
        if kind == "errors":
            stages.build_errors(st, spec, cfg.runtime)
        else:
            stages.generate(st, spec, cfg.runtime)
    return cfg, st, plan


def test_dataset_group(built, tiny_arrays):
    cfg, st, plan = built
    x, y = stages.load_split(st, plan.dataset.key, "train")
    assert np.array_equal(x, tiny_arrays[0]) and np.array_equal(y, tiny_arrays[1])
    man = st.manifest("datasets", plan.dataset.key)
    assert man["n_train"] == 200 and man["n_test"] == 100
    assert man["source_sha256"] == plan.dataset.config["source_sha256"]
    assert man["code_version"]["package"] and man["stage"]["key"] == plan.dataset.key


@pytest.mark.parametrize("kind", ["rand", "other", "det"])
def test_pgd_sets_obey_their_definition(built, tiny_arrays, kind):
    cfg, st, plan = built
    spec = plan.constructs[kind]
    path = st.path("constructed", spec.key)
    r = A.read_rows(path)
    n = cfg.construct.n_images
    assert r["x"].shape == (n, 3, 32, 32) and r["x"].dtype == np.float16
    assert len(np.unique(r["index"])) == n and np.array_equal(r["y_true"], tiny_arrays[1][r["index"]])
    if kind == "det":
        assert np.array_equal(r["y_target"], (r["y_true"] + 1) % 10)
    if kind == "other":
        assert (r["y_target"] != r["y_true"]).all()
    if kind == "rand":
        assert (r["y_target"] == r["y_true"]).any() and len(np.unique(r["y_target"])) > 5
    x0 = tiny_arrays[0][r["index"]].astype(np.float32) / 255
    d = r["x"].astype(np.float32) - x0
    norms = np.sqrt((d.reshape(n, -1) ** 2).sum(1))
    assert (norms <= cfg.attack.eps + 0.01).all()  # float16 storage rounding: < 0.01
    assert r["x"].min() >= 0 and r["x"].max() <= 1
    # the records describe the images as stored (float16), recomputed here in fp32
    source = stages.load_model(st, plan.source.key)
    with torch.no_grad():
        logits = source(torch.from_numpy(r["x"].astype(np.float32)))
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(r["y_target"]), reduction="none").numpy()
    assert np.array_equal(r["fooled"], logits.argmax(1).numpy() == r["y_target"])
    lt = logits.gather(1, torch.from_numpy(r["y_target"])[:, None])[:, 0]
    others = logits.scatter(1, torch.from_numpy(r["y_target"])[:, None], -1e9).amax(1)
    assert np.allclose(r["margin"], (lt - others).numpy(), atol=1e-5)
    assert np.array_equal(r["margin"] > 0, r["fooled"])
    assert np.allclose(r["loss"], loss, rtol=1e-5, atol=1e-6)
    assert np.allclose(r["norm"], norms, rtol=1e-6, atol=1e-6)
    man = st.manifest("constructed", spec.key)
    assert len(man["shards"]) == 3 and man["summary"]["n"] == n
    assert man["summary"]["attack_success"] == pytest.approx(r["fooled"].mean())
    differ = r["y_target"] != r["y_true"]
    assert man["summary"]["attack_success_t_ne_y"] == pytest.approx(r["fooled"][differ].mean())
    assert man["summary"]["n_t_ne_y"] == differ.sum() and man["summary"]["share_target_is_true"] == 1 - differ.mean()


def test_manifests_and_markers_record_runtime_and_versions(built):
    cfg, st, plan = built
    spec = plan.constructs["det"]
    records = [st.manifest("models", plan.source.key), st.manifest("constructed", plan.constructs["errors"].key),
               *A.read_markers(st.path("constructed", spec.key), stages.pgd_set(st, spec).layout)]
    for rec in records:
        assert rec["runtime"]["amp"] == cfg.runtime.amp and rec["runtime"]["device"] == cfg.runtime.device
        assert rec["environment"]["torch"] == torch.__version__ and "cuda" in rec["environment"]
    man = st.manifest("models", plan.source.key)
    assert man["seeds"] == {"train": 0, **plan.source.config["seeds"]} and len(man["init_sha256"]) == 64


def test_errors_set_is_the_teachers_mistakes_on_unmodified_images(built, tiny_arrays):
    cfg, st, plan = built
    r = A.read_rows(st.path("constructed", plan.constructs["errors"].key))
    assert r["x"].dtype == np.uint8
    assert np.array_equal(r["x"], tiny_arrays[0][r["index"]])
    assert (r["y_target"] != r["y_true"]).all()
    teacher = stages.load_model(st, plan.teacher.key)
    import torch

    pred = teacher(torch.from_numpy(r["x"]).float() / 255).argmax(1).numpy()
    assert np.array_equal(pred, r["y_target"])


def test_finished_stages_are_not_recomputed(built, monkeypatch):
    cfg, st, plan = built
    import advfeatures.construct as C
    from pipeline.sets import errors as SE
    from pipeline.stages import model as SM

    def boom(*a, **k):
        raise AssertionError("recomputed a finished stage")

    monkeypatch.setattr(SM, "fit", boom)
    monkeypatch.setattr(C, "pgd", boom)
    monkeypatch.setattr(SE, "predict", boom)
    stages.train_model(st, plan.source, cfg.runtime)
    for kind, spec in plan.constructs.items():
        if kind != "errors":
            assert stages.prepare_construct(st, spec) is None  # complete: nothing to prepare
    spec = plan.constructs["rand"]
    assert stages.run_shard(st, spec, 0, cfg.runtime)["skipped"]
    stages.build_errors(st, plan.constructs["errors"], cfg.runtime)


def test_same_config_generates_bit_identical_shards(built, tmp_path):
    """A shard computed again (another worker, another order) gives the same bytes."""
    cfg, st, plan = built
    spec = plan.constructs["rand"]
    other = Store(tmp_path)
    _copy_inputs(st, plan, other)
    for i in reversed(stages.prepare_construct(other, spec)):
        stages.run_shard(other, spec, i, cfg.runtime)
    a = A.read_rows(st.path("constructed", spec.key))
    b = A.read_rows(other.path("constructed", spec.key))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # a worker killed while writing its marker left atomic_write_json's temporary file (its shard
    # was rerun): the finished set keeps only its markers
    shards = A.open_root(other.path("constructed", spec.key)) / A.SHARDS_DIR
    (shards / ".00000.json.0123abcd.tmp").write_text('{"shard": 0, "sta')
    stages.finalize_construct(other, spec)
    assert sorted(p.name for p in shards.iterdir()) == [f"{i:05d}.json" for i in range(len(list(shards.iterdir())))]


def _copy_inputs(st, plan, other):
    import shutil

    for folder, key in (("datasets", plan.dataset.key), ("models", plan.source.key)):
        shutil.copytree(st.path(folder, key), other.path(folder, key))


def test_shard_size_changes_neither_key_nor_bytes(tmp_path, tiny_tar):
    """The same set built with two shard/chunk sizes (random start on, so per-row randomness is
    exercised) has one key and identical rows; a set begun with one shard size and finished by a
    run with another keeps the layout it was created with, and the same bytes."""
    common = ["construct.sets=[rand]", "attack.random_start=true", "runtime.attack_batch_size=25"]
    cfg, st, plan = build(tiny_tar, tmp_path / "a", common + ["construct.shard_size=50", "construct.chunk_size=25"])
    spec = plan.constructs["rand"]
    stages.generate(st, spec, cfg.runtime)
    rows = {}
    for sizes in (("100", "50"), ("40", "20")):
        other = Store(tmp_path / f"s{sizes[0]}")
        _copy_inputs(st, plan, other)
        cfg2 = resolve("tiny", common + [f"construct.shard_size={sizes[0]}", f"construct.chunk_size={sizes[1]}"],
                       data=str(tiny_tar), store=str(other.root))
        spec2 = make_plan(cfg2, plan.dataset.config["source_sha256"]).constructs["rand"]
        assert spec2.key == spec.key and spec2.options != spec.options
        stages.generate(other, spec2, cfg2.runtime)
        rows[sizes[0]] = A.read_rows(other.path("constructed", spec.key))
        assert stages.pgd_set(other, spec2).layout.shard_size == int(sizes[0])
    a = A.read_rows(st.path("constructed", spec.key))
    assert all(np.array_equal(a[k], rows[s][k]) for s in rows for k in a)
    # begun with shard size 50 (one shard done), finished by a run asking for 100
    resumed = Store(tmp_path / "resumed")
    _copy_inputs(st, plan, resumed)
    stages.prepare_construct(resumed, spec)
    stages.run_shard(resumed, spec, 1, cfg.runtime)
    cfg3 = resolve("tiny", common + ["construct.shard_size=100", "construct.chunk_size=50"],
                   data=str(tiny_tar), store=str(resumed.root))
    spec3 = make_plan(cfg3, plan.dataset.config["source_sha256"]).constructs["rand"]
    stages.generate(resumed, spec3, cfg3.runtime)
    assert resumed.manifest("constructed", spec.key)["layout"]["shard_size"] == 50
    b = A.read_rows(resumed.path("constructed", spec.key))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_compiled_model_gives_the_same_results(tmp_path, tiny_tar, monkeypatch):
    """runtime.compile=true (torch.compile of the model) changes speed, not results: the model is
    traced by Dynamo and its forward and backward graphs made by AOTAutograd for training, PGD and
    inference (train and eval modes, BatchNorm's running statistics, weights shared with the
    uncompiled model). The code generator is AOTAutograd's eager one here: inductor's C++ kernels
    cost 28 s of this test with a cold cache (measured, 2 cores; CI's clone is cold), the same
    graphs without them ~3 s. Inductor's arithmetic is PyTorch's to test; the wiring is ours."""
    import functools

    from torch import nn

    from advfeatures import models

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    # small_cnn's first block alone (conv, BatchNorm, ReLU, pooling, a linear head): the same code
    # paths as small_cnn's three blocks, fewer operators to trace
    monkeypatch.setitem(models.MODELS, "one_block", lambda n=10: nn.Sequential(
        *models._conv_bn(3, 16), nn.MaxPool2d(2), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(16, n)))
    compiled = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **k: compiled.append(m) or real_compile(m, **k))
    out = {}
    for flag in (False, True):
        # batches of one shape (200 = 5 x 40, 50 rows in one attack batch): each graph compiled once
        # (a last batch of another shape is a second compile)
        cfg, st, plan = build(tiny_tar, tmp_path / str(flag), [f"runtime.compile={str(flag).lower()}",
                              "source.model.arch=one_block", "construct.sets=[det]", "construct.n_images=50",
                              "source.train.epochs=1", "source.train.batch_size=40"])
        spec = plan.constructs["det"]
        stages.generate(st, spec, cfg.runtime)
        w = stages.load_model(st, plan.source.key).state_dict()
        out[flag] = (w, A.read_rows(st.path("constructed", spec.key)))
    (w0, r0), (w1, r1) = out[False], out[True]
    assert len(compiled) >= 2  # the source's training and the attack on it went through torch.compile
    # float noise only (measured on AMD EPYC: <= 2.3e-6 in the weights, 2.4e-4 per pixel, 1.1e-5 in
    # norm; small_cnn: 3e-4, 0.004 and 0.005): margins for other CPUs' rounding
    assert all(torch.allclose(w0[k].float(), w1[k].float(), atol=1e-4) for k in w0)
    assert np.allclose(r0["x"].astype(np.float32), r1["x"].astype(np.float32), atol=5e-3)
    assert np.allclose(r0["norm"], r1["norm"], atol=5e-3) and r0["norm"].mean() > 0.1
    assert np.array_equal(r0["y_target"], r1["y_target"])


def test_margin_selection_keeps_the_largest_margin_rows_and_nothing_else(built):
    cfg, st, plan = built
    cfg2 = resolve("tiny", ["construct.select=0.4"], data=cfg.data.source, store=str(st.root))
    plan2 = make_plan(cfg2, plan.dataset.config["source_sha256"])
    assert plan2.constructs == plan.constructs  # the PGD sets are reused, not rebuilt
    spec = plan2.selections["rand"]
    assert set(plan2.selections) == {"rand", "other", "det"}  # not errors
    assert next(s for s in plan2.students if s.kind == "rand").construct == spec
    stages.select_rows(st, spec, cfg2.runtime)
    parent = A.read_rows(st.path("constructed", plan.constructs["rand"].key))
    kept = A.read_rows(st.path("constructed", spec.key))
    n = len(parent["margin"])
    idx = np.flatnonzero(np.isin(parent["index"], kept["index"]))
    assert all(np.array_equal(parent[k][idx], kept[k]) for k in parent)  # whole rows, original order
    same = parent["y_target"] == parent["y_true"]
    for stratum in (same, ~same):  # t = y and t != y: the top 40% of each, by margin
        rows = np.flatnonzero(stratum)
        k = int(np.ceil(0.4 * len(rows)))
        kept_here, dropped = np.intersect1d(idx, rows), np.setdiff1d(rows, idx)
        assert len(kept_here) == k and len(rows) > k
        assert parent["margin"][kept_here].min() >= parent["margin"][dropped].max()
    assert len(idx) < n
    man = st.manifest("constructed", spec.key)
    assert man["stage"]["config"]["fraction"] == 0.4 and man["parent"] == plan.constructs["rand"].key
    assert man["summary"]["attack_success"] == pytest.approx(kept["fooled"].mean())
    assert make_plan(resolve("tiny", ["construct.select=0.5"]), "0" * 64).selections["rand"].key != \
        make_plan(resolve("tiny", ["construct.select=0.4"]), "0" * 64).selections["rand"].key


def test_augmented_copies_are_crops_and_flips_of_their_image_within_eps(built, tiny_arrays):
    """construct.augment_copies=k: k rows per image, consecutive, each the attack of a fixed crop
    (zero padding 4) + flip of the image drawn from (seed, image, copy), within eps of that copy."""
    from advfeatures import construct as C

    cfg, st, plan = built
    k, n = 3, 30
    over = ["construct.sets=[other]", f"construct.n_images={n}", "attack.random_start=true"]
    cfg2 = resolve("tiny", over + [f"construct.augment_copies={k}"], data=cfg.data.source, store=str(st.root))
    plan2 = make_plan(cfg2, plan.dataset.config["source_sha256"])
    plain = make_plan(resolve("tiny", over), plan.dataset.config["source_sha256"]).constructs["other"]
    spec = plan2.constructs["other"]
    assert spec.key != plain.key and spec.config["augment_copies"] == k
    assert "augment_copies" not in plain.config  # off: keyed as before (pinned tiny keys unchanged)
    stages.generate(st, spec, cfg2.runtime)
    r = A.read_rows(st.path("constructed", spec.key))
    assert r["x"].shape == (n * k, 3, 32, 32)
    images = r["index"][::k]
    assert len(np.unique(images)) == n and np.array_equal(r["index"], np.repeat(images, k))
    assert np.array_equal(r["y_target"], np.repeat(r["y_target"][::k], k))  # one target per image
    assert np.array_equal(r["y_true"], tiny_arrays[1][r["index"]]) and (r["y_target"] != r["y_true"]).all()
    params = C.copy_params(cfg2.construct.seed, r["index"], np.tile(np.arange(k), n))
    assert ((params[:, :2] >= 0) & (params[:, :2] <= 8)).all() and set(params[:, 2]) == {0, 1}
    distinct = [len({tuple(p) for p in params[i * k:(i + 1) * k]}) for i in range(n)]
    assert np.mean(np.array(distinct) > 1) > 0.9  # an image's copies are different crops/flips
    x0 = tiny_arrays[0][r["index"]]
    copies = C.crop_flip(x0, params).astype(np.float32) / 255
    dist = np.sqrt(((r["x"].astype(np.float32) - copies) ** 2).reshape(n * k, -1).sum(1))
    assert (dist <= cfg2.attack.eps + 0.01).all()
    assert np.allclose(dist, r["norm"], atol=1e-5)  # the norm record is measured from the copy
    moved = (params != [4, 4, 0]).any(1)  # not the identity crop: far from the unaugmented image
    raw = np.sqrt(((r["x"].astype(np.float32) - x0 / 255) ** 2).reshape(n * k, -1).sum(1))
    assert moved.any() and (raw[moved] > cfg2.attack.eps + 0.5).all()
    assert np.array_equal(r["margin"] > 0, r["fooled"])


def test_crop_flip_is_a_padded_crop_and_a_mirror():
    from advfeatures import construct as C

    x = np.arange(2 * 3 * 5 * 6, dtype=np.uint8).reshape(2, 3, 5, 6) + 1
    same = C.crop_flip(x, np.array([[4, 4, 0], [4, 4, 1]]))
    assert np.array_equal(same[0], x[0]) and np.array_equal(same[1], x[1][:, :, ::-1])
    shifted = C.crop_flip(x, np.array([[0, 0, 0], [8, 5, 0]]))
    assert np.array_equal(shifted[0][:, 4:, 4:], x[0][:, :1, :2]) and (shifted[0][:, :4] == 0).all()
    assert np.array_equal(shifted[1][:, :1, :5], x[1][:, 4:, 1:]) and (shifted[1][:, 1:] == 0).all()


def test_tracking_test_accuracy_per_epoch_changes_nothing_in_the_training(built):
    """track_test adds the clean test set's confusion after every epoch to the history; the
    weights are the bytes of the same stage without it, and the last epoch's accuracy is the
    evaluation's of the finished model."""
    import dataclasses

    from pipeline.kinds import StageSpec
    from pipeline.plan import eval_spec

    cfg, st, plan = built
    rt = dataclasses.replace(cfg.runtime, threads=1)
    plain = StageSpec("student", {**plan.students[0].student.config, "train": {
        **plan.students[0].student.config["train"], "epochs": 2}}, plan.students[0].student.inputs)
    tracked = StageSpec("student", {**plain.config, "track_test": True}, (*plain.inputs, plan.dataset.key))
    assert tracked.key != plain.key
    for spec in (plain, tracked):
        stages.train_student(st, spec, rt)
    w = [(st.path("models", s.key) / "weights.pt").read_bytes() for s in (plain, tracked)]
    assert w[0] == w[1]
    hist = st.manifest("models", tracked.key)["history"]
    assert len(hist) == 2 and all(np.asarray(h["test_confusion"]).sum() == 100 for h in hist)
    assert "test_confusion" not in st.manifest("models", plain.key)["history"][0]
    ev = eval_spec(tracked, plan.dataset)
    stages.evaluate(st, ev, rt)
    m = st.manifest("evals", ev.key)["metrics"]
    assert hist[-1]["test_acc"] == pytest.approx(m["acc_xy"]) and hist[-1]["test_confusion"] == m["confusion"]
