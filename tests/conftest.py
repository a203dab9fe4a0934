"""Shared fixtures: a tiny synthetic dataset in every source format, and helpers."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile

# Prefect's home (result records, local storage) in a throwaway folder, set before prefect loads.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="advfeatures-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The tests' Prefect servers serve the API only: with the UI, each start copies its static build into
# Prefect's home first (8.5 s a start against 7.0 without, measured on 2 cores)
os.environ.setdefault("PREFECT_SERVER_UI_ENABLED", "false")
# Flow and task logs go to stdout only, not to the server as well (no test reads them there; each
# batch is an API call: test_flow took ~10 CPU-s, 5%, less without them).
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
# Every Prefect client makes an SSL context from a CA bundle, certifi's by default: 37 ms a client
# (OpenSSL parses ~150 certificates; test_concurrent_runs made 39 clients: 1.4 s). The tests'
# servers are http:// on 127.0.0.1, so Prefect's own setting names a bundle of one certificate
# (1.4 ms a client).
if "PREFECT_API_SSL_CERT_FILE" not in os.environ:
    import re

    import certifi

    _one_ca = os.path.join(os.environ["PREFECT_HOME"], "one-ca.pem")
    if not os.path.exists(_one_ca):
        os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)
        with open(certifi.where()) as f:
            _pem = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n", f.read(), re.S)
        with open(f"{_one_ca}.{os.getpid()}", "w") as f:
            f.write(_pem.group(0))
        os.replace(f"{_one_ca}.{os.getpid()}", _one_ca)
    os.environ["PREFECT_API_SSL_CERT_FILE"] = _one_ca
# Under pytest-xdist (`make test`: two workers on two cores), OpenMP
# threads that wait sleep instead of spinning: spinning waiters took twice the CPU
# (test_science: 132 s for two concurrent runs, 61 s with PASSIVE; alone, 33 s and 39 s, so only
# under xdist). Read by libgomp when torch loads: set before, here and in every process started.
# And each run's torch uses one thread there, not the tiny profile's 2 (ADVFEATURES_SET, inherited by
# every process a test starts): two workers of 2 threads on 2 cores oversubscribe them (the tiny
# debate's stages, two processes at once: 25.3 s each with 2 threads, 21.0 with 1; alone, 17.1
# with 2 and 23.6 with 1, so only under xdist).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("ADVFEATURES_SET", "runtime.threads=1")

import pytest  # noqa: E402

from advfeatures import synthetic as S  # noqa: E402 - numpy and PIL only


@pytest.fixture(scope="session")
def tiny_arrays():
    return S.make_arrays(n_train=200, n_test=100, seed=0)


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory, tiny_arrays):
    """The same tiny dataset as: ImageFolder dir, zip (flat and with a top folder), CIFAR tar.gz,
    extracted CIFAR folder, and the parent of that folder."""
    root = tmp_path_factory.mktemp("sources")
    cifar_dir = S.write_cifar_folder(root / "extracted", tiny_arrays)
    return {
        "folder": S.write_image_folder(root / "folder", tiny_arrays),
        "zip": S.write_image_zip(root / "flat.zip", tiny_arrays),
        "zip_top": S.write_image_zip(root / "top.zip", tiny_arrays, top="CIFAR-10-images/"),
        "tar": S.write_cifar_tar(root / "cifar-10-python.tar.gz", tiny_arrays),
        "cifar_dir": cifar_dir,
        "cifar_parent": cifar_dir.parent,
    }


@pytest.fixture(scope="session")
def tiny_tar(tiny_sources):
    return tiny_sources["tar"]


@pytest.fixture(scope="session")
def experiments_store(tmp_path_factory):
    """One store for the tiny runs of the experiments of the debate (robust-datasets, bugs-only,
    transfer, spectrum): stages are cached by key, so the dataset, the source and what else their
    plans share are computed once per test process."""
    return tmp_path_factory.mktemp("experiments")


def run_experiment(name, overrides, store, tar):
    """Resolve the tiny profile with ``overrides``, plan experiment ``name`` on ``tar`` and run every
    stage without Prefect: (cfg, store, plan)."""
    from advfeatures.config import resolve
    from pipeline import kinds
    from pipeline.common import Context
    from pipeline.experiments import get
    from pipeline.stages.dataset import source_sha256
    from storage.store import Store

    cfg = resolve("tiny", list(overrides), data=str(tar), store=str(store))
    plan = get(name).plan(cfg, source_sha256(tar))
    st = Store(store)
    kinds.run_all(st, plan, Context(runtime=cfg.runtime, data=cfg.data, plan=plan, config=cfg, experiment=name))
    return cfg, st, plan


def build(tar, store, overrides=(), profile="tiny"):
    """Resolve a profile on ``tar`` into ``store``, ingest, train the source: (cfg, store, plan)."""
    from advfeatures.config import resolve
    from pipeline import stages
    from pipeline.plan import make_plan
    from pipeline.stages.dataset import source_sha256
    from storage.store import Store

    cfg = resolve(profile, list(overrides), data=str(tar), store=str(store))
    st, plan = Store(cfg.runtime.store), make_plan(cfg, source_sha256(tar))
    stages.ingest(st, cfg.data, plan.dataset)
    stages.train_model(st, plan.source, cfg.runtime)
    return cfg, st, plan


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def migrated_database(dest):
    """Copy the Prefect database with every migration applied (``prefect_template``) to ``dest`` (a
    file path): a server started on it skips the migrations, ~15 of the ~23 CPU-s of a start on a
    fresh database (measured, 2 cores)."""
    import shutil

    from prefect_template import ensure_template

    shutil.copyfile(ensure_template(), dest)
    return dest


_TEMPLATE_MAKER = None


def pytest_configure(config):
    """Under pytest-xdist, the controller starts making the Prefect database template at once: it
    is made while the workers start and collect (~6 s), and the first test that starts a server
    waits less for it. Stopped at the end if still running (a run that needed no server)."""
    global _TEMPLATE_MAKER
    import subprocess
    import sys
    from pathlib import Path

    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        # a process that runs tests; pytest-xdist's controller runs none and never loads torch (~2 s
        # before it starts the workers, and its teardown at the end)
        import torch

        torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))
    else:
        _TEMPLATE_MAKER = subprocess.Popen([sys.executable, str(Path(__file__).with_name("prefect_template.py"))],
                                           start_new_session=True, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """The controller stops the template's maker if it still runs. A pytest-xdist worker whose
    results are sent and that left no child process ends here, without the interpreter's teardown
    (freeing torch, Prefect, Dask: 3-4 s at the suite's end, while the controller waits for it); one
    with a child still running exits as usual."""
    import signal
    import sys

    if _TEMPLATE_MAKER is not None:
        if _TEMPLATE_MAKER.poll() is None:
            os.killpg(_TEMPLATE_MAKER.pid, signal.SIGKILL)  # its migrations' process too (its own session)
        _TEMPLATE_MAKER.wait()
    if hasattr(config, "workerinput"):
        import psutil

        # multiprocessing's resource tracker (Dask's LocalCluster starts it) ends when its pipe closes
        if not [c for c in psutil.Process().children() if "multiprocessing.resource_tracker" not in " ".join(c.cmdline())]:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


@contextlib.contextmanager
def prefect_harness():
    """prefect_test_harness (a temporary server for this process's flow runs) on a database copied
    from the migrated template instead of a fresh one."""
    from pathlib import Path

    import prefect.testing.utilities as U

    make_dir = U.mkdtemp

    def seeded_dir(*args, **kwargs):
        folder = make_dir(*args, **kwargs)
        migrated_database(Path(folder) / "prefect-test.db")  # the harness's database file name
        return folder

    U.mkdtemp = seeded_dir
    try:
        with U.prefect_test_harness(server_startup_timeout=120):
            U.mkdtemp = make_dir
            yield
    finally:
        U.mkdtemp = make_dir


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect server per test process (pytest-xdist worker), shared by the modules
    whose flows run in this process (test_flow, test_experiments, test_remote_store): its API URL.
    Each start cost ~10 CPU-s (measured); one per module made three on one worker."""
    from prefect.settings import get_current_settings

    with prefect_harness():
        yield get_current_settings().api.url


def prefect_logging_ready():
    """Set Prefect's logging up now, in a fixture: done later, by a test's first flow run, it
    replaces the root logger's handlers, caplog's among them, and the test's log is lost."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()


def run_cli(caplog, monkeypatch, api, *args):
    """`advfeatures *args` in this process, its flows talking to the Prefect server at ``api`` (a
    process of its own costs ~8 CPU-s importing torch and Prefect): (exit code, the log of its
    flows, their prints included). Call ``prefect_logging_ready`` in a fixture first."""
    import logging

    from prefect.logging import configuration
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main

    assert configuration.PROCESS_LOGGING_CONFIG, "call conftest.prefect_logging_ready() in a module fixture first"
    caplog.clear()
    monkeypatch.setenv("PREFECT_API_URL", api)  # what the CLI reads from the environment, too
    with caplog.at_level(logging.INFO), temporary_settings({PREFECT_API_URL: api}):
        try:
            code = main(list(args))
        finally:
            _drain_prefect_workers()
    return code, caplog.text


def _drain_prefect_workers():
    """Send and stop this process's Prefect event (and API log) workers while their server lives:
    one left bound to a server that then stops (a test's own server) hangs the next harness's
    exit, which drains every worker (seen: `make test` stuck at the end)."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain():
        for result in (APILogWorker.drain_all(timeout=30), EventsWorker.drain_all(timeout=30)):
            if inspect.isawaitable(result):
                await result

    run_coro_as_sync(drain())


# The tiny runs of the experiments of the debate share `experiments_store`: on one pytest-xdist
# worker, the debate's run and the experiments' own runs compute their common stages (dataset,
# source, det, the spectrum's sources, ...) once. `--dist loadfile` hands each module to one
# worker; the scheduler below hands it these modules as one (xdist's public hook; with another
# --dist, or an xdist whose file scheduler changed, xdist's own). Not `--dist loadgroup` with
# `xdist_group` marks: xdist 3.8 marks a group by rewriting `item._nodeid`, which pytest 9.2 no
# longer reads, so every test became its own group and module fixtures ran on both workers (seen:
# test_flow's first run twice, the suite 12 s slower; pytest-xdist issue 1386, open).
EXPERIMENTS = ("test_debate.py", "test_bugs_only.py", "test_robust_datasets.py", "test_spectrum.py",
               "test_transfer.py")
# The modules whose flows talk to a Prefect server (`prefect_api`) go to one worker as one unit too:
# one server start (~8 CPU-s: Prefect's server modules imported here, the server's own process)
# instead of one on each worker. ~150 s together, handed out first: the other worker's modules and
# the short ones after them even the two out.
PREFECT_SERVER = ("test_flow.py", "test_remote_store.py", "test_concurrent_runs.py", "test_serve.py",
                  "test_docs_python.py")


@pytest.hookimpl(optionalhook=True)  # xdist's hook: `pytest -p no:xdist` runs without it
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    if not callable(getattr(LoadFileScheduling, "_split_scope", None)):
        return None

    class ModulesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid):
            scope = super()._split_scope(nodeid)
            name = scope.rsplit("/", 1)[-1]
            return "tests/experiments" if name in EXPERIMENTS else "tests/prefect-server" if name in PREFECT_SERVER \
                else scope

    return ModulesTogether(config, log)


# Under pytest-xdist (`make test` runs `-n 2 --dist loadfile`), modules are handed to the workers
# in collection order: the longest first, so that neither worker is left with one long module at
# the end and the short ones even the two out. Measured 2026-12-07 (2 cores, 2 workers, one torch
# thread each): test_flow 99 s, test_science 60, test_dask 42, test_remote_store 38, the experiments
# of the debate ~40 together, test_concurrent_runs 20, test_experiments 19, test_report 15,
# test_stages 11. Handed out after them, test_science ran alone for its last 23 s.
LONGEST_FIRST = ("test_flow.py", "test_science.py", "test_dask.py", "test_remote_store.py", "test_debate.py",
                 "test_concurrent_runs.py", "test_experiments.py", "test_report.py", "test_stages.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module's order kept
