"""Parallel shard workers: the same PGD set generated with 1 and with 2 shard workers on this
machine; prints the speed-up and the orchestration overhead per shard (the wall time one worker
spent per shard, wall x workers / shards, minus the PGD seconds recorded in the shard markers:
process start, imports, loading, Zarr writes, markers, Prefect bookkeeping and polling).

    python benchmarks/bench_workers.py [--mode processes|dask|threads|bare ...] [--shards 10] [--shard-size 1000]
                                       [--steps 45] [--workers 1 2] [--shards-per-run 0 [1 ...]]
                                       [--worker event [stock]] [--repeat R]

--mode processes (default): real Prefect process workers. For each worker count W a fresh local
Prefect server is started (its own PREFECT_HOME under a temp dir, a free port), the `advfeatures`
work pool and prefect.yaml's deployments are registered (flows.serve.deploy) and W shard workers
(`advfeatures worker --work-queue shards --limit 1`, flows/worker.py, separate OS processes; with
``--worker stock`` as well, stock `prefect worker start` ones polling every 5 s, the peer that
takes runs on its polls only) are started and waited for until online. A child of this script (with
PREFECT_API_URL pointing at that server) ingests the data and trains the source model outside the
timing, then times the generate-set subflow with fanout.executor=deployment: the shards go
as flow runs of the `generate-shard` deployment (``--shards-per-run`` per run; 0 = auto, one run
per online worker; several values: one measurement each, e.g. ``0 1`` for batched against one run
per shard), each of which a worker runs in a new `python -m prefect.engine` process. The server and
the workers are stopped afterwards (also on errors). Besides the timing it prints, per worker
count, the mean shard seconds from the markers, the distinct pids in the markers (one per flow run,
since a process worker starts a process per flow run, so fewer than shards when runs are batched),
how many distinct workers ran them (read from the workers' logs, which carry their flow runs'
logs), which must equal W (a WARNING otherwise), and where a run's fixed cost goes: "start", the
mean seconds from the set's start to each worker's first shard computing (submission, pickup by a
worker, process start, imports), and "end", from the last marker to the set sealed.

--mode dask: W Dask worker processes of a LocalCluster on this machine (fanout.executor=dask, one
thread each), started, and warmed up by importing the shard code, before the timing (a cluster's
workers are long-lived; a process worker starts a process per flow run, which the timing includes);
the shard tasks are submitted by this process, whose Prefect is the ephemeral server. ``--mode
processes dask`` measures both in one run, and prints the ratio of their overheads.

--mode bare: the machine's own ceiling, the peer of the others. W plain Python processes, each
running its share of the shards' PGD (a shard's own attack code, ``construct.attack_block``, with
the same images per shard, steps, batches and memory format, one torch thread) on random weights
and images: no store, no Prefect, no Dask. Its speed-up is
what W cores give this computation when nothing orchestrates it; ``--mode bare dask processes``
prints each executor's speed-up as a fraction of it.

--mode threads: W threads of this one process (runtime.shard_workers=W, the flow's task runner)
against Prefect's own ephemeral server (a PREFECT_API_URL in the shell is ignored); each shard is
the same code a remote worker runs.

Every worker gets one torch thread (runtime.threads=1), as one process worker per core would have.
The default configuration (10 shards x 1000 images x 45 steps, small_cnn: 10 shards per set, as the
demo and cpu profiles cut 50,000 images into shards of 5,000) is the CPU-bound case of the goal:
18-29 s shards on a 2-core machine (Intel Xeon / AMD EPYC; ``--steps 75`` gives ~30 s on the
Xeon), where the goal is >= 1.7x with 2 workers and overhead < 5% of shard time (shards >= 30 s).
With batches the fixed cost of a flow run (~5 s) is paid once per worker per set, so the overhead
per shard falls with the shards per worker: ``--shards 4`` (2 per worker) is the worst case.
Processes mode adds ~20 s per worker count of untimed setup (server, deploy, workers, training).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from advfeatures.synthetic import make_arrays, write_cifar_tar
from flows.serve import QUERY_SECONDS
from flows.supervise import descendants as _owners
from flows.supervise import started as _started

RESULT = "BENCH_RESULT "  # prefix of the JSON line a --_one child prints


def _config(a, tar: Path, store: Path, extra: list[str]):
    from advfeatures.config import resolve

    n = a.shards * a.shard_size
    chunk = math.gcd(a.shard_size, 250)  # 250 for the default; a shard is a whole number of chunks
    base = ["construct.sets=[rand]", f"construct.n_images={n}", f"construct.shard_size={a.shard_size}",
            f"construct.chunk_size={chunk}", f"attack.steps={a.steps}", "source.train.epochs=1",
            "student.train.epochs=1", "runtime.device=cpu", "runtime.attack_batch_size=250",
            "runtime.threads=1",  # one core per worker, as one process worker per core would have
            "runtime.amp=none"]  # fp32: the demo's bf16 is emulated (10x slower) on CPUs without AVX-512 BF16
    return resolve("demo", base + extra, data=str(tar), store=str(store))


def _measure(a, tar: Path, store: Path, extra: list[str]) -> dict:
    """Ingest and train the source (untimed), then time the generation subflow alone."""
    from flows.replicate import _generate, plan_for
    from pipeline import stages
    from storage.store import Store

    cfg = _config(a, tar, store, extra)
    plan = plan_for(cfg)
    stages.ingest(Store(store), cfg.data, plan.dataset)
    stages.train_model(Store(store), plan.source, cfg.runtime)
    spec = plan.constructs["rand"]
    t0, epoch0 = time.perf_counter(), time.time()
    _generate(spec, str(store), cfg.runtime, cfg.fanout, cfg.dask)  # the fan-out the extra settings chose
    wall = time.perf_counter() - t0
    shard_dir = store / "constructed" / spec.key / "_shards"
    return {"wall": wall, "epoch0": epoch0, "epoch1": epoch0 + wall,
            "markers": [json.loads(f.read_text()) for f in sorted(shard_dir.glob("*.json"))]}


def _threads(a, tmp: Path, tar: Path) -> tuple[dict, str]:
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["PREFECT_HOME"] = str(tmp / "prefect")  # its own ephemeral database
    os.environ.pop("PREFECT_API_URL", None)  # Prefect's ephemeral server, not one set in the shell
    from prefect import flow

    from benchmarks.common import machine

    flow(lambda: None, name="warm-up")()  # start the ephemeral Prefect server before timing
    results = {("-", w, k): _measure(a, tar, tmp / f"store-{w}-{k}", [f"runtime.shard_workers={w}"])
               for k in range(a.repeat) for w in (a.workers if k % 2 == 0 else a.workers[::-1])}
    return results, machine("cpu")


def _dask(a, tmp: Path, tar: Path) -> tuple[dict, str]:
    """W Dask worker processes (a LocalCluster started and warmed up outside the timing)."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["PREFECT_HOME"] = str(tmp / "prefect-dask")
    os.environ.pop("PREFECT_API_URL", None)
    from prefect import flow

    from benchmarks.common import machine
    from flows import dask_shards

    flow(lambda: None, name="warm-up")()
    results = {}
    for k in range(a.repeat):
        for w in (a.workers if k % 2 == 0 else a.workers[::-1]):
            extra = ["fanout.executor=dask", f"runtime.shard_workers={w}"]
            cfg = _config(a, tar, tmp / "probe", extra)
            client = dask_shards.client_for(cfg.dask, cfg.runtime)  # started here: untimed
            client.wait_for_workers(w)
            from tasks.remote import warm

            client.run(warm)  # workers import the shard code (torch, zarr, the stage kinds) once
            try:
                results[("dask", w, k)] = _measure(a, tar, tmp / f"store-dask-{w}-{k}", extra)
            finally:
                dask_shards.close_all()
    return results, machine("cpu")


def _one(a) -> int:
    """Child of --mode processes: one measurement against the server at PREFECT_API_URL (set by the
    parent before this process imported Prefect, so Prefect's settings see it)."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from prefect import flow

    from benchmarks.common import machine

    flow(lambda: None, name="warm-up")()  # the client's first flow run, outside the timing
    r = _measure(a, Path(a.tar), Path(a.store), ["fanout.executor=deployment",
                                                 f"fanout.per_run={a.shards_per_run[0]}"])
    r["machine"] = machine("cpu")
    print(RESULT + json.dumps(r), flush=True)
    return 0


def _bare_child(a) -> int:
    """Child of --mode bare: ``a.bare`` shards' PGD in this process, nothing else; prints its seconds.
    The computation is a shard's own (``construct.attack_block``: channels_last, batches of 250, the
    records on the stored float16 images) on random weights and images, without reading or writing."""
    import numpy as np
    import torch

    from advfeatures.config import resolve
    from advfeatures.construct import attack_block
    from advfeatures.models import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = resolve("demo", [f"attack.steps={a.steps}", "runtime.amp=none"])
    model = build_model("small_cnn", 10, (0.5,) * 3, (0.25,) * 3).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (a.shard_size, 3, 32, 32), dtype=np.uint8)
    targets = rng.integers(0, 10, a.shard_size).astype(np.int64)

    def shard(n):
        return attack_block(model, images[:n], targets[:n], cfg.attack, batch_size=cfg.runtime.attack_batch_size,
                            channels_last=cfg.runtime.channels_last, store_dtype=cfg.construct.dtype)

    shard(8)  # warm-up
    print("ready", flush=True)
    sys.stdin.readline()  # every child starts at once, imports done
    start, t0 = time.time(), time.perf_counter()
    for _ in range(a.bare):
        shard(a.shard_size)
    print(RESULT + json.dumps({"seconds": time.perf_counter() - t0, "shards": a.bare, "start": start,
                               "end": time.time()}), flush=True)
    return 0


def _bare(a, tmp: Path, tar: Path) -> tuple[dict, str]:
    """W plain processes splitting the shards (the ceiling: no orchestration at all)."""
    from benchmarks.common import machine

    results = {}
    for k in range(a.repeat):
        for w in (a.workers if k % 2 == 0 else a.workers[::-1]):
            share = [a.shards // w + (i < a.shards % w) for i in range(w)]
            cmd = [sys.executable, str(Path(__file__).resolve()), "--shard-size", str(a.shard_size),
                   "--steps", str(a.steps)]
            procs = [subprocess.Popen(cmd + ["--_bare", str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}) for n in share if n]
            for p in procs:
                assert p.stdout.readline().strip() == "ready", "a --_bare child failed before its start"
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()
            outs = [json.loads(next(ln for ln in p.communicate()[0].splitlines() if ln.startswith(RESULT))[len(RESULT):])
                    for p in procs]
            # from the first child's first PGD step to the last child's end: imports are not timed, as a
            # warmed-up Dask worker's are not
            results[("bare", w, k)] = {"wall": max(o["end"] for o in outs) - min(o["start"] for o in outs), "per_shard": [
                o["seconds"] / o["shards"] for o in outs]}
    return results, machine("cpu")


def _print_bare(a, results: dict, mach: str) -> float | None:
    print(f"# {a.shards} shards x {a.shard_size} images x {a.steps} steps, small_cnn, W plain processes each "
          f"running its share of the shards' PGD (no store, no orchestrator): the ceiling; {mach}")
    print(f"{'workers':>7} {'try':>3} {'wall s':>8} {'PGD s/shard':>12}")
    for (_, w, k), r in results.items():
        print(f"{w:>7} {k + 1:>3} {r['wall']:>8.1f} {statistics.mean(r['per_shard']):>12.1f}")
    walls = {w: statistics.median(r["wall"] for (_, w_, _), r in results.items() if w_ == w)
             for w in dict.fromkeys(w for _, w, _ in results)}
    if 1 not in walls or len(walls) < 2:
        return None
    best = max(walls)
    print(f"# ceiling: speed-up {best} plain processes vs 1: {walls[1] / walls[best]:.2f}x "
          f"({best} cores running this PGD at once, nothing orchestrating)")
    return walls[1] / walls[best]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs: list[subprocess.Popen], grace: float = 20) -> None:
    """SIGINT to each process group, up to ``grace`` seconds for all of them to exit, then SIGKILL
    what is left, including any descendant in a session of its own (a worker's flow-run process)."""
    left = {pid: _started(pid) for pid in _owners([p.pid for p in procs])}
    for p in reversed(procs):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in reversed(procs):
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)
    for pid, started in left.items():
        if started is not None and _started(pid) == started:  # still that process, not a reused pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _online_workers(api: str, pool: str) -> int:
    req = urllib.request.Request(f"{api}/work_pools/{pool}/workers/filter", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return sum(1 for wk in json.loads(r.read()) if wk.get("status") == "ONLINE")


STOCK_QUERY_SECONDS = "5"  # how often stock workers poll here (serve's setting before flows.worker)


def _processes_one(a, w: int, spr: int, kind: str, k: int, tmp: Path, tar: Path) -> dict:
    from flows.serve import POOL, SHARD_QUEUE, _wait_healthy, deploy, worker_command

    home = tmp / f"prefect-{spr}-{kind}-{w}-{k}"
    query = os.environ.get("PREFECT_WORKER_QUERY_SECONDS", QUERY_SECONDS if kind == "event" else STOCK_QUERY_SECONDS)
    home.mkdir()
    api = f"http://127.0.0.1:{_free_port()}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "ADVFEATURES_HOME": str(ROOT),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": query}
    procs: list[subprocess.Popen] = []
    info: dict = {}

    def start(cmd: list[str], log: Path) -> subprocess.Popen:
        with open(log, "w") as f:
            procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        return procs[-1]

    try:
        t0 = time.perf_counter()
        port = api.rsplit(":", 1)[1].split("/")[0]
        server = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", port],
                       home / "server.log")
        try:
            _wait_healthy(api, server, timeout=180)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"{e}\n{_tail(home / 'server.log')}") from None
        info["server_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        deploy(env)
        info["deploy_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        cmd = worker_command(SHARD_QUEUE, limit=1) if kind == "event" else [
            sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process",
            "--work-queue", SHARD_QUEUE, "--limit", "1"]
        workers = [start(cmd, home / f"worker-{i}.log") for i in range(w)]
        while True:
            dead = [i for i, p in enumerate(workers) if p.poll() is not None]
            if dead:
                raise RuntimeError(f"shard worker {dead[0]} exited with code {workers[dead[0]].returncode}:\n"
                                   f"{_tail(home / f'worker-{dead[0]}.log')}")
            try:
                if _online_workers(api, POOL) >= w:
                    break
            except OSError:
                pass
            if time.perf_counter() - t0 > 180:
                raise TimeoutError(f"{w} shard workers not online after 180 s:\n{_tail(home / 'worker-0.log')}")
            time.sleep(0.5)
        info["workers_online_s"] = time.perf_counter() - t0
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_one", str(w), "--_tar", str(tar),
               "--_store", str(tmp / f"store-{spr}-{kind}-{w}-{k}"), "--shards", str(a.shards),
               "--shard-size", str(a.shard_size), "--steps", str(a.steps), "--shards-per-run", str(spr)]
        child = start(cmd, home / "bench.log")
        child.wait()
        out = _tail(home / "bench.log", 10**9)
        lines = [ln for ln in out.splitlines() if ln.startswith(RESULT)]
        if child.returncode or not lines:
            raise RuntimeError(f"the measurement with {w} workers failed (code {child.returncode}):\n{out[-4000:]}\n"
                               f"worker 0 log:\n{_tail(home / 'worker-0.log')}")
        r = json.loads(lines[-1][len(RESULT):])
        r["info"] = {**info, "query_s": query}
        r["logs"] = str(home)
        return r
    finally:
        _stop(procs)


SHARD_DONE = re.compile(r"Flow run 'shard-\w+-([\d+]+)' - Finished in state Completed")


def _worker_of_shard(logs: Path, w: int) -> dict[int, int]:
    """shard -> the shard worker that ran it: a process worker's log carries its flow runs' logs
    (a run of a batch is named shard-<set>-<i>+<j>+...)."""
    return {int(s): i for i in range(w)
            for m in SHARD_DONE.finditer(_tail(logs / f"worker-{i}.log", 10**9)) for s in m.group(1).split("+")}


def _processes(a, tmp: Path, tar: Path) -> tuple[dict, str]:
    results = {}
    for k in range(a.repeat):
        for spr, kind in [(spr, kind) for spr in a.shards_per_run for kind in a.worker]:
            for w in (a.workers if k % 2 == 0 else a.workers[::-1]):  # alternate the order: drift cancels
                r = results[(spr, kind), w, k] = _processes_one(a, w, spr, kind, k, tmp, tar)  # logs complete
                r["worker_of_shard"] = _worker_of_shard(Path(r["logs"]), w)
                i = r["info"]
                print(f"# shards_per_run={spr or 'auto'}, {w} {kind} process worker(s) polling every "
                      f"{i['query_s']} s, try {k + 1}: server healthy in "
                      f"{i['server_s']:.1f} s, deploy {i['deploy_s']:.1f} s, workers online in "
                      f"{i['workers_online_s']:.1f} s (untimed); logs in {r['logs']}", flush=True)
    return results, next(iter(results.values()))["machine"] if results else ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", "--executor", dest="mode", choices=["processes", "dask", "threads", "bare"], nargs="+",
                   default=["processes"],
                   help="shard workers as Prefect process workers of a local server, as Dask worker processes, "
                        "as threads of one process, or bare: plain processes with no orchestration (the "
                        "ceiling); several: one table each, in one run")
    p.add_argument("--shards", type=int, default=10)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--steps", type=int, default=45)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=1,
                   help="measure every configuration this many times, the worker counts in alternating order "
                        "(1 2, 2 1, ...), so a machine that speeds up or slows down over the run does not bias "
                        "the speed-up; the speed-up is the ratio of median walls")
    p.add_argument("--shards-per-run", type=int, nargs="+", default=[0],
                   help="processes mode: fanout.per_run, one measurement per value (0 = auto: the shards "
                        "split evenly over the "
                        "online shard workers; 1 = one flow run per shard, as before batching)")
    p.add_argument("--worker", nargs="+", choices=["event", "stock"], default=["event"],
                   help="processes mode: shard workers as `advfeatures worker` (flows.worker: woken by the "
                        "server's events, polling every flows.serve.QUERY_SECONDS as the fallback) or as stock "
                        f"`prefect worker start` polling every {STOCK_QUERY_SECONDS} s; one measurement per value")
    p.add_argument("--_one", dest="one", type=int, help=argparse.SUPPRESS)  # child of --mode processes
    p.add_argument("--_bare", dest="bare", type=int, help=argparse.SUPPRESS)  # child of --mode bare
    p.add_argument("--_tar", dest="tar", help=argparse.SUPPRESS)
    p.add_argument("--_store", dest="store", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one is not None:
        return _one(a)
    if a.bare is not None:
        return _bare_child(a)

    # a plain `kill` of the benchmark still stops its server and workers (the finally blocks run)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    tmp = Path(tempfile.mkdtemp(prefix="advfeatures-workers-"))
    n = a.shards * a.shard_size
    tar = write_cifar_tar(tmp / "cifar-10-python.tar.gz", make_arrays(n_train=n, n_test=100))
    _config(a, tar, tmp / "store", [])  # a bad configuration fails here, before any server starts
    ok, overhead, ceiling = True, {}, None
    for mode in a.mode:
        results, mach = {"processes": _processes, "dask": _dask, "threads": _threads, "bare": _bare}[mode](a, tmp, tar)
        if mode == "bare":
            ceiling = _print_bare(a, results, mach)
            continue
        good, overhead[mode] = _print(a, mode, results, mach)
        ok = ok and good
    if len(overhead) > 1 or (overhead and ceiling):
        print("# same run, the most workers: " + "; ".join(
            f"{m}: {o[3]} workers, orchestration {o[0]:.2f} s/shard ({o[1]:.1f}%), speed-up {o[2]:.2f}x"
            + (f" = {100 * o[2] / ceiling:.0f}% of the bare ceiling {ceiling:.2f}x" if ceiling else "")
            for m, o in overhead.items() if o))
    return 0 if ok else 1


def _print(a, mode: str, results: dict, mach: str) -> tuple[bool, tuple | None]:
    """The table of one mode; (no warning, (orchestration s/shard, %, speed-up, W) of its largest W)."""
    what = {"processes": "process workers (Prefect work pool)", "dask": "Dask worker processes (LocalCluster)",
            "threads": "threads of one process"}[mode]
    print(f"# {a.shards} shards x {a.shard_size} images x {a.steps} steps, small_cnn, shard workers = {what}, "
          f"1 torch thread per worker; {mach}")
    print(f"{'per run':>10} {'workers':>7} {'try':>3} {'flow wall s':>11} {'shard s':>8} {'PGD s':>7} "
          f"{'overhead/shard':>15} {'orchestration/shard':>19} {'runs':>5} {'by workers':>10} {'start s':>7} {'end s':>6}")
    ok, orchs, speedup = True, {}, None
    for (cfg, w, k), r in results.items():
        spr, kind = cfg if mode == "processes" else (cfg, "-")
        ms = r["markers"]
        shard = sum(m["seconds"] for m in ms) / len(ms)
        pgd = sum(m["attack_seconds"] for m in ms) / len(ms)
        per_shard_wall = r["wall"] * w / len(ms)  # wall time one worker spent per shard
        over = per_shard_wall - pgd
        pct = 100 * over / per_shard_wall
        runs = {(m.get("host"), m.get("pid")) for m in ms}  # a writer process per flow run (threads: one)
        # start: from the set's start to each worker's first shard computing (submission, pickup by a
        # worker, process start, imports), mean over workers; end: from the last marker to the set sealed
        # orchestration: of each worker's time from the set's start to its last marker, plus the set's
        # sealing, what was not PGD, per shard (unlike overhead/shard, not charged for a worker that
        # finished early while the other still computed: the workers' PGD speeds differ)
        first: dict = {}
        last: dict = {}
        pgd_of: dict = {}
        for m in ms:
            who = (r["worker_of_shard"].get(m["shard"]) if mode == "processes" else m.get("pid") if mode == "dask"
                   else m["shard"] % w)
            first[who] = min(first.get(who, math.inf), m["written"] - m["seconds"])
            last[who] = max(last.get(who, -math.inf), m["written"])
            pgd_of[who] = pgd_of.get(who, 0.0) + m["attack_seconds"]
        start = sum(first.values()) / len(first) - r["epoch0"]
        end = r["epoch1"] - max(m["written"] for m in ms)
        orch = sum(last[i] - r["epoch0"] + end - pgd_of[i] for i in last) / len(ms)
        orch_pct = 100 * orch / (orch + pgd)
        orchs.setdefault(w, []).append((orch, orch_pct))
        used = str(len({m.get("pid") for m in ms})) if mode == "dask" else "-"
        if mode == "processes":
            of = r["worker_of_shard"]
            by = {of.get(m["shard"]) for m in ms}
            used = str(len(by - {None}))
            size = spr or math.ceil(len(ms) / w)
            expect = min(w, math.ceil(len(ms) / size))
            if None in by or len(by) != expect:
                ok = False
                print(f"WARNING: the {len(ms)} shards of the {w}-worker run were run by {len(by - {None})} of "
                      f"the {w} shard workers, expected {expect} (shard -> worker from the worker logs: {of})")
        label = spr if mode != "processes" else f"{spr or 'auto'}{'' if kind == 'event' else ' stock'}"
        print(f"{label:>10} {w:>7} {k + 1:>3} {r['wall']:>11.1f} {shard:>8.1f} {pgd:>7.1f} {over:>8.2f} s {pct:>4.1f}% "
              f"{orch:>12.2f} s {orch_pct:>4.1f}% {len(runs):>5} {used:>10} {start:>7.1f} {end:>6.1f}")
    if mode == "processes":
        print("# per run: fanout.per_run (auto = the shards split evenly over the online workers); runs: "
              "distinct writer processes in the markers (a process worker starts one per flow run); by workers: "
              f"distinct shard workers that ran them (from their logs){'' if ok else ' (see WARNING)'}; start: mean "
              "seconds from the set's start to a worker's first shard computing; end: last marker to the set "
              "sealed; stock: `prefect worker start` workers, which take runs on their polls only")
    print("# overhead/shard: wall x workers / shards - PGD seconds (a worker that waits for the other counts); "
          "orchestration/shard: per worker, from the set's start to its last marker plus the set's end, less its PGD")
    for cfg in dict.fromkeys(c for c, _, _ in results):
        walls = {w: statistics.median(r["wall"] for (c_, w_, _), r in results.items() if (c_, w_) == (cfg, w))
                 for w in dict.fromkeys(w for c_, w, _ in results if c_ == cfg)}
        if 1 in walls and len(walls) > 1:
            best = max(walls)
            label = "" if mode != "processes" else f" (shards_per_run={cfg[0] or 'auto'}, {cfg[1]} workers)"
            med = " (median walls)" if a.repeat > 1 else ""
            speedup = speedup or walls[1] / walls[best]
            print(f"# speed-up {best} workers vs 1{label}: {walls[1] / walls[best]:.2f}x{med} (goal >= 1.85x on 2 "
                  "cores; orchestration goal < 2% of shard time for shards of ~30 s)")
    if not orchs:
        return ok, None
    best = orchs[max(orchs)]
    return ok, (statistics.median(o for o, _ in best), statistics.median(p for _, p in best), speedup or float("nan"),
                max(orchs))

if __name__ == "__main__":
    sys.exit(main())
