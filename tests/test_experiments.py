"""Experiments over one stage graph: the registry, the CLI, plans, and the set kinds' definitions,
run by the executors alone (the flow against them, byte for byte: test_flow)."""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

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
    kinds.discover()
    assert {"dataset", "model", "construct", "select", "student", "eval", "run"} <= set(kinds.KINDS)
    for name, kind in kinds.KINDS.items():
        assert callable(kinds.executor(name)) and kinds.all_kinds()[name] is kind
        assert kinds.KINDS[name].execute.__module__.endswith(name.replace("eval", "evaluation")) or name not in (
            "dataset", "model", "construct", "select", "student", "eval", "run")  # declared by the module it names
    with pytest.raises(ValueError, match="declared twice"):
        kinds.declare(kinds.StageKind("model", 9, "models", lambda *a: "", "again"))
    with pytest.raises(ValueError, match="unknown stage kind"):
        kinds.StageSpec("nope", {})


def test_every_set_kind_has_one_builder_and_the_construct_kind_dispatches_to_it(tiny_tar):
    from pipeline.sets import BUILDERS, builder

    assert {"rand", "other", "det", "errors", "leak-rand", "leak-other", "leak-det", "rand-clean-only",
            "released"} <= set(BUILDERS)
    assert {k for k, b in BUILDERS.items() if b.sharded is not None} >= {"rand", "other", "det"}
    assert builder("errors").upstream == "teacher" and builder("rand").perturbed and not builder("errors").perturbed
    with pytest.raises(ConfigError, match="unknown set kind 'nope'"):
        builder("nope")
    with pytest.raises(ConfigError, match="construct.sets has unknown"):
        resolve("tiny", ["construct.sets=[rand, nope]"])
    from pipeline.sets import SetBuilder, register

    with pytest.raises(ValueError, match="registered twice"):
        register(SetBuilder(("rand",), "again"))


def test_plans_are_data_unions_and_parts(tiny_tar):
    """A plan is labelled specs whose edges are input keys: union, until and the graph."""
    from pipeline.plan import Plan

    sha = source_sha256(tiny_tar)
    cfg = resolve("tiny", [])
    rep, ctl = get("replicate").plan(cfg, sha), get("controls").plan(cfg, sha)
    union = rep | ctl
    assert union.run is None and len(union.stages()) == len({s.key for s in union.stages()})  # each stage once
    assert {s.key for s in union.stages()} == {s.key for s in ctl.stages() if s.stage != "run"}
    assert [s.key for s in union.stages()][:len(rep.stages()) - 1] == [s.key for s in rep.stages()][:-1]
    for plan in (union, ctl):
        seen = set()
        for s in plan.stages():  # every input is an earlier stage
            assert all(k in seen for k in s.inputs), s
            seen.add(s.key)
    sets = rep.until("construct")
    assert {s.stage for s in sets.stages()} == {"dataset", "model", "construct"} and sets.run is None
    assert {s.key for s in sets.stages() if s.stage == "construct"} == set(k.key for k in rep.constructs.values())
    assert rep.teacher.key in {s.key for s in sets.stages()}  # the errors set needs it
    with pytest.raises(ConfigError, match="not a stage kind"):
        rep.until("nope")
    graph = {(r["stage"], r["what"]): r for r in rep.graph()}
    assert graph[("student", "rand seed=0")]["inputs"] == "rand" and graph[("construct", "rand")]["inputs"] == "data, source"
    assert graph[("eval", "rand seed=0")]["inputs"] == "rand seed=0, data"
    assert Plan(rep.nodes()).with_run(cfg.name).run.key == rep.run.key  # the run: its evaluations, clean first
    with pytest.raises(KeyError, match="expected one"):
        rep.one(role="student")


def test_controls_reuse_every_replicate_stage_and_add_only_controls(tiny_tar):
    cfg = resolve("tiny", [], data=str(tiny_tar))
    sha = source_sha256(tiny_tar)
    rep, ctl = get("replicate").plan(cfg, sha), get("controls").plan(cfg, sha)
    rep_keys = {s.key for s in rep.stages() if s.stage != "run"}
    assert rep_keys < {s.key for s in ctl.stages()}  # a controls run after replicate recomputes none of these
    assert set(ctl.constructs) - set(rep.constructs) == {"leak-rand", "leak-other", "leak-det", "rand-clean-only",
                                                         "clean-rand", "clean-other", "clean-det"}
    with pytest.raises(ConfigError, match="no PGD set"):
        get("controls").plan(resolve("tiny", ["construct.sets=[errors]"]), sha)
    only = get("controls").plan(resolve("tiny", ["controls.kinds=[matched]"], data=str(tiny_tar)), sha)
    assert set(only.constructs) - set(rep.constructs) == {"clean-rand", "clean-other", "clean-det"}
    assert {s.key for s in only.stages() if s.stage != "run"} < {s.key for s in ctl.stages()}
    with pytest.raises(ConfigError, match="controls.kinds"):
        resolve("tiny", ["controls.kinds=[leaks]"])


@pytest.mark.parametrize("keep", [False, True])
def test_leak_and_clean_only_sets_obey_their_definition(tmp_path, tiny_tar, tiny_arrays, keep):
    """leak-K: K's targets; every row is its clean image plus its target class's pattern (norm eps),
    clipped: rows of one target share one perturbation wherever nothing clipped; with keep_t_eq_y
    rows with t = y are clean. rand-clean-only: exactly D_rand's t = y rows, unperturbed."""
    from conftest import build

    from advfeatures import construct as C

    from pipeline.experiments.controls import build_control

    cfg, st, _ = build(tiny_tar, tmp_path, [f"controls.leak_keep_t_eq_y={str(keep).lower()}"])
    plan = get("controls").plan(cfg, source_sha256(tiny_tar))
    n, eps = cfg.construct.n_images, cfg.attack.eps
    rows = {}
    for kind in ("leak-rand", "leak-det", "rand-clean-only"):
        build_control(st, plan.constructs[kind], cfg.runtime)
        rows[kind] = A.read_rows(st.path("constructed", plan.constructs[kind].key))
    x_all, y_all = tiny_arrays[0], tiny_arrays[1]
    idx = C.choose_subset(len(y_all), n, cfg.construct.seed)
    t_rand = C.make_targets("rand", y_all[idx], 10, cfg.construct.seed)
    r = rows["leak-rand"]
    assert np.array_equal(r["index"], idx) and np.array_equal(r["y_target"], t_rand)
    assert np.array_equal(rows["leak-det"]["y_target"], (y_all[idx] + 1) % 10)
    patterns = C.leak_patterns(10, (3, 32, 32), "l2", eps, cfg.construct.seed).numpy()
    assert np.allclose(np.sqrt((patterns.reshape(10, -1) ** 2).sum(1)), eps, atol=1e-5)
    x0 = x_all[idx].astype(np.float32) / 255
    expect = np.clip(x0 + patterns[t_rand], 0, 1)
    same = t_rand == y_all[idx]
    if keep:
        expect[same] = x0[same]
    assert np.allclose(r["x"].astype(np.float32), expect, atol=2e-3)  # float16 storage
    assert (r["norm"] <= eps + 0.01).all()
    assert ((r["norm"][same] < 0.01).all() if keep else (r["norm"][same] > eps / 2).all())  # float16: < 0.01
    assert len(np.unique(r["y_target"])) > 5
    c = rows["rand-clean-only"]
    assert np.array_equal(c["index"], idx[same]) and (c["y_target"] == c["y_true"]).all()
    assert np.allclose(c["x"].astype(np.float32), x0[same], atol=2e-3) and (c["norm"] < 0.01).all()
    man = st.manifest("constructed", plan.constructs["leak-rand"].key)
    assert man["summary"]["attack_success"] == pytest.approx(r["fooled"].mean())


class _Linear(torch.nn.Module):
    """Two classes split by a unit vector w through c = 0.5: logits (s, -s) with s = w.(x - c). An
    L2 perturbation of norm eps moves s by at most eps, so an example is robust iff |s| > eps with
    the right sign: the robust accuracy is known exactly."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, x):
        s = ((x - 0.5).flatten(1) * self.w).sum(1)
        return torch.stack([s, -s], 1)


def test_untargeted_pgd_robust_accuracy_is_the_known_answer():
    from advfeatures.attacks import L2, robust_predictions

    g = torch.Generator().manual_seed(0)
    w = torch.randn(3 * 8 * 8, generator=g)
    w /= w.norm()
    s = torch.rand(400, generator=g) * 2 - 1
    s = s[(s.abs() - 0.25).abs() > 0.01]  # no example within 0.01 of the boundary
    y = torch.randint(0, 2, (len(s),), generator=g)
    x = (0.5 + s[:, None] * w[None]).reshape(-1, 3, 8, 8)  # entries stay inside [0, 1]
    assert x.min() > 0 and x.max() < 1
    model = _Linear(w)
    clean = (model(x).argmax(1) == y).float().mean().item()
    expected = (((s > 0.25) & (y == 0)) | ((s < -0.25) & (y == 1))).float().mean().item()
    pred = robust_predictions(model, x, y, L2(0.25), steps=20, step_size=2.5 * 0.25 / 20, batch_size=64)
    assert (pred == y).float().mean().item() == pytest.approx(expected, abs=1e-9)
    assert expected < clean - 0.1  # the attack matters here


def test_robust_evaluations_are_extra_stages_and_columns(tmp_path, tiny_tar):
    from conftest import build

    from advfeatures.attacks import L2, robust_predictions
    from pipeline import stages

    # 4 steps, not the default 20 (checked on a plan below): three attacks of the test set here
    cfg, st, _ = build(tiny_tar, tmp_path, ["evaluate.robust_eps=[0.25,0.5]", "evaluate.robust_steps=4"])
    sha = source_sha256(tiny_tar)
    default = get("replicate").plan(resolve("tiny", ["evaluate.robust_eps=[0.25]"]), sha)
    assert default.robust[default.source.key][0].config["robust"] == {"norm": "l2", "eps": 0.25, "steps": 20,
                                                                       "step_size": 0.03125}
    plan, plain = get("replicate").plan(cfg, sha), get("replicate").plan(resolve("tiny", []), sha)
    models = [plan.source, plan.teacher] + [s.student for s in plan.students]
    assert set(plan.robust) == {m.key for m in models} and all(len(v) == 2 for v in plan.robust.values())
    assert {s.key for s in plain.stages() if s.stage != "run"} < {s.key for s in plan.stages()}
    assert plain.robust == {} and plain.run.key != plan.run.key
    spec = plan.robust[plan.source.key][0]
    assert spec.config["robust"] == {"norm": "l2", "eps": 0.25, "steps": 4, "step_size": 0.15625}
    stages.evaluate(st, plan.source_eval, cfg.runtime)
    stages.evaluate(st, spec, cfg.runtime)
    x, y = stages.load_split(st, plan.dataset.key, "test")
    pred = robust_predictions(stages.load_model(st, plan.source.key), torch.from_numpy(x), torch.from_numpy(y),
                              L2(0.25), 4, 0.15625, batch_size=cfg.runtime.eval_batch_size)
    robust = st.manifest("evals", spec.key)["metrics"]["acc_xy"]
    assert robust == pytest.approx((pred.numpy() == y).mean())
    clean = st.manifest("evals", plan.source_eval.key)["metrics"]["acc_xy"]
    assert robust <= clean
    assert plan.labels()[spec.key] == "source eps=0.25"
    stages.evaluate(st, plan.robust[plan.source.key][1], cfg.runtime)
    from pipeline.report import _row

    row = _row(st, "D (source)", plan.source, plan.source_eval, None, clean, plan.robust[plan.source.key])
    assert row["robust_acc_eps0.25_%"] == pytest.approx(100 * robust, abs=0.01)
    assert row["robust_acc_eps0.5_%"] <= row["robust_acc_eps0.25_%"] <= row["acc_xy_%"]


def test_robust_n_attacks_n_test_images_the_classes_in_turn(tmp_path, tiny_sources):
    """evaluate.robust_n: the robust accuracy of n clean test images, one of each class in turn (a
    known answer: the same attack on those images), keyed; unset, the keys are those of before the
    setting. The split's head would not do: a zip's test split is sorted by class (CIFAR-10's first
    1,000 were all airplanes, and so were the robust accuracies of 2026-12-07 and before)."""
    from conftest import build

    from advfeatures.attacks import L2, robust_predictions
    from advfeatures.data import classes_in_turn
    from pipeline import stages

    data = tiny_sources["zip"]  # its test split sorted by class
    cfg, st, _ = build(data, tmp_path, ["evaluate.robust_eps=[0.5]", "evaluate.robust_n=5", "evaluate.robust_steps=3",
                                        "evaluate.check_restarts=1", "evaluate.check_n=5"])
    sha = source_sha256(data)
    plan = get("replicate").plan(cfg, sha)
    whole = get("replicate").plan(resolve("tiny", ["evaluate.robust_eps=[0.5]", "evaluate.robust_steps=3"]), sha)
    spec = plan.robust[plan.source.key][0]
    assert spec.config["robust"]["n"] == 5 and "n" not in whole.robust[whole.source.key][0].config["robust"]
    assert spec.key != whole.robust[whole.source.key][0].key
    stages.evaluate(st, spec, cfg.runtime)
    x, y = stages.load_split(st, plan.dataset.key, "test")
    idx = classes_in_turn(y, 5)
    assert sorted(y[idx]) == [0, 1, 2, 3, 4] and set(y[:5]) == {0}  # the head: one class
    pred = robust_predictions(stages.load_model(st, plan.source.key), torch.from_numpy(x[idx]),
                              torch.from_numpy(y[idx]), L2(0.5), 3, 2.5 * 0.5 / 3,
                              batch_size=cfg.runtime.eval_batch_size)
    m = st.manifest("evals", spec.key)["metrics"]
    assert m["acc_xy"] == pytest.approx((pred.numpy() == y[idx]).mean()) and m["n_test"] == 5
    # the clean accuracy of the same 5 images, not the whole test set's (which differs from it here)
    from advfeatures.training import predict
    clean = predict(stages.load_model(st, plan.source.key), torch.from_numpy(x[idx]), 5, "cpu").numpy()
    assert m["acc_clean_same_images"] == pytest.approx((clean == y[idx]).mean())
    # its strength check: the same images (its base attack scores as the evaluation), read against their labels
    (check,) = plan.checks_of(plan.source.key)
    stages.evaluate(st, check, cfg.runtime)
    c = st.manifest("evals", check.key)["metrics"]
    assert c["n_test"] == 5 and c["acc_base"] == pytest.approx(m["acc_xy"])
    assert c["acc_xy"] == pytest.approx(c["acc_after_each_attack"][-1])
    assert c["acc_xy"] == pytest.approx(c["acc_base"] - c["strength_drop"])


def test_errors_sweep_plan_table_and_reuse(tmp_path, tiny_tar, tiny_arrays):
    """One teacher per epochs entry; the errors set holds exactly the teacher's mistakes; the
    teacher with replicate's recipe is replicate's (same keys: reused); students differ in init."""
    from advfeatures.training import predict
    from pipeline import stages
    from pipeline.experiments.errors_sweep import build_table, to_markdown

    cfg = resolve("tiny", ["errors_sweep.teacher_epochs=[1,2]", "student.seeds=[0,1]"], data=str(tiny_tar),
                  store=str(tmp_path))
    sha = source_sha256(tiny_tar)
    plan, rep = get("errors-sweep").plan(cfg, sha), get("replicate").plan(cfg, sha)
    teachers = plan.find(role="teacher")
    assert teachers[0].key == rep.teacher.key and plan.get(role="set", epochs=1).key == rep.constructs["errors"].key
    assert [t.spec.config["train"]["epochs"] for t in teachers] == [1, 2]
    st = Store(tmp_path)
    kinds.run_all(st, plan, Context(runtime=cfg.runtime, data=cfg.data, plan=plan, config=cfg,
                                    experiment="errors-sweep"))
    df = build_table(st, plan)
    assert list(df["teacher_epochs"]) == [1, 1, 2, 2] and df["student_init"].nunique() == 4
    x, y = tiny_arrays[0], tiny_arrays[1]
    for t in teachers:
        wrong = predict(stages.load_model(st, t.key), torch.from_numpy(x)).numpy() != y
        assert (df[df["teacher_epochs"] == t.tags["epochs"]]["n_mistakes"] == wrong.sum()).all()
    assert ((df["ci95_lo_%"] <= df["student_acc_%"]) & (df["student_acc_%"] <= df["ci95_hi_%"])).all()
    md = to_markdown(df)
    assert "Student against teacher" in md and "all students start from different weights" in md
    assert (st.path("runs", plan.run.key) / "table.csv").is_file()


def test_sweep_axes_points_and_errors():
    from pipeline import sweep as S

    ax = S.axes(["construct.n_images=40,80", "construct.sets=[rand, det],[det]"])
    assert ax == [("construct.n_images", ["40", "80"]), ("construct.sets", ["[rand, det]", "[det]"])]
    assert S.points(ax) == [["construct.n_images=40", "construct.sets=[rand, det]"],
                            ["construct.n_images=40", "construct.sets=[det]"],
                            ["construct.n_images=80", "construct.sets=[rand, det]"],
                            ["construct.n_images=80", "construct.sets=[det]"]]
    for bad, msg in (("attack.steps", "section.key=V1,V2"), ("attack.steps=5,5", "repeats"),
                     ("attack.steps=", "non-empty")):
        with pytest.raises(ConfigError, match=msg):
            S.axes([bad])
    with pytest.raises(ConfigError, match="twice"):
        S.axes(["attack.steps=1", "attack.steps=2"])
    assert S.seeds_override(3) == "student.seeds=[0, 1, 2]"
    assert main(["run", "--profile", "tiny", "--sweep", "attack.steps=1,-1"]) == 2  # every point checked first


def _write_released(folder, x, y, chunks=3):
    """The release format: CIFAR_ims / CIFAR_lab, torch-saved lists of tensors (concatenated on load)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(list(torch.from_numpy(x).chunk(chunks)), folder / "CIFAR_ims")
    torch.save(list(torch.from_numpy(y).chunk(chunks)), folder / "CIFAR_lab")


def test_released_sets_import_by_content_and_train_students(tmp_path, tiny_tar, tiny_arrays):
    import shutil

    from pipeline.experiments.released import build_table

    x = tiny_arrays[0][:90].astype(np.float32) / 255
    y_rand = np.random.default_rng(0).integers(0, 10, 90)
    _write_released(tmp_path / "rel" / "drand_CIFAR", x, y_rand)
    _write_released(tmp_path / "rel" / "robust_CIFAR", x[:60], tiny_arrays[1][:60])
    over = [f"released.root={tmp_path / 'rel'}", "released.sets=[drand_CIFAR, robust_CIFAR]"]
    cfg = resolve("tiny", over, data=str(tiny_tar), store=str(tmp_path / "store"))
    sha = source_sha256(tiny_tar)
    plan = get("released").plan(cfg, sha)
    st = Store(tmp_path / "store")
    kinds.run_all(st, plan, Context(runtime=cfg.runtime, data=cfg.data, plan=plan, config=cfg, experiment="released"))
    rows = A.read_rows(st.path("constructed", plan.constructs["drand_CIFAR"].key))
    assert np.array_equal(rows["y_target"], y_rand) and np.allclose(rows["x"].astype(np.float32), x, atol=1e-3)
    assert (rows["y_true"] == -1).all() and np.isnan(rows["margin"]).all()
    df = build_table(st, plan)
    assert list(df["set"]) == ["drand_CIFAR", "robust_CIFAR"] and list(df["n_train"]) == [90, 60]
    # keyed by content: the same files elsewhere give the same key, other content another key
    shutil.copytree(tmp_path / "rel", tmp_path / "copy")
    moved = get("released").plan(resolve("tiny", [f"released.root={tmp_path / 'copy'}", over[1]]), sha)
    assert moved.constructs["drand_CIFAR"].key == plan.constructs["drand_CIFAR"].key
    _write_released(tmp_path / "copy" / "drand_CIFAR", x, (y_rand + 1) % 10)
    changed = get("released").plan(resolve("tiny", [f"released.root={tmp_path / 'copy'}", over[1]]), sha)
    assert changed.constructs["drand_CIFAR"].key != plan.constructs["drand_CIFAR"].key


def test_run_help_lists_every_profile_and_experiment_from_their_registries(capsys):
    from advfeatures.config import PROFILE_DIR

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    listed = out[out.index("profiles (--profile"):]
    for name in [p.stem for p in PROFILE_DIR.glob("*.yaml")] + list(EXPERIMENTS):
        assert f"\n  {name} " in listed, name


def test_experiment_checks_run_before_any_work_and_a_failed_download_exits_3(tmp_path, tiny_tar, capsys,
                                                                              monkeypatch):
    """`--experiment released` with a root that is not a folder: a one-line error before the
    temporary server starts and before the store exists; a failed torchvision download: exit 3
    (what `make demo` falls back on), with how to get CIFAR-10 or run without it."""
    import flows.replicate

    def never(**_kw):
        raise AssertionError("a flow started")

    monkeypatch.setattr(flows.replicate, "run_experiment", never)
    store = tmp_path / "store"
    assert main(["run", "--experiment", "released", "--profile", "tiny", "--data", str(tiny_tar),
                 "--store", str(store), "--set", f"released.root={tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "released.root=" in err and "is not a folder" in err
    assert not store.exists()

    from advfeatures import data as D

    def offline(*_a, **_kw):
        raise OSError("Name or service not known")

    monkeypatch.setattr("torchvision.datasets.CIFAR10", offline)
    assert main(["run", "--profile", "tiny", "--store", str(store), "--set", "data.source=torchvision",
                 "--set", f"data.download_root={tmp_path / 'dl'}"]) == 3
    err = capsys.readouterr().err
    assert "could not download CIFAR-10" in err and "cifar-10-python.tar.gz" in err and "--profile tiny" in err
    assert not store.exists() and D.DownloadError.__mro__[1] is D.DataSourceError


def test_released_sets_refuse_bad_input(tmp_path, tiny_tar, tiny_arrays):
    from pipeline import stages
    from pipeline.experiments.released import import_released
    from storage.store import StoreError

    sha = source_sha256(tiny_tar)
    with pytest.raises(ConfigError, match="released.root"):
        get("released").plan(resolve("tiny", []), sha)
    (tmp_path / "rel" / "ddet_CIFAR").mkdir(parents=True)
    with pytest.raises(ConfigError, match="lacks"):
        get("released").plan(resolve("tiny", [f"released.root={tmp_path / 'rel'}", "released.sets=[ddet_CIFAR]"]), sha)
    _write_released(tmp_path / "rel" / "ddet_CIFAR", tiny_arrays[0][:30].astype(np.float32), tiny_arrays[1][:30])
    cfg = resolve("tiny", [f"released.root={tmp_path / 'rel'}", "released.sets=[ddet_CIFAR]"], data=str(tiny_tar),
                  store=str(tmp_path / "store"))
    plan = get("released").plan(cfg, sha)
    st = Store(tmp_path / "store")
    stages.ingest(st, cfg.data, plan.dataset)
    with pytest.raises(StoreError, match=r"floats in \[0, 1\]"):  # 0..255 images: the release is in [0, 1]
        import_released(st, plan.constructs["ddet_CIFAR"], cfg.runtime)
    assert not st.is_complete("constructed", plan.constructs["ddet_CIFAR"].key)


def test_waves_put_every_stage_after_its_inputs(tiny_tar):
    plan = get("replicate").plan(resolve("tiny", ["construct.select=0.5"]), source_sha256(tiny_tar))
    levels = kinds.waves(plan.stages())
    where = {s.key: i for i, level in enumerate(levels) for s in level}
    assert sorted(where) == sorted(s.key for s in plan.stages())
    for spec in plan.stages():
        assert all(where[k] < where[spec.key] for k in spec.inputs if k in where)
    assert [s.stage for s in levels[0]] == ["dataset"] and levels[-1] == [plan.run]
    assert len({where[s.student.key] for s in plan.students if s.kind != "errors"}) == 1  # PGD students: one level


def test_controls_mirror_the_augmented_copies_of_their_sets(tmp_path, tiny_tar):
    """With construct.augment_copies, leak-K has K's rows (each image's copies, K's targets) and its
    images are K's clean crops and flips plus the pattern; rand-clean-only is D_rand's t = y rows
    of those copies. Keys without copies stay as they were."""
    from conftest import build

    from advfeatures import construct as C
    from pipeline.experiments.controls import build_control
    from pipeline.sets.pgd import pgd_set

    cfg, st, _ = build(tiny_tar, tmp_path, ["construct.augment_copies=2", "controls.leak_keep_t_eq_y=true"])
    plan = get("controls").plan(cfg, source_sha256(tiny_tar))
    rand = pgd_set(st, plan.constructs["rand"])  # D_rand's rows, targets and clean crops (no PGD needed)
    clean = rand.images(st, plan.dataset.key, 0, len(rand.idx)).astype(np.float32) / 255
    assert len(rand.idx) == 2 * cfg.construct.n_images
    rows = {}
    for kind in ("leak-rand", "rand-clean-only"):
        assert plan.constructs[kind].config["augment_copies"] == 2
        build_control(st, plan.constructs[kind], cfg.runtime)
        rows[kind] = A.read_rows(st.path("constructed", plan.constructs[kind].key))
    r, same = rows["leak-rand"], rand.t == rand.y
    assert np.array_equal(r["index"], rand.idx) and np.array_equal(r["y_target"], rand.t)
    patterns = C.leak_patterns(10, (3, 32, 32), "l2", cfg.attack.eps, cfg.construct.seed).numpy()
    expect = np.clip(clean + patterns[rand.t], 0, 1)
    expect[same] = clean[same]
    assert np.allclose(r["x"].astype(np.float32), expect, atol=2e-3)
    c = rows["rand-clean-only"]
    assert np.array_equal(c["index"], rand.idx[same]) and np.allclose(c["x"].astype(np.float32), clean[same], atol=2e-3)
    from pipeline.report_data import examples  # the report's examples: each row beside its own clean copy

    for kind in ("leak-rand", "rand-clean-only"):
        spec = plan.constructs[kind]
        ex = examples(st, spec.as_dict(), n=4)
        assert ex is not None and ex["kind"] == kind
        want = np.clip(ex["clean"] + patterns[ex["y_target"]], 0, 1) if kind == "leak-rand" else ex["clean"]
        moved = ex["y_target"] != ex["y_true"] if kind == "leak-rand" else np.ones(len(want), bool)
        assert moved.any() and np.allclose(ex["adv"][moved], want[moved], atol=2e-3)  # each row's own crop
    plain = get("controls").plan(build(tiny_tar, tmp_path / "plain")[0], source_sha256(tiny_tar))
    assert "augment_copies" not in plain.constructs["leak-rand"].config


@pytest.mark.parametrize("copies", [0, 2])
def test_row_matched_control_is_exactly_the_trained_rows_clean(tmp_path, tiny_tar, copies):
    """clean-K holds the rows K's students train on (its margin selection's, in order), each
    labelled t, with the clean image put back: its distance to K's row is that row's recorded
    perturbation norm (a wrong row, copy or crop would be far off). Its students train with K's
    recipe; at construct.select=1 it mirrors the whole set."""
    from conftest import build

    from pipeline.experiments.controls import build_matched
    from pipeline.sets.pgd import generate
    from pipeline.stages.select import select_rows

    over = ["construct.select=0.5", "construct.sets=[rand,det]", "student.per_set={rand: {lr: 0.01}}"]
    cfg, st, _ = build(tiny_tar, tmp_path, over + ([f"construct.augment_copies={copies}"] if copies else []))
    plan = get("controls").plan(cfg, source_sha256(tiny_tar))
    for k in ("rand", "det"):
        sel, matched = plan.selections[k], plan.constructs[f"clean-{k}"]
        assert matched.inputs == (plan.dataset.key, plan.source.key, sel.key)
        generate(st, plan.constructs[k], cfg.runtime)
        select_rows(st, sel, cfg.runtime)
        build_matched(st, matched, cfg.runtime)
        s, m = A.read_rows(st.path("constructed", sel.key)), A.read_rows(st.path("constructed", matched.key))
        assert len(m["index"]) == len(s["index"]) < len(A.read_rows(st.path("constructed", plan.constructs[k].key),
                                                                     names=("index",))["index"])
        assert np.array_equal(m["index"], s["index"]) and np.array_equal(m["y_target"], s["y_target"])
        assert np.array_equal(m["y_true"], s["y_true"]) and (m["norm"] < 0.01).all()
        dist = np.sqrt(((s["x"].astype(np.float32) - m["x"].astype(np.float32)) ** 2).reshape(len(m["x"]), -1).sum(1))
        assert np.allclose(dist, s["norm"], atol=0.02), (k, np.abs(dist - s["norm"]).max())
        assert s["norm"].mean() > 0.1  # the check has something to find
    students = {st_.kind: st_.student for st_ in plan.students}
    assert students["clean-rand"].config["train"]["lr"] == students["rand"].config["train"]["lr"] == 0.01
    assert students["clean-det"].config["train"] == students["det"].config["train"]
    whole = get("controls").plan(resolve("tiny", ["construct.select=1"], data=str(tiny_tar)), source_sha256(tiny_tar))
    assert whole.constructs["clean-det"].inputs[2] == whole.constructs["det"].key and not whole.selections


def test_every_plan_lists_a_stage_after_all_of_its_inputs(tiny_tar):
    """Stages run in plan order: with margin selection the row-matched controls (made from a
    selection) come after it, and over several sources every source's stages keep that order."""
    sha = source_sha256(tiny_tar)
    for over in (["construct.select=0.5"], ["construct.select=0.5", "source.seeds=[0,1]"]):
        for name in ("replicate", "controls"):
            plan = get(name).plan_of(resolve("tiny", over, data=str(tiny_tar)), sha)
            seen: set[str] = set()
            inside = {s.key for s in plan.stages()}
            for s in plan.stages():
                assert all(k in seen for k in s.inputs if k in inside), (name, over, s.stage, s.config.get("kind"))
                seen.add(s.key)
