"""Progress as Prefect artifacts: a sink of ``pipeline.progress`` events that keeps one progress
artifact per training model (updated per epoch), per PGD set (updated per shard) and per plan
(stages done), in the flow run that emits them. Outside a run context it does nothing."""

from __future__ import annotations

import threading
import time
from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext, TaskRunContext


def _run_id() -> str | None:
    ctx = TaskRunContext.get() or FlowRunContext.get()
    if ctx is None:
        return None
    run = getattr(ctx, "task_run", None) or getattr(ctx, "flow_run", None)
    return str(run.flow_run_id if hasattr(run, "flow_run_id") else run.id) if run is not None else None


def artifact_of(ev: dict[str, Any]) -> tuple[str, float, str] | None:
    """(artifact key, percent, description) of an event, or None for events shown only live."""
    kind = ev["event"]
    if kind == "epoch":
        return (f"train-{ev['key']}", 100.0 * ev["epoch"] / ev["epochs"],
                f"{ev['stage']} {ev['key']}: epoch {ev['epoch']}/{ev['epochs']}, loss {ev['train_loss']:.3f}, "
                f"train acc {100 * ev['train_acc']:.1f}%")
    if kind == "shard_done":
        return (f"pgd-{ev['key']}", 100.0 * ev["shards_done"] / ev["total_shards"],
                f"PGD {ev['kind']} {ev['key']}: {ev['shards_done']}/{ev['total_shards']} shards, "
                f"{ev['image_steps_per_s']:,.0f} image-steps/s")
    if kind == "plan" and ev.get("run"):
        return (f"stages-{ev['run']}", 100.0 * (ev["done"] + ev["cached"]) / max(ev["total"], 1),
                f"stages: {ev['done']} done, {ev['cached']} cached, {ev['pending']} pending of {ev['total']}")
    return None


class PrefectProgress:
    """``min_interval``: an artifact is updated at most once in that many seconds, except to 100%
    (its last state is never skipped): each update is an API call (~50 ms of the run's CPU and the
    server's), and stages that take less than a second (cached ones, tiny runs) would send one per
    event."""

    def __init__(self, min_interval: float = 1.0) -> None:
        self.sent: dict[tuple[str, str], tuple[Any, float]] = {}  # (run, key): (artifact id, last sent)
        self.min_interval = min_interval
        self._lock = threading.Lock()

    def __call__(self, ev: dict[str, Any]) -> None:
        what = artifact_of(ev)
        run = _run_id() if what is not None else None
        if run is None:
            return
        key, pct, description = what
        with self._lock:
            art, last = self.sent.get((run, key), (None, 0.0))
            now = time.monotonic()
            if art is None:
                art = create_progress_artifact(pct, key=key, description=description)
            elif pct >= 100.0 or now - last >= self.min_interval:
                update_progress_artifact(art, pct, description=description)
            else:
                return
            self.sent[(run, key)] = (art, now)


SINK = PrefectProgress()
