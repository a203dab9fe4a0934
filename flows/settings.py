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

from dataclasses import dataclass

from advfeatures.config import _check, register_section


@dataclass(frozen=True)
class FanoutConfig:
    executor: str = "local"
    """'local': shards run as tasks of this flow (runtime.shard_workers threads). 'deployment':
    batches of shards are flow runs of the ``deployment`` deployment, taken by its work pool's
    workers."""
    deployment: str = "generate-shard/generate-shard"
    retries: int = 2
    """With 'deployment': how often a shard whose run failed, crashed or was lost is submitted
    again (each shard counts its own tries, whatever batch it ran in)."""
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
        _check(self.executor in ("local", "deployment"),
               f"fanout.executor={self.executor!r}; choose local or deployment")
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
class ReportConfig:
    write: bool = True
    """Write the run's report (report.html, report.md, figures/) after its tables (the tiny
    profile's: 3.9 CPU-s on 2 cores, measured). false: tables only (CSV, Markdown, Parquet, and
    their Prefect artifacts); ``advfeatures report RUN`` writes the report later, from the store."""


register_section("report", ReportConfig)
