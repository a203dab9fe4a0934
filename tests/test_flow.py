"""The `replicate` flow end to end under prefect_test_harness, on a tiny synthetic dataset."""

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("prefect")

from flows.cli import main as cli_main  # noqa: E402
from flows.replicate import replicate  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def harness(prefect_api):
    """The flows of this module run against the process's temporary Prefect server (conftest)."""


@pytest.fixture(scope="module")
def first(tmp_path_factory, tiny_tar):
    """The tiny replicate run every test of this module starts from: (store, its output). Its task
    runs are the server's between ``out["t0"]`` and ``out["t1"]``."""
    import datetime as dt

    store = tmp_path_factory.mktemp("store")
    t0 = dt.datetime.now(dt.timezone.utc)
    out = replicate(profile="tiny", data=str(tiny_tar), store=str(store))
    return store, {**out, "t0": t0, "t1": dt.datetime.now(dt.timezone.utc)}


def _manifest_mtimes(store):
    return {p.relative_to(store).as_posix(): p.stat().st_mtime_ns for p in store.rglob("manifest.json")}


def _markdown_table(md):
    """The first Markdown table of ``md``: (header, rows), cells stripped."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return cells[0], cells[2:]


def test_first_run_writes_the_table(first):
    """Every number of the table recomputed from the store: each model's accuracies on the clean
    test set by predicting it here, their Wilson intervals, each set's attack success and t = y
    share from its stored records; the Markdown and Parquet tables hold the same rows."""
    import torch

    from advfeatures.training import predict, wilson_interval
    from pipeline import stages
    from storage import arrays as A
    from storage.store import Store

    store, out = first
    run_dir = store / "runs" / out["run_key"]
    assert str(run_dir) == out["run_dir"]
    csv = pd.read_csv(run_dir / "table.csv")
    pq = pd.read_parquet(run_dir / "table.parquet")
    assert list(csv["set"]) == ["D (source)", "teacher (errors)", "rand", "other", "det", "errors"]
    pd.testing.assert_frame_equal(pq.replace({"": np.nan}), csv, check_dtype=False)  # CSV: "" reads as NaN
    st = Store(store)
    (dataset_key,) = {t["key"] for t in out["timings"] if t["stage"] == "dataset"}
    x_test, y_test = (torch.from_numpy(a) for a in stages.load_split(st, dataset_key, "test"))
    for r in pq.to_dict("records"):
        pred = predict(stages.load_model(st, r["model_key"]).eval(), x_test, batch_size=64)
        hits = int((pred == y_test).sum())
        assert r["acc_xy_%"] == round(100 * hits / len(y_test), 2), r["set"]
        assert r["acc_xy+1_%"] == round(100 * float((pred == (y_test + 1) % 10).float().mean()), 2), r["set"]
        lo, hi = wilson_interval(hits, len(y_test))
        assert (r["ci95_lo_%"], r["ci95_hi_%"]) == (round(100 * lo, 2), round(100 * hi, 2))
        assert r["vs_chance"] == ("above" if lo > 0.1 else "below" if hi < 0.1 else "at chance")
        assert r["source_acc_%"] == csv.loc[0, "acc_xy_%"] and r["n_test"] == 100
        if r["construct_key"]:  # a student: its set's records
            rows = A.read_rows(store / "constructed" / r["construct_key"])
            assert r["n_train"] == len(rows["y_target"])
            same = rows["y_target"] == rows["y_true"]
            assert r["share_t=y_%"] == round(100 * same.mean(), 2)
            if r["set"] != "errors":  # PGD sets: how often the source was fooled, over all rows and t != y
                # (no selection in this profile: the students trained on the whole set)
                for where in ("whole_set", "trained_rows"):
                    assert r[f"fooled_{where}_%"] == round(100 * rows["fooled"].mean(), 2)
                    assert r[f"fooled_{where}_t≠y_%"] == round(100 * rows["fooled"][~same].mean(), 2)
                assert r["trained_rows_%"] == 100.0
        else:
            assert r["n_train"] == 200 and np.isnan(r["fooled_whole_set_%"]) and np.isnan(r["fooled_trained_rows_%"])
    assert (csv["n_train"].iloc[2:5] == 120).all()
    assert csv.loc[0, "acc_xy_%"] > 50  # the synthetic classes are easy: the source learns them
    md = (run_dir / "table.md").read_text()
    header, rows = _markdown_table(md)
    assert header == [c for c in csv.columns if not c.endswith("_key") and c != "n_test"]
    assert [r[0] for r in rows] == list(csv["set"])
    assert [float(r[header.index("acc_xy_%")]) for r in rows] == pytest.approx(list(csv["acc_xy_%"]), abs=0.05)
    # source, teacher and the 4 students: six different initial weights, and the table says so
    assert csv["init"].nunique() == 6
    assert md.rstrip().splitlines()[-1] == "Initial weights: all 6 models start from different weights."
    assert all(t["computed"] for t in out["timings"])


def test_table_artifact_published(first):
    """The table artifact holds the run's table, without its key columns."""
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    store, out = first
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["replicate-table"])))
    assert arts and arts[0].type == "table"
    table = pd.read_csv(store / "runs" / out["run_key"] / "table.csv")
    got = pd.DataFrame(json.loads(arts[0].data))
    want = table.drop(columns=[c for c in table.columns if c.endswith("_key")])
    pd.testing.assert_frame_equal(got, want, check_dtype=False)


def test_second_run_computes_nothing(first, tiny_tar, monkeypatch):
    store, out = first
    import advfeatures.construct as C
    from pipeline.sets import errors as SC
    from pipeline.stages import dataset as SD
    from pipeline.stages import evaluation as SE
    from pipeline.stages import model as SM

    def boom(*a, **k):
        raise AssertionError("a cached stage was recomputed")

    from pipeline import html_report

    for mod, name in ((SM, "fit"), (SE, "predict"), (SC, "predict"), (C, "pgd"), (SD.D, "read_source"),
                      (html_report, "build")):  # the report of a cached run is kept, not rendered again
        monkeypatch.setattr(mod, name, boom)
    before = _manifest_mtimes(store)
    again = replicate(profile="tiny", data=str(tiny_tar), store=str(store))
    assert again["run_key"] == out["run_key"] and again["report"] == out["report"]
    assert _manifest_mtimes(store) == before
    assert not any(t["computed"] for t in again["timings"])


def test_cli_rerun_with_everything_in_the_store_starts_no_flow(first, tiny_tar, monkeypatch, capsys):
    """`advfeatures run` of a run whose stages, table and report are all in the store prints them
    without a flow (no temporary server to start); with --record, or once a stage is missing, the
    flow runs."""
    import flows.replicate as R
    from flows.cli import main as cli_main

    store, out = first
    started = []
    monkeypatch.setattr(R, "replicate", lambda **kw: started.append(kw) or {"report": None})
    args = ["run", "--profile", "tiny", "--data", str(tiny_tar), "--store", str(store)]
    before = _manifest_mtimes(store)
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert not started and _manifest_mtimes(store) == before
    assert f"run folder: {out['run_dir']}" in printed and "Prefect not started" in printed
    assert f"report: {out['report']}" in printed
    assert cli_main(args + ["--record"]) == 0 and len(started) == 1
    assert cli_main(args + ["--set", "student.train.epochs=3"]) == 0 and len(started) == 2  # work to do


def _computed(out):
    return sorted((t["stage"], t["what"]) for t in out["timings"] if t["computed"])


def test_student_change_recomputes_only_students(first, tiny_tar):
    store, _ = first
    # report.write=false (the reruns of this module that do not read the report): tables only
    out = replicate(profile="tiny", overrides=["student.train.epochs=2", "report.write=false"], data=str(tiny_tar),
                    store=str(store))
    stages = {s for s, _ in _computed(out)}
    assert stages == {"student", "eval", "run"}
    assert sum(1 for s, _ in _computed(out) if s == "student") == 4
    run_dir = store / "runs" / out["run_key"]
    assert out["report"] is None and (run_dir / "table.csv").is_file() and (run_dir / "table.parquet").is_file()
    assert not (run_dir / "report.html").exists() and not (run_dir / "figures").exists()


def test_attack_change_recomputes_generation_not_source(first, tiny_tar):
    store, _ = first
    out = replicate(profile="tiny", overrides=["attack.steps=2", "report.write=false"], data=str(tiny_tar),
                    store=str(store))
    computed = _computed(out)
    assert ("construct", "rand") in computed and ("construct", "det") in computed
    assert ("construct", "errors") not in computed
    assert not any(s == "model" for s, _ in computed)
    assert sum(1 for s, _ in computed if s == "student") == 3


def test_margin_selection_is_a_cached_stage_over_the_pgd_sets(first, tiny_tar):
    store, _ = first
    out = replicate(profile="tiny", overrides=["construct.select=0.4"], data=str(tiny_tar), store=str(store))
    computed = _computed(out)
    assert [w for s, w in computed if s == "select"] == ["det top 0.4", "other top 0.4", "rand top 0.4"]
    assert not any(s in ("model", "construct") for s, _ in computed)  # sources and PGD sets reused
    assert sum(1 for s, _ in computed if s == "student") == 3  # errors students reused too
    df = pd.read_csv(store / "runs" / out["run_key"] / "table.csv")
    assert list(df.loc[df["set"].isin(["other", "det"]), "n_train"]) == [48, 48]
    assert df.loc[df["set"] == "rand", "n_train"].iloc[0] in (48, 49)  # 40% of t = y and of t != y, each rounded up


def test_cli_show_config_prints_the_config_and_every_key(tiny_tar, tmp_path, capsys, monkeypatch):
    """show-config prints the resolved config (as YAML that reads back to it) and the plan: every
    stage with its kind, label, key and the labels of its inputs, as the run would plan them."""
    import yaml

    from advfeatures.config import STORE_ENV, resolve
    from flows.replicate import plan_for

    monkeypatch.delenv(STORE_ENV, raising=False)
    assert cli_main(["show-config", "--profile", "tiny", "--data", str(tiny_tar), "--store", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    config, plan_part = text.split("\n# the plan", 1)
    cfg = resolve("tiny", data=str(tiny_tar), store=str(tmp_path))
    assert yaml.safe_load(config) == cfg.to_dict()
    printed = []
    for line in plan_part.splitlines()[1:]:
        if "<-" in line:
            left, inputs = line.split("<-")
            stage, *what, key = left.split()
            printed.append({"stage": stage, "what": " ".join(what), "key": key, "inputs": inputs.strip()})
    want = [{**row, "inputs": row["inputs"] or "-"} for row in plan_for(cfg).graph()]
    assert printed == want
    assert {r["stage"] for r in printed} == {"dataset", "model", "eval", "construct", "student", "run"}


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    assert cli_main(["run", "--profile", "tiny", "--set", "attack.eps=-1"]) == 2
    err = capsys.readouterr().err
    assert "attack.eps must be >= 0" in err and "Traceback" not in err
    assert cli_main(["run", "--profile", "tiny", "--data", str(tmp_path / "missing.zip")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and str(tmp_path / "missing.zip") in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())
    for command in (["verify", "0123456789abcdef"], ["ls"], ["gc"]):  # a store that cannot be opened
        assert cli_main([*command, "--store", "nosuchproto://bucket/store"]) == 2, command
        err = capsys.readouterr().err
        assert err.startswith("advfeatures: error: cannot open store") and "fsspec backend" in err, err


class _ManifestsOf:
    """A store that answers every manifest the table reads, as a finished run would have them."""

    def manifest(self, folder, key):
        if folder == "evals":
            return {"metrics": {"acc_xy": 0.5, "ci95_xy": [0.4, 0.6], "acc_xy1": 0.1, "chance": 0.1, "n_test": 100}}
        if folder == "models":
            return {"seeds": {"train": 0}, "n_train": 100, "init_sha256": key}
        return {"key": key, "summary": {}}


def test_paper_profile_plans_the_papers_stages_and_recipes():
    """The paper profile's plan, without training a ResNet-50: every stage kind of the replication,
    each run by a task of the flow, with the architectures, recipes and attack of Ilyas et al.
    (2019) section 3.2 and Wallace (2019) (SCIENCE.md) in the specs that are hashed and executed,
    and Table 1's rows beside the published numbers."""
    from advfeatures.config import resolve
    from pipeline.experiments import get as get_experiment
    from pipeline.kinds import sharded
    from tasks import stages as T

    cfg = resolve("paper")
    plan = get_experiment("replicate").plan(cfg, "0" * 64)
    stages = plan.stages()
    assert [s.stage for s in stages].count("run") == 1 and stages[-1] is plan.run
    assert {s.stage for s in stages} == {"dataset", "model", "eval", "construct", "student", "run"}
    for spec in stages[:-1]:  # each through its kind's task; PGD sets by shard
        assert sharded(spec) is not None if spec.stage == "construct" and spec.config["kind"] != "errors" \
            else T.task_for(spec).name
    recipe = {"batch_size": 128, "lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4,
              "schedule": "step", "step_epochs": 50, "gamma": 0.1, "augment": "robustness", "epochs": 150}
    source, teacher = plan.source.config, plan.teacher.config
    assert source["model"]["arch"] == "resnet50" and recipe.items() <= source["train"].items()
    assert teacher["model"]["arch"] == "resnet18" and teacher["train"]["epochs"] == 2  # Wallace's teacher
    pgd = {"norm": "l2", "eps": 0.5, "step_size": 0.1, "steps": 100, "random_start": False, "use_best": True}
    sets = plan.constructs
    assert list(sets) == ["rand", "other", "det", "errors"]
    for kind in ("rand", "other", "det"):
        assert sets[kind].config["attack"] == pgd and sets[kind].config["n_images"] == 0  # every training image
        assert sets[kind].inputs == (plan.dataset.key, plan.source.key)
    assert sets["errors"].inputs == (plan.dataset.key, plan.teacher.key)
    students = {s.kind: s for s in plan.students}
    assert {k: s.student.config["model"]["arch"] for k, s in students.items()} == \
        {"rand": "resnet50", "other": "resnet50", "det": "resnet50", "errors": "resnet18"}
    assert all(s.construct == sets[k] and s.student.config["init"] == "independent" for k, s in students.items())
    train = {k: s.student.config["train"] for k, s in students.items()}
    assert train["other"] == source["train"] and train["errors"] == source["train"]  # the source's recipe
    assert train["rand"] == {**source["train"], "lr": 0.01}  # a ResNet-50 on D_rand failed at lr 0.1
    assert train["det"] == {**source["train"], "augment": "none"}  # no augmentation for D_det
    inits = [source["seeds"]["init"], teacher["seeds"]["init"], *(s.student.config["seeds"]["init"]
                                                                  for s in students.values())]
    assert len(set(inits)) == 6
    assert plan.run.inputs == tuple(e.key for e in [plan.source_eval, plan.teacher_eval,
                                                    *(s.eval for s in students.values())])
    df = get_experiment("replicate").table(_ManifestsOf(), plan)  # Table 1 beside the paper's numbers
    assert list(df["set"]) == ["D (source)", "teacher (errors)", "rand", "other", "det", "errors"]
    assert list(df["model"]) == ["resnet50", "resnet18", "resnet50", "resnet50", "resnet50", "resnet18"]
    paper = df["paper_%"]
    assert paper[[0, 2, 4, 5]].tolist() == [95.3, 63.3, 43.7, 49.7]
    assert paper[[1, 3]].isna().all()  # no teacher and no D_other in the paper
    assert list(df["model_key"]) == [plan.source.key, plan.teacher.key, *(s.student.key for s in students.values())]


def _seeded(first_store, dest):
    """A new store holding ``first``'s dataset, models and evaluations: only sets are computed in it."""
    import shutil

    for folder in ("datasets", "models", "evals"):
        shutil.copytree(first_store / folder, dest / folder, ignore=shutil.ignore_patterns(".*"))
    return dest


@pytest.mark.slow
def test_parallel_shard_workers_give_identical_sets(first, tiny_tar, tmp_path):
    """Shards run by 3 concurrent workers give the same bytes as the first run's one worker."""
    from storage import arrays as A

    store = _seeded(first[0], tmp_path / "w3")
    over = ["construct.sets=[det]", "runtime.threads=1", "runtime.shard_workers=3", "report.write=false"]
    out = replicate(profile="tiny", overrides=over, data=str(tiny_tar), store=str(store))
    assert [t["stage"] for t in out["timings"] if t["computed"]] == ["construct", "run"]
    key = next(t["key"] for t in out["timings"] if t["stage"] == "construct")
    got, want = A.read_rows(store / "constructed" / key), A.read_rows(first[0] / "constructed" / key)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert len(got["y_target"]) == 120


EVAL_METRICS = ("acc_xy", "acc_xy1", "chance", "ci95_xy", "ci95_xy1", "correct_xy", "correct_xy1", "n_test")


def _artifacts(store, plan) -> dict:
    """What a plan computed, byte for byte: model weights, every constructed set's arrays, the tables."""
    from storage import arrays as A

    out = {}
    for spec in plan.stages():
        path = store.path(spec.folder, spec.key)
        if spec.folder == "models":
            out[spec.key] = (path / "weights.pt").read_bytes()
        elif spec.folder == "constructed":
            out[spec.key] = {k: v.tobytes() for k, v in A.read_rows(path).items()}
        elif spec.folder == "evals":  # the metrics of before the reshape (later records, e.g. confusion, aside)
            metrics = store.manifest(spec.folder, spec.key)["metrics"]
            out[spec.key] = {k: v for k, v in metrics.items() if k in EVAL_METRICS}
        elif spec.folder == "runs":
            out[spec.key] = (path / "table.csv").read_text()
    return out


@pytest.mark.slow
def test_the_flow_and_the_bare_executors_compute_the_same_bytes(first, tiny_tar, tmp_path):
    """The first run (the flow) and the executors alone without Prefect: every artifact
    byte-identical; each non-sharded stage submitted once; the progress and report artifacts
    published."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterKey, TaskRunFilter,
                                                TaskRunFilterStartTime)

    from advfeatures.config import resolve
    from pipeline import kinds
    from pipeline.common import Context
    from pipeline.experiments import get
    from pipeline.stages import source_sha256
    from storage.store import Store

    store, out = first
    cfg = resolve("tiny", [], data=str(tiny_tar), store=str(tmp_path / "bare"))
    plan = get("replicate").plan(cfg, source_sha256(tiny_tar))
    bare = Store(cfg.runtime.store)
    assert kinds.run_all(bare, plan, Context(runtime=cfg.runtime, data=cfg.data, plan=plan, config=cfg)) == \
        plan.run.key == out["run_key"]
    a, b = _artifacts(bare, plan), _artifacts(Store(store), plan)
    assert a.keys() == b.keys() and len(a) == len([s for s in plan.stages() if s.stage != "dataset"])
    # compared within this run: no digest pinned on one CPU model (their rounding differs)
    assert [plan.labels()[k] for k in a if a[k] != b[k]] == []
    with get_client(sync_client=True) as client:
        runs = [r.name for r in client.read_task_runs(task_run_filter=TaskRunFilter(
            start_time=TaskRunFilterStartTime(after_=out["t0"], before_=out["t1"])), limit=200)]
        keys = [f"train-{plan.source.key}", f"pgd-{plan.constructs['rand'].key}", f"stages-{plan.run.key}",
                "replicate-report"]
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    assert 0 < len(runs) < 200  # all of them (the server returns at most 200)
    for spec in plan.stages():
        if spec.stage != "run" and not kinds.sharded(spec):
            assert sum(r.endswith(spec.key) for r in runs) == 1, (plan.labels()[spec.key], runs)
    # per epoch, shard and stage; and the report
    assert {(a.key, a.type) for a in arts} == {*((k, "progress") for k in keys[:3]), ("replicate-report", "markdown")}
    assert out["report"] == str(store / "runs" / plan.run.key / "report.html")
    assert "data:image/png;base64," in open(out["report"]).read()


@pytest.mark.slow
def test_a_sweep_runs_every_point_once_and_tabulates_them(first, tmp_path, tiny_tar):
    """Two points of attack.steps over rand only, in a store holding the first run's stages: the
    first point (the profile's 3 steps) is the first run's, found there; the second computes its
    set and student. The source is found for both points, and the long table has one row per
    (point, set, seed)."""
    import shutil

    from flows.replicate import sweep

    store = _seeded(first[0], tmp_path / "store")
    shutil.copytree(first[0] / "constructed", store / "constructed", ignore=shutil.ignore_patterns(".*"))
    out = sweep(experiment="replicate", profile="tiny", overrides=["construct.sets=[rand]"],
                sweeps=["attack.steps=3,1"], data=str(tiny_tar), store=str(store))
    table = pd.read_csv(f"{out['sweep_dir']}/sweep.csv")
    assert list(table["attack.steps"]) == [3, 3, 1, 1] and list(table["set"]) == ["D (source)", "rand"] * 2
    rand = next(t for t in first[1]["timings"] if t["stage"] == "construct" and t["what"] == "rand")
    assert table.loc[1, "construct_key"] == rand["key"]  # the first point: the first run's set
    assert table.loc[0, "model_key"] == table.loc[2, "model_key"]  # the source: one model for both points
    assert table.loc[1, "construct_key"] != table.loc[3, "construct_key"]
    assert len({p["run_dir"] for p in out["points"]}) == 2
    assert out["report"].endswith("report.html") and "alt='sweep'" in open(out["report"]).read()


@pytest.mark.slow
def test_serve_runs_the_replicate_deployment_on_dask_and_leaves_nothing_running(first, prefect_api, tiny_tar,
                                                                                tmp_path):
    """`advfeatures serve` against a running server: a run of the `replicate` deployment completes
    with its shards on a Dask LocalCluster, each shard its own Completed task run (one worker, a
    thread of the flow run's process: 26.6 s against 21.9 alone; test_dask kills worker
    processes); seed 1's student trained and evaluated on the cluster (dask.stages), seed 0's found in the
    store by a worker; the same bytes as the first run's threads; no flow or task run left Running;
    SIGTERM stops serve (exit 0) and leaves the server it did not start."""
    pytest.importorskip("distributed", reason="the dask extra is not installed")
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterParentFlowRunId, TaskRunFilter,
                                                TaskRunFilterFlowRunId)
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from storage import arrays as A

    root = Path(__file__).resolve().parent.parent
    store = _seeded(first[0], tmp_path / "store")
    # the runner asks for scheduled runs every second (Prefect's default, 10 s, left the run waiting
    # 0-10 s for its pickup; with run_deployment's 5-s poll, the test took 23-32 s)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "ADVFEATURES_HOME": str(root),
           "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "advfeatures"), "serve", "--limit", "1"], env=env,
                                cwd=root, stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(240):
            if "ready:" in log.read_text() or proc.poll() is not None:
                break
            time.sleep(0.5)
        assert "ready:" in log.read_text(), log.read_text()[-3000:]
        over = ["construct.sets=[det]", "runtime.threads=1", "report.write=false", "dask.stages=true",
                "runtime.stage_workers=2", "student.seeds=[0,1]", "dask.cluster_kwargs={n_workers: 1, processes: false}"]
        with temporary_settings({PREFECT_API_URL: prefect_api}):
            run = run_deployment("replicate/replicate", timeout=600, poll_interval=1, parameters={
                "profile": "tiny", "data": str(tiny_tar), "store": str(store), "overrides": over})
            assert run.state.is_completed(), (run.state, log.read_text()[-3000:])
            with get_client(sync_client=True) as client:
                subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
                tasks = client.read_task_runs(task_run_filter=TaskRunFilter(
                    flow_run_id=TaskRunFilterFlowRunId(any_=[run.id] + [f.id for f in subflows])))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, log.read_text()[-2000:]
    assert [r.name for r in [*tasks, *subflows] if r.state_type.value != "COMPLETED"] == []
    on_dask = sorted(r.state_name for r in tasks if r.name.startswith("student-"))
    assert on_dask == ["Cached", "Completed"], on_dask  # seed 0's found in the store by a worker, seed 1's trained
    (key,) = {t.name.split("-")[1] for t in tasks if t.name.startswith("shard-")}
    layout = A.stored_layout(store / "constructed" / key)
    shards = sorted(t.name for t in tasks if t.name.startswith("shard-"))
    assert shards == sorted(f"shard-{key}-{i}" for i in range(layout.num_shards)), shards  # one task run per shard
    got, want = A.read_rows(store / "constructed" / key), A.read_rows(first[0] / "constructed" / key)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert "written by Dask worker" in log.read_text()


def test_deleted_artifact_is_recomputed(first, tiny_tar):
    """The store is the only truth: an artifact deleted behind the flow's back is computed again."""
    import shutil

    store, out = first
    student = next(t for t in out["timings"] if t["stage"] == "student")
    shutil.rmtree(store / "models" / student["key"])
    shutil.rmtree(store / "runs" / out["run_key"])
    again = replicate(profile="tiny", overrides=["report.write=false"], data=str(tiny_tar), store=str(store))
    computed = {(t["stage"], t["key"]) for t in again["timings"] if t["computed"]}
    assert computed == {("student", student["key"]), ("run", out["run_key"])}
    assert (store / "models" / student["key"] / "weights.pt").is_file()
    assert (store / "runs" / out["run_key"] / "table.parquet").is_file()
