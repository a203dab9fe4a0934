"""The `replicate` flow end to end under prefect_test_harness, on a tiny synthetic dataset."""

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("prefect")
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.cli import main as cli_main  # noqa: E402
from flows.replicate import replicate  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def first(tmp_path_factory, tiny_tar):
    store = tmp_path_factory.mktemp("store")
    out = replicate(profile="tiny", data=str(tiny_tar), store=str(store))
    return store, out


def _manifest_mtimes(store):
    return {p.relative_to(store).as_posix(): p.stat().st_mtime_ns for p in store.rglob("manifest.json")}


def test_first_run_writes_the_table(first):
    store, out = first
    run_dir = store / "runs" / out["run_key"]
    assert str(run_dir) == out["run_dir"]
    csv = pd.read_csv(run_dir / "table.csv")
    pq = pd.read_parquet(run_dir / "table.parquet")
    assert list(csv["set"]) == ["D (source)", "teacher (errors)", "rand", "other", "det", "errors"]
    assert len(pq) == 6 and list(pq.columns) == list(csv.columns)
    for col in ("acc_xy_%", "acc_xy+1_%", "attack_success_%", "source_acc_%", "model_key", "construct_key"):
        assert col in csv.columns
    assert ((csv["acc_xy_%"] >= 0) & (csv["acc_xy_%"] <= 100)).all()
    pgd_rows = csv[csv["set"].isin(["rand", "other", "det"])]
    assert pgd_rows["attack_success_%"].between(0, 100).all()
    assert (csv["n_train"].iloc[2:5] == 120).all()
    assert csv.loc[0, "acc_xy_%"] > 50  # the synthetic classes are easy: the source learns them
    md = (run_dir / "table.md").read_text()
    assert "| det" in md and "acc_xy+1_%" in md
    # source, teacher and the 4 students: six different initial weights, and the table says so
    assert csv["init"].nunique() == 6 and "all 6 models start from different weights" in md
    rand = csv[csv["set"] == "rand"].iloc[0]
    assert 0 <= rand["attack_success_t≠y_%"] <= 100
    assert all(t["computed"] for t in out["timings"])


def test_table_artifact_published(first):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["replicate-table"])))
    assert arts and arts[0].type == "table"
    assert "det" in str(arts[0].data)


def test_second_run_computes_nothing(first, tiny_tar, monkeypatch):
    store, out = first
    import advfeatures.construct as C
    from pipeline.sets import errors as SC
    from pipeline.stages import dataset as SD
    from pipeline.stages import evaluation as SE
    from pipeline.stages import model as SM

    def boom(*a, **k):
        raise AssertionError("a cached stage was recomputed")

    for mod, name in ((SM, "fit"), (SE, "predict"), (SC, "predict"), (C, "pgd"), (SD.D, "read_source")):
        monkeypatch.setattr(mod, name, boom)
    before = _manifest_mtimes(store)
    again = replicate(profile="tiny", data=str(tiny_tar), store=str(store))
    assert again["run_key"] == out["run_key"]
    assert _manifest_mtimes(store) == before
    assert not any(t["computed"] for t in again["timings"])


def _computed(out):
    return sorted((t["stage"], t["what"]) for t in out["timings"] if t["computed"])


def test_student_change_recomputes_only_students(first, tiny_tar):
    store, _ = first
    out = replicate(profile="tiny", overrides=["student.train.epochs=2"], data=str(tiny_tar), store=str(store))
    stages = {s for s, _ in _computed(out)}
    assert stages == {"student", "eval", "run"}
    assert sum(1 for s, _ in _computed(out) if s == "student") == 4


def test_attack_change_recomputes_generation_not_source(first, tiny_tar):
    store, _ = first
    out = replicate(profile="tiny", overrides=["attack.steps=2"], data=str(tiny_tar), store=str(store))
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


def test_cli_show_config_prints_every_key(tiny_tar, capsys):
    assert cli_main(["show-config", "--profile", "tiny", "--data", str(tiny_tar)]) == 0
    text = capsys.readouterr().out
    for stage in ("dataset", "model", "construct", "student", "run"):
        assert f"\n{stage} " in text
    assert "attack:" in text and "steps: 3" in text


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    assert cli_main(["run", "--profile", "tiny", "--set", "attack.eps=-1"]) == 2
    assert "attack.eps must be >= 0" in capsys.readouterr().err
    assert cli_main(["run", "--profile", "tiny", "--data", str(tmp_path / "missing.zip")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_paper_profile_runs_on_tiny_data(tiny_tar, tmp_path):
    """The paper's architectures and recipes, with epochs, steps and sizes shrunk to CPU seconds."""
    shrink = ["source.train.epochs=1", "source.train.batch_size=64", "attack.steps=1",
              "construct.n_images=20", "construct.shard_size=10", "construct.chunk_size=10",
              "student.train.epochs=1", "student.train.batch_size=64", "teacher.train.epochs=1",
              "runtime.device=cpu", "runtime.attack_batch_size=20"]
    out = replicate(profile="paper", overrides=shrink, data=str(tiny_tar), store=str(tmp_path))
    df = pd.read_parquet(tmp_path / "runs" / out["run_key"] / "table.parquet")
    # errors: Wallace's ResNet-18 student beside the ResNet-50 study (student.per_set.errors.arch)
    assert list(df["model"]) == ["resnet50", "resnet18", "resnet50", "resnet50", "resnet50", "resnet18"]
    assert list(df["paper_%"].iloc[[0, 2, 4, 5]]) == [95.3, 63.3, 43.7, 49.7]
    assert np.isnan(df["paper_%"].iloc[3])  # no D_other in the paper


def test_parallel_shard_workers_give_identical_sets(tiny_tar, tmp_path):
    """Shards run by 3 concurrent workers give the same bytes as one worker, shard by shard."""
    from storage import arrays as A

    rows = {}
    for workers in (1, 3):
        store = tmp_path / f"w{workers}"
        over = ["construct.sets=[det]", "runtime.threads=1", f"runtime.shard_workers={workers}"]
        out = replicate(profile="tiny", overrides=over, data=str(tiny_tar), store=str(store))
        key = next(t["key"] for t in out["timings"] if t["stage"] == "construct")
        rows[workers] = A.read_rows(store / "constructed" / key)
    assert all(np.array_equal(rows[1][k], rows[3][k]) for k in rows[1])


@pytest.mark.parametrize("kind", ["path", "url"])
def test_two_concurrent_runs_compute_each_stage_once(kind, tiny_tar, tmp_path, monkeypatch):
    """Two replicate runs of one config at once: every model is trained once, every shard written
    once (the second run waits on the stage's lock and reuses the result), arrays correct. With a
    local path the lock is the store's flock; with a URL store (file:// through fsspec) it is a
    Prefect global concurrency limit per artifact."""
    import threading
    import time
    from collections import Counter

    from pipeline.stages import model as SM
    from pipeline.stages import student as SS
    from storage import arrays as A

    trained, written, guard = Counter(), Counter(), threading.Lock()
    fit_and_save, write_shard = SM.fit_and_save, A.write_shard

    def counting_fit(store, spec, *a, **k):
        with guard:
            trained[spec.key] += 1
        time.sleep(3)  # hold the stage long enough that the other run surely arrives meanwhile
        return fit_and_save(store, spec, *a, **k)

    def counting_write(path, layout, i, *a, **k):
        with guard:
            written[(str(path), i)] += 1
        return write_shard(path, layout, i, *a, **k)

    monkeypatch.setattr(SM, "fit_and_save", counting_fit)
    monkeypatch.setattr(SS, "fit_and_save", counting_fit)
    monkeypatch.setattr(A, "write_shard", counting_write)
    store = tmp_path / "shared" if kind == "path" else f"file://{tmp_path}/shared"
    locked = Counter()
    if kind == "url":  # count the Prefect concurrency-limit locks the URL store takes
        import tasks.stages  # noqa: F401 - installs Store.remote_lock
        from storage.store import Store

        prefect_lock = Store.remote_lock

        def counting_lock(name):
            with guard:
                locked[name] += 1
            return prefect_lock(name)

        monkeypatch.setattr(Store, "remote_lock", counting_lock)
    over = ["construct.sets=[det, errors]"]
    results, errors = [], []

    def run():
        try:
            results.append(replicate(profile="tiny", overrides=over, data=str(tiny_tar), store=str(store)))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert len(results) == 2 and results[0]["run_key"] == results[1]["run_key"]
    assert trained and set(trained.values()) == {1}  # source, teacher, 2 students: once each
    assert len(trained) == 4
    pgd_shards = [k for k in written if "constructed" in k[0]]
    assert written and set(written.values()) == {1} and len(pgd_shards) == 3 + 1  # det 3 shards, errors 1
    from pipeline import stages as stages_mod
    from storage.store import Store

    key = next(t["key"] for t in results[0]["timings"] if t["stage"] == "construct" and t["what"] == "det")
    assert stages_mod.verify(Store(store), key) == []
    if kind == "url":
        assert not (tmp_path / "shared" / ".locks").exists()
        assert all(f"models-{k}" in locked for k in trained)  # every model trained under Prefect's lock


def test_deleted_artifact_is_recomputed_despite_prefect_cache(first, tiny_tar):
    import shutil

    store, out = first
    again = replicate(profile="tiny", data=str(tiny_tar), store=str(store))  # records exist now
    student = next(t for t in again["timings"] if t["stage"] == "student")
    shutil.rmtree(store / "models" / student["key"])
    shutil.rmtree(store / "runs" / out["run_key"])
    third = replicate(profile="tiny", data=str(tiny_tar), store=str(store))
    computed = {(t["stage"], t["key"]) for t in third["timings"] if t["computed"]}
    assert ("student", student["key"]) in computed
    assert (store / "models" / student["key"] / "weights.pt").is_file()
    assert (store / "runs" / out["run_key"] / "table.parquet").is_file()
