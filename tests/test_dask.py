"""fanout.executor=dask on real processes: a LocalCluster of worker processes on 127.0.0.1 (and
dask-jobqueue's local "batch" cluster). A worker SIGKILLed mid-shard, workers killed at random
through a 50-shard set, and KilledWorker with allowed-failures 0; every set is compared row by row
with the same set generated in this process without interruption."""

import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import build

distributed = pytest.importorskip("distributed", reason="the dask extra (pip install -e '.[dask]') is not installed")

from advfeatures.config import resolve  # noqa: E402
from flows import dask_shards  # noqa: E402
from pipeline import dask_cluster, stages  # noqa: E402
from pipeline.orchestration import DaskConfig, FanoutConfig  # noqa: E402
from storage import arrays as A  # noqa: E402

# a set of 150 rows in 3 shards, or of 200 rows in 50 shards (the chaos run)
SMALL = ["construct.sets=[rand]", "construct.n_images=150", "source.train.epochs=1", "runtime.threads=1"]
MANY = ["construct.sets=[rand]", "construct.n_images=200", "construct.shard_size=4", "construct.chunk_size=4",
        "source.train.epochs=1", "runtime.threads=1"]


def park_once(flag_dir: str) -> None:
    """Run on every worker (``client.run``): the first zarr write of a shard by the first worker to
    claim ``flag_dir/parked`` records (pid, shard row) there and sleeps, so the test can SIGKILL it
    mid-shard. Workers restarted by their nanny do not have the hook."""
    import zarr

    orig = zarr.Array.__setitem__

    def setitem(self, key, value):
        orig(self, key, value)
        if getattr(setitem, "fired", False):
            return
        try:
            fd = os.open(os.path.join(flag_dir, "parked"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            setitem.fired = True
            return
        row = key.start if isinstance(key, slice) else (key[0].start if isinstance(key, tuple) else 0)
        os.write(fd, f"{os.getpid()} {row}".encode())
        os.close(fd)
        setitem.fired = True
        time.sleep(120)

    zarr.Array.__setitem__ = setitem


def _wait_parked(flag_dir: Path, timeout: float = 120.0) -> tuple[int, int]:
    end = time.monotonic() + timeout
    f = flag_dir / "parked"
    while time.monotonic() < end:
        if f.exists() and f.read_text().strip():
            pid, row = map(int, f.read_text().split())
            return pid, row
        time.sleep(0.1)
    raise AssertionError("no worker parked mid-shard")


def _set(tmp, tar, overrides, name):
    cfg, st, plan = build(tar, tmp / name, overrides)
    return cfg, st, plan.constructs["rand"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_tar):
    """The 3-shard set generated in this process without interruption: (store, rows)."""
    cfg, st, spec = _set(tmp_path_factory.mktemp("ref"), tiny_tar, SMALL, "store")
    stages.generate(st, spec, cfg.runtime)
    return st, A.read_rows(st.path("constructed", spec.key))


def _cluster(n=2, **kw):
    return distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                                    host="127.0.0.1", **kw)


def _same(got, want):
    return all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_workers_killed_mid_shard_and_at_random_the_set_completes_identically(tmp_path, tiny_tar):
    """A 50-shard set on 2 worker processes: the worker writing the first shard is SIGKILLed
    mid-shard (its rows started, no marker), then busy workers at random every ~1.5 s (3 times);
    nannies restart them. The first kill is logged at once naming the shard, which is rerun on
    another worker; every shard's marker once, every row equal to the set generated in this process
    without interruption."""
    cfg, st, spec = _set(tmp_path, tiny_tar, MANY, "chaos")
    ref_cfg, ref, ref_spec = _set(tmp_path, tiny_tar, MANY, "clean")
    assert ref_spec.key == spec.key
    stages.generate(ref, ref_spec, ref_cfg.runtime)
    want = A.read_rows(ref.path("constructed", spec.key))
    pending = stages.prepare_construct(st, spec)
    assert len(pending) == 50
    flag = tmp_path / "flag"
    flag.mkdir()
    path = st.path("constructed", spec.key)
    rng = random.Random(0)
    killed, lines = [], []
    with _cluster() as cluster, distributed.Client(cluster) as client:
        client.wait_for_workers(2)
        client.run(park_once, str(flag))
        box: dict = {}
        t = threading.Thread(target=lambda: box.update(out=dask_shards.run_shards(
            spec, str(st.root), cfg.runtime, FanoutConfig(executor="dask", retries=3), DaskConfig(), pending,
            client=client, log=lines.append)))
        t.start()
        pid, row = _wait_parked(flag)
        parked = row // 4
        assert not A.shard_done(path, parked)  # mid-shard: rows started, no marker
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        while t.is_alive() and len(killed) < 4:
            time.sleep(rng.uniform(1.0, 2.0))
            busy = [w for w, keys in client.processing().items() if keys]
            if not busy:
                continue
            # a worker killed a moment ago may still be listed: its answer is an error, not a pid
            pids = client.run(os.getpid, workers=[rng.choice(busy)], on_error="return")
            for p in pids.values():
                if isinstance(p, int):
                    os.kill(p, signal.SIGKILL)
                    killed.append(p)
        t.join(timeout=600)
        assert not t.is_alive()
        # the scheduler's event topic is left once the set is done (a subscribed client's close logs CRITICAL)
        assert client not in dask_cluster._LISTENING
    print(f"chaos: {len(killed)} workers killed")
    out = box["out"]
    assert sorted(out) == list(range(50))
    assert any("lost while holding" in line and f"{parked}" in line for line in lines), lines  # logged at once
    assert out[parked]["lost_workers"] and out[parked]["pid"] != pid  # rerun by another worker
    stages.finalize_construct(st, spec)
    markers = sorted((A.open_root(path) / A.SHARDS_DIR).iterdir())
    assert len(markers) == 50  # one per shard; a marker half-written by a killed worker removed
    assert _same(A.read_rows(path), want)
    assert stages.verify(st, spec.key) == []


@pytest.mark.slow
def test_killed_worker_with_no_failures_allowed_names_the_shard(tmp_path, tiny_tar):
    cfg, st, spec = _set(tmp_path, tiny_tar, SMALL, "store")
    flag = tmp_path / "flag"
    flag.mkdir()
    pending = stages.prepare_construct(st, spec)
    import dask

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = _cluster()
    with cluster, distributed.Client(cluster) as client:
        client.run(park_once, str(flag))
        box: dict = {}

        def go():
            try:
                dask_shards.run_shards(spec, str(st.root), cfg.runtime, FanoutConfig(executor="dask", retries=0),
                                       DaskConfig(allowed_failures=0), pending, client=client)
            except Exception as e:  # noqa: BLE001 - the test looks at it
                box["error"] = e

        t = threading.Thread(target=go)
        t.start()
        pid, row = _wait_parked(flag)
        os.kill(pid, signal.SIGKILL)
        t.join(timeout=300)
    err = str(box.get("error"))
    # the parked shard, or one queued behind it on the killed worker (Dask fails every task it held,
    # in no fixed order: seen under load)
    named = re.search(rf"shard (\d+) of set {spec.key}", err)
    assert named and int(named.group(1)) in pending and "KilledWorker" in err and "fanout.retries=0" in err, err
    assert not st.is_complete("constructed", spec.key)


def test_settings_are_checked_before_any_work(tiny_tar):
    from advfeatures.config import ConfigError

    for bad, words in ((["fanout.executor=dusk"], "choose local or dask"),
                       (["fanout.executor=deployment"], "was removed; use fanout.executor=dask"),
                       (["fanout.per_run=2"], "fanout.per_run was removed"),
                       (["dask.address=localhost:8786"], "tcp://host:8786"),
                       (["dask.scale=2", "dask.adapt={maximum: 4}"], "exclude each other"),
                       (["dask.resources={GPU: 0}"], "positive number"),
                       (["dask.cluster=LocalCluster"], "dotted path")):
        with pytest.raises(ConfigError, match=words):
            resolve("tiny", bad, data=str(tiny_tar))
    with pytest.raises(ConfigError, match="has no class NoSuchCluster"):
        dask_cluster.cluster_class("distributed.NoSuchCluster")
    import importlib.util

    if importlib.util.find_spec("dask_kubernetes") is None:
        with pytest.raises(ConfigError, match="pip install dask-kubernetes"):
            dask_cluster.cluster_class("dask_kubernetes.operator.KubeCluster")


def test_local_cluster_defaults_split_threads():
    from advfeatures.config import RuntimeConfig

    rt = RuntimeConfig(shard_workers=2)
    kw = dask_cluster.cluster_kwargs(DaskConfig(resources={"GPU": 1}), rt, distributed.LocalCluster)
    assert kw["n_workers"] == 2 and kw["threads_per_worker"] == 1 and kw["resources"] == {"GPU": 1}
    assert dask_cluster.worker_runtime(DaskConfig(), rt).threads >= 1
    assert dask_cluster.worker_runtime(DaskConfig(address="tcp://h:8786"), rt).threads == 0
    assert dask_cluster.worker_runtime(DaskConfig(), RuntimeConfig(shard_workers=2, threads=3)).threads == 3
    # the run's Prefect API goes to worker processes; threads share the run's process (LocalCluster's
    # in-process workers take no `env`: a run with processes: false and a server failed)
    api = "http://127.0.0.1:4200/api"
    assert dask_cluster.cluster_kwargs(DaskConfig(), rt, distributed.LocalCluster, api)["env"] == {"PREFECT_API_URL": api}
    threads = dask_cluster.cluster_kwargs(DaskConfig(cluster_kwargs={"processes": False}), rt, distributed.LocalCluster,
                                          api)
    assert "env" not in threads
    with distributed.LocalCluster(**{**threads, "n_workers": 1}) as cluster, distributed.Client(cluster) as client:
        assert client.submit(os.getpid).result() == os.getpid()


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_example_settings_resolve(tiny_tar):
    from advfeatures.config import settings_overrides

    for name in ("laptop", "gpu-box", "slurm", "kubernetes"):
        cfg = resolve("tiny", settings_overrides(str(EXAMPLES / f"{name}.yaml")), data=str(tiny_tar))
        assert cfg.fanout.executor == "dask", name
    assert resolve("tiny", settings_overrides(str(EXAMPLES / "slurm.yaml"))).dask.resources == {"GPU": 1}


def test_cli_settings_file(tiny_tar, tmp_path, capsys):
    """--settings FILE: the file's settings after the profile, --set after them; a bad file is named."""
    from flows.cli import main

    code = main(["show-config", "--profile", "tiny", "--data", str(tiny_tar), "--settings", str(EXAMPLES / "slurm.yaml"),
                 "--set", "dask.adapt={minimum: 0, maximum: 2}"])
    out = capsys.readouterr().out
    assert code == 0 and "dask_jobqueue.SLURMCluster" in out and "maximum: 2" in out and "--gres=gpu:1" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    assert main(["show-config", "--profile", "tiny", "--settings", str(bad)]) == 2
    assert "must be a YAML mapping" in capsys.readouterr().err
    assert main(["show-config", "--profile", "tiny", "--settings", str(tmp_path / "none.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_slurm_example_job_script():
    """The SLURM example's job script: one GPU per job, the worker holding GPU=1, retiring before
    the walltime (lifetime 225 min + stagger 10 min < 4 h)."""
    pytest.importorskip("dask_jobqueue")
    from advfeatures.config import settings_overrides

    cfg = resolve("tiny", settings_overrides(str(EXAMPLES / "slurm.yaml")))
    cls = dask_cluster.cluster_class(cfg.dask.cluster)
    with cls(**dask_cluster.cluster_kwargs(cfg.dask, cfg.runtime, cls)) as cluster:
        script = cluster.job_script()
    for line in ("#SBATCH --gres=gpu:1", "#SBATCH -t 04:00:00", "#SBATCH -p gpu", "#SBATCH -A my-project",
                 "--resources GPU=1", "--lifetime 225m", "--lifetime-stagger 10m",
                 "source /shared/advfeatures/.venv/bin/activate"):
        assert line in script, (line, script)


@pytest.mark.slow
def test_jobqueue_local_cluster_runs_the_set(tmp_path, tiny_tar, reference):
    """dask-jobqueue's local cluster (each "job" a subprocess running its job script): one job, a
    worker with GPU=1, shards asking for GPU=1; the cluster is started from the settings, as a run
    does, and closed by close_all. (One job: each is an interpreter importing torch; test_dask's kill
    test has two workers.)"""
    pytest.importorskip("dask_jobqueue")
    cfg, st, spec = _set(tmp_path, tiny_tar, SMALL, "store")
    dc = DaskConfig(cluster="dask_jobqueue.local.LocalCluster", scale=1, resources={"GPU": 1},
                    cluster_kwargs={"cores": 1, "memory": "2GB", "processes": 1,
                                    "worker_extra_args": ["--resources", "GPU=1"]})
    pending = stages.prepare_construct(st, spec)
    try:
        out = dask_shards.run_shards(spec, str(st.root), cfg.runtime, FanoutConfig(executor="dask"), dc, pending)
    finally:
        dask_cluster.close_all()
    assert sorted(out) == [0, 1, 2] and len({o["pid"] for o in out.values()}) == 1
    stages.finalize_construct(st, spec)
    assert _same(A.read_rows(st.path("constructed", spec.key)), reference[1])


def _mmapped_on_reuse() -> int:
    """How many blocks glibc serves by mmap for a 2-MiB buffer allocated, freed and allocated
    again: 1 while its mmap threshold is frozen at 128 KiB (what a nanny's MALLOC_TRIM_THRESHOLD_
    does: every large tensor of a PGD step mmap'ed and unmapped), 0 once it is raised."""
    import ctypes

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    held = 0
    for _ in range(2):
        before = libc.mallinfo2().hblks
        p = libc.malloc(2 << 20)
        held = libc.mallinfo2().hblks - before
        libc.free(p)
    return held


@pytest.mark.slow
def test_shards_no_worker_can_take_time_out_then_run_and_undo_the_nannys_malloc_setting(tmp_path, tiny_tar):
    """One worker process. Shards asking for a resource no worker has never start: fanout.timeout
    fails the set, naming them. The same shards without it then run there. A nanny's worker starts
    with glibc's mmap threshold frozen (PGD 2.2x slower, measured); the first shard a worker runs
    raises it (tasks.remote.tune_malloc)."""
    cfg, st, spec = _set(tmp_path, tiny_tar, SMALL, "store")
    pending = stages.prepare_construct(st, spec)
    with _cluster(1) as cluster, distributed.Client(cluster) as client:
        with pytest.raises(TimeoutError, match=r"shards 0, 1, 2 not done after fanout.timeout=2 s"):
            dask_shards.run_shards(spec, str(st.root), cfg.runtime, FanoutConfig(executor="dask", timeout=2),
                                   DaskConfig(resources={"GPU": 1}), pending, client=client)
        for _ in range(100):  # the cancelled shards forgotten by the scheduler, their keys free again
            if not client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)):
                break
            time.sleep(0.1)
        try:
            before = set(client.run(_mmapped_on_reuse).values())
        except (OSError, AttributeError):  # not glibc, or glibc < 2.33 (no mallinfo2): nothing to check
            before = None
        out = dask_shards.run_shards(spec, str(st.root), cfg.runtime, FanoutConfig(executor="dask"), DaskConfig(),
                                     pending, client=client)
        assert sorted(out) == [0, 1, 2]
        if before == {1}:  # else this Dask/glibc does not freeze the mmap threshold (a reused 2-MiB block)
            assert set(client.run(_mmapped_on_reuse).values()) == {0}


