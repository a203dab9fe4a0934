"""The flows' own settings: how a flow hands shards to Prefect deployments (``fanout.*``), and
whether it writes a run's report (``report.*``).

They belong to the orchestration, not to the maths, so they are a config section of their own,
registered here (``advfeatures.config.register_section``) when ``flows`` is imported, and read by
the flows as ``cfg.fanout`` and ``cfg.report``. None of them is in any key. No prefect import
here: the CLI resolves profiles with it before Prefect starts.

The settings were ``runtime.shard_executor``, ``shard_deployment``, ``shard_retries``,
``shards_per_run``, ``heartbeat_multiple`` and ``shard_timeout``: a profile or override that
still names one of those is refused with the new name (``MOVED``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from advfeatures.config import _check, register_section


@dataclass(frozen=True)
class FanoutConfig:
    executor: str = "local"
    """'local': shards run as tasks of this flow (runtime.shard_workers threads). 'deployment':
    batches of shards are flow runs of the ``deployment`` deployment, taken by its work pool's
    workers. 'dask': every shard is a task of a Dask cluster (``dask.*``: a local cluster, an
    existing scheduler, SLURM/PBS jobs through dask-jobqueue, Kubernetes pods), installed with
    the ``dask`` extra."""
    deployment: str = "generate-shard/generate-shard"
    """With 'deployment': the shard deployment, as flow name/deployment name (prefect.yaml's)."""
    retries: int = 2
    """With 'deployment': how often a shard whose run failed, crashed or was lost is submitted
    again (each shard counts its own tries, whatever batch it ran in). With 'dask': how often a
    shard whose worker died (Dask's ``KilledWorker``, after ``dask.allowed_failures`` deaths) is
    submitted again; an error raised by the shard's own code fails the set at once."""
    per_run: int = 0
    """With 'deployment': shards per flow run of the shard deployment, run one after another by
    one worker (each shard keeps its own marker and retry count). 0 = auto: the pending shards
    split evenly over the pool's online shard workers, so each worker pays a flow run's start
    (~5-7 s with `advfeatures worker`, ~5-12 s with polling stock workers, measured) once per set
    instead of once per shard."""
    heartbeat_multiple: float = 3.0
    """With 'deployment': a shard run that is Running (or Pending on a worker) and whose last
    Prefect heartbeat is older than this many heartbeat periods is lost (its worker died with
    it): it is marked Crashed and its shards are resubmitted, within ``retries``."""
    timeout: float = 0.0
    """With 'deployment': seconds a set's shards may take from submission until all are done;
    past it the set fails with an error naming the shards and their runs. 0 = no deadline."""

    def __post_init__(self):
        _check(self.executor in ("local", "deployment", "dask"),
               f"fanout.executor={self.executor!r}; choose local, deployment or dask")
        _check(self.retries >= 0, "fanout.retries must be >= 0")
        _check(self.per_run >= 0, "fanout.per_run must be >= 0 (0 = auto)")
        _check(self.heartbeat_multiple > 1, "fanout.heartbeat_multiple must be > 1 (heartbeat periods "
               "without a heartbeat before a shard run counts as lost; 3 is a safe choice)")
        _check(self.timeout >= 0, "fanout.timeout must be >= 0 seconds (0 = no deadline)")


MOVED = {f"runtime.{old}": f"fanout.{new}" for old, new in (
    ("shard_executor", "executor"), ("shard_deployment", "deployment"), ("shard_retries", "retries"),
    ("shards_per_run", "per_run"), ("heartbeat_multiple", "heartbeat_multiple"), ("shard_timeout", "timeout"))}

register_section("fanout", FanoutConfig, moved=MOVED)


@dataclass(frozen=True)
class DaskConfig:
    """Where ``fanout.executor=dask`` sends shards (``flows.dask``). Workers need the store (a
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
