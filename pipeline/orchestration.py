"""The orchestration's own settings: where a set's shards run (``fanout.*``, ``dask.*``), and
whether a run writes its report (``report.*``).

They belong to the orchestration (``flows``), not to the maths, so they are config sections of
their own, registered here (``advfeatures.config.register_section``) when this module is imported
(``flows`` imports it), and read as ``cfg.fanout``, ``cfg.dask`` and ``cfg.report``. None of them
is in any key. Plain dataclasses: the CLI resolves profiles with them before Prefect starts, and
``pipeline.settings_doc`` documents them without importing ``flows``.

The settings were ``runtime.shard_executor``, ``shard_retries`` and ``shard_timeout``: a profile or
override that still names one of those is refused with the new name (``MOVED``). The
``deployment`` executor and its settings (``fanout.deployment``, ``per_run``,
``heartbeat_multiple``) were removed: Dask does that job (``REMOVED`` names the way there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from advfeatures.config import ConfigError, _check, register_section

TO_DASK = ("use fanout.executor=dask: a Dask LocalCluster started for the run, or dask.address=tcp://HOST:8786 for "
           "workers elsewhere (processes, containers, SLURM jobs, pods); CHANGELOG 'Moving from the deployment "
           "executor'")


@dataclass(frozen=True)
class FanoutConfig:
    executor: str = "local"
    """'local': shards run as tasks of this flow (runtime.shard_workers threads). 'dask': every
    shard is a task of a Dask cluster (``dask.*``: a local cluster, an existing scheduler,
    SLURM/PBS jobs through dask-jobqueue, Kubernetes pods), installed with the ``dask`` extra;
    each shard is its own Prefect task run, reported by this flow."""
    retries: int = 2
    """With 'dask': how often a shard whose worker died (Dask's ``KilledWorker``, after
    ``dask.allowed_failures`` deaths) is submitted again; an error raised by the shard's own code
    fails the set at once."""
    timeout: float = 0.0
    """With 'dask': seconds a set's shards may take from submission until all are done; past it
    the set fails with an error naming the shards. 0 = no deadline."""

    def __post_init__(self):
        if self.executor == "deployment":
            raise ConfigError(f"fanout.executor=deployment was removed; {TO_DASK}")
        _check(self.executor in ("local", "dask"), f"fanout.executor={self.executor!r}; choose local or dask")
        _check(self.retries >= 0, "fanout.retries must be >= 0")
        _check(self.timeout >= 0, "fanout.timeout must be >= 0 seconds (0 = no deadline)")


MOVED = {f"runtime.{old}": f"fanout.{new}" for old, new in (
    ("shard_executor", "executor"), ("shard_retries", "retries"), ("shard_timeout", "timeout"))}
REMOVED = {f"fanout.{k}": f"it belonged to the removed deployment executor; {TO_DASK}"
           for k in ("deployment", "per_run", "heartbeat_multiple")}
REMOVED.update({f"runtime.{k}": REMOVED[f"fanout.{v}"] for k, v in (
    ("shard_deployment", "deployment"), ("shards_per_run", "per_run"), ("heartbeat_multiple", "heartbeat_multiple"))})

register_section("fanout", FanoutConfig, moved=MOVED, removed=REMOVED)


@dataclass(frozen=True)
class DaskConfig:
    """Where ``fanout.executor=dask`` sends shards (``flows/dask_shards.py``). Workers need the store (a
    local or NFS path, or an fsspec URL) and the project's packages; with a URL store also
    PREFECT_API_URL (the store's cross-host lock is a Prefect concurrency limit). Tasks carry a
    set's spec and a shard number, never arrays; a shard's result is its marker in the store."""
    address: str = ""
    """An existing scheduler (``tcp://host:8786``); empty = start ``cluster`` for the run and
    close it at the run's end."""
    cluster: str = "distributed.LocalCluster"
    """The cluster class to start, by dotted path: ``distributed.LocalCluster`` (worker processes
    on this machine), ``dask_jobqueue.SLURMCluster`` (or PBSCluster, ...: workers as batch jobs),
    ``dask_kubernetes.operator.KubeCluster``."""
    cluster_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``cluster``. For LocalCluster the defaults are
    ``n_workers=runtime.shard_workers``, one thread each, processes."""
    scale: int = 0
    """Workers (jobs, pods) to ask the started cluster for (``cluster.scale``); 0 = the class's
    own (LocalCluster's n_workers) unless ``adapt`` is set."""
    adapt: dict[str, Any] = field(default_factory=dict)
    """Adaptive bounds for the started cluster (``cluster.adapt(minimum=..., maximum=...)``): it
    grows while shards wait and shrinks when idle. {} = fixed size."""
    resources: dict[str, float] = field(default_factory=dict)
    """What each shard needs of a worker, e.g. {GPU: 1}: with workers started with ``--resources
    GPU=1`` (one per GPU), a box runs one shard per GPU. {} = any worker, any number at once."""
    allowed_failures: int = 3
    """Worker deaths while running one shard before Dask gives up on it (``KilledWorker``;
    Dask's ``distributed.scheduler.allowed-failures``, set for clusters this run starts; an
    existing scheduler keeps its own). ``fanout.retries`` then submits the shard again."""
    stages: bool = False
    """Also run every other stage but ingestion (models, students, evaluations, sets built whole) as a
    task of the cluster, e.g. to train the students of one plan level on as many GPUs at once
    (runtime.stage_workers of them in flight). false: only shards go to the cluster; the rest runs
    in the run's own process."""
    timeout: float = 120.0
    """Seconds to wait for the scheduler to answer (and, with ``scale`` or ``adapt``, for a first
    worker) before failing with an error naming the address or cluster."""

    def __post_init__(self):
        _check(self.address == "" or "://" in self.address,
               f"dask.address={self.address!r}; give the scheduler as tcp://host:8786 (or '' to start dask.cluster)")
        _check("." in self.cluster, f"dask.cluster={self.cluster!r}; give a class by its dotted path, "
               "e.g. distributed.LocalCluster or dask_jobqueue.SLURMCluster")
        _check(self.scale >= 0, "dask.scale must be >= 0 (0 = the cluster class's own size)")
        _check(not (self.scale and self.adapt), "dask.scale and dask.adapt exclude each other: choose a fixed "
               "size or adaptive bounds")
        _check(set(self.adapt) <= {"minimum", "maximum", "wait_count", "interval"},
               f"dask.adapt={self.adapt}; its keys are minimum, maximum (and wait_count, interval)")
        _check(all(isinstance(v, (int, float)) and v > 0 for v in self.resources.values()),
               f"dask.resources={self.resources}; each must be a positive number, e.g. {{GPU: 1}}")
        _check(self.allowed_failures >= 0, "dask.allowed_failures must be >= 0")
        _check(self.timeout > 0, "dask.timeout must be > 0 seconds")


register_section("dask", DaskConfig)


@dataclass(frozen=True)
class ReportConfig:
    write: bool = True
    """Write the run's report (report.html, report.md, figures/) after its tables (the tiny
    profile's: 3.9 CPU-s on 2 cores, measured). false: tables only (CSV, Markdown, Parquet, and
    their Prefect artifacts); ``advfeatures report RUN`` writes the report later, from the store."""


register_section("report", ReportConfig)
