"""Two replicate runs of one config at once, on a local path and on a URL store: each stage
computed once. Its own module, so that pytest-xdist (`--dist loadfile`) can run it beside
test_flow, the heaviest module."""

import pytest

pytest.importorskip("prefect")

from flows.replicate import replicate  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def harness(prefect_api):
    """The flows of this module run against the process's temporary Prefect server (conftest)."""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["path", "url"])
def test_two_concurrent_runs_compute_each_stage_once(kind, tiny_tar, tmp_path, monkeypatch):
    """Two replicate runs of one config at once: every model is trained once, every shard written
    once (the second run waits on the stage's lock and reuses the result), arrays correct. With a
    local path the lock is the store's flock; with a URL store (file:// through fsspec) it is a
    Prefect global concurrency limit per artifact. A model's training goes on only once both runs
    have asked for its lock, so each model is contended, whatever the machine's load."""
    import contextlib
    import threading
    from collections import Counter

    from pipeline.stages import model as SM
    from pipeline.stages import student as SS
    from storage import arrays as A
    from storage.store import Store

    trained, written, asked, guard = Counter(), Counter(), Counter(), threading.Condition()
    fit_and_save, write_shard, store_lock = SM.fit_and_save, A.write_shard, Store.lock

    @contextlib.contextmanager
    def counting_lock(self, folder, key):
        with guard:
            asked[key] += 1
            guard.notify_all()
        with store_lock(self, folder, key):
            yield

    def counting_fit(store, spec, *a, **k):
        with guard:
            trained[spec.key] += 1
            both = guard.wait_for(lambda: asked[spec.key] >= 2, timeout=300)
        assert both, f"the other run never asked for the lock of {spec.key}"
        return fit_and_save(store, spec, *a, **k)

    def counting_write(path, layout, i, *a, **k):
        with guard:
            written[(str(path), i)] += 1
        return write_shard(path, layout, i, *a, **k)

    monkeypatch.setattr(Store, "lock", counting_lock)
    monkeypatch.setattr(SM, "fit_and_save", counting_fit)
    monkeypatch.setattr(SS, "fit_and_save", counting_fit)
    monkeypatch.setattr(A, "write_shard", counting_write)
    store = tmp_path / "shared" if kind == "path" else f"file://{tmp_path}/shared"
    locked = Counter()
    if kind == "url":  # count the Prefect concurrency-limit locks the URL store takes
        import tasks.stages  # noqa: F401 - installs Store.remote_lock

        prefect_lock = Store.remote_lock

        def counting_remote_lock(name):
            with guard:
                locked[name] += 1
            return prefect_lock(name)

        monkeypatch.setattr(Store, "remote_lock", counting_remote_lock)
    # the reports of two runs written into one run folder at once: with a path (with a URL: tables only)
    # one set (det: the source, the set's shards, its student): each contended lock is a wait, on a
    # URL store a Prefect lock's retry; det and errors took 22 s with the URL store (measured)
    over = ["construct.sets=[det]"] + (["report.write=false"] if kind == "url" else [])
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
    assert trained and set(trained.values()) == {1}  # the source and det's student: once each
    assert len(trained) == 2
    pgd_shards = [k for k in written if "constructed" in k[0]]
    assert written and set(written.values()) == {1} and len(pgd_shards) == 3  # det's 3 shards
    from pipeline import stages as stages_mod

    key = next(t["key"] for t in results[0]["timings"] if t["stage"] == "construct" and t["what"] == "det")
    assert stages_mod.verify(Store(store), key) == []
    if kind == "url":
        assert not (tmp_path / "shared" / ".locks").exists()
        assert all(locked[f"models-{k}"] == 2 for k in trained)  # both runs asked Prefect's lock of every model
