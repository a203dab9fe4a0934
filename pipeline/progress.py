"""Progress events: what a long stage reports while it runs, and where those reports go.

Executors ``emit`` small dicts; displays subscribe with ``add_sink``. Nothing here changes what a
stage computes: events are read-only copies of numbers the loops have already produced, and a
display that fails is dropped from the sinks instead of failing the stage. Events (``event`` field):

    plan        labels {key: name}, total, done, cached, pending, current (a label or None)
    epoch       stage, key, epoch, epochs, train_loss, train_acc, seconds (one training epoch)
    pgd_set     key, kind, rows (rows still to attack), shards (pending), total_shards
    pgd_batch   key, shard, rows_done (this shard so far), shard_rows, image_steps, seconds
    shard_done  key, kind, shard, total_shards, shards_done, rows, seconds, image_steps_per_s

Sinks here: ``PlainSink`` (one line per finished shard and per plan step; for logs and CI) and
``RichSink`` (live bars in a terminal; rich is imported only when one is made). The Prefect sink
(progress artifacts) lives in ``tasks.progress``.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

Sink = Callable[[dict[str, Any]], None]

_sinks: list[Sink] = []
_lock = threading.Lock()


def add_sink(sink: Sink) -> Sink:
    with _lock:
        if sink not in _sinks:
            _sinks.append(sink)
    return sink


def remove_sink(sink: Sink) -> None:
    with _lock:
        if sink in _sinks:
            _sinks.remove(sink)


@contextmanager
def sink(s: Sink) -> Iterator[Sink]:
    add_sink(s)
    try:
        yield s
    finally:
        remove_sink(s)


def emit(event: dict[str, Any]) -> None:
    """Send ``event`` to every sink. A sink that raises is removed (with one line on stderr): a
    display must never stop a computation."""
    with _lock:
        sinks = list(_sinks)
    for s in sinks:
        try:
            s(event)
        except Exception as e:  # noqa: BLE001 - any display failure
            remove_sink(s)
            print(f"advfeatures: progress display {type(s).__name__} failed ({type(e).__name__}: {e}); "
                  "it is switched off, the run goes on", file=sys.stderr)


def duration(seconds: float) -> str:
    """12 -> '12s', 125 -> '2m05s', 3725 -> '1h02m'."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class PlanCounter:
    """Stages of a plan: done (computed in this run), cached (complete before it) and pending."""

    def __init__(self, labels: dict[str, str], total: int, cached: int):
        self.labels, self.total, self.cached, self.done = labels, total, cached, 0

    def event(self, current: str | None = None) -> dict[str, Any]:
        return {"event": "plan", "labels": self.labels, "total": self.total, "done": self.done,
                "cached": self.cached, "pending": self.total - self.done - self.cached, "current": current}


class _SetRate:
    """Rows attacked per PGD set in this process: rate (image-steps/s) and ETA of the rows left."""

    def __init__(self, rows: int):
        self.rows, self.t0, self.shard_rows, self.image_steps = rows, time.monotonic(), {}, {}

    def update(self, shard: int, rows_done: int, image_steps: float) -> None:
        self.shard_rows[shard], self.image_steps[shard] = rows_done, image_steps

    @property
    def done(self) -> int:
        return sum(self.shard_rows.values())

    def rate(self) -> float:
        return sum(self.image_steps.values()) / max(time.monotonic() - self.t0, 1e-9)

    def eta(self) -> float | None:
        done = self.done
        if done == 0:
            return None
        return (time.monotonic() - self.t0) * (self.rows - done) / done


class PlainSink:
    """Plain lines for logs and CI: one per finished PGD shard (rate, ETA of the set), one per
    plan step (stages done / cached / pending). Epoch lines come from the stages' own log."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream
        self.sets: dict[str, _SetRate] = {}
        self._lock = threading.Lock()

    def _print(self, line: str) -> None:
        print(line, file=self.stream or sys.stdout, flush=True)

    def __call__(self, ev: dict[str, Any]) -> None:
        kind = ev["event"]
        with self._lock:
            if kind == "pgd_set":
                self.sets[ev["key"]] = _SetRate(ev["rows"])
            elif kind == "pgd_batch" and ev["key"] in self.sets:
                self.sets[ev["key"]].update(ev["shard"], ev["rows_done"], ev["image_steps"])
            elif kind == "shard_done":
                s = self.sets.get(ev["key"])
                if s is not None:
                    s.update(ev["shard"], ev["rows"], ev["rows"] * ev.get("steps", 0))
                eta = s.eta() if s is not None else None
                self._print(f"[progress] PGD {ev['kind']} {ev['key']}: shard {ev['shard'] + 1} done "
                            f"({ev['shards_done']}/{ev['total_shards']} shards), {ev['image_steps_per_s']:,.0f} "
                            f"image-steps/s" + (f", ETA {duration(eta)}" if eta is not None else ""))
            elif kind == "plan" and (ev.get("current") or ev["pending"] == 0):  # a stage starts; or all done
                cur = f", now: {ev['current']}" if ev.get("current") else ""
                self._print(f"[progress] stages: {ev['done']} done, {ev['cached']} cached, "
                            f"{ev['pending']} pending of {ev['total']}{cur}")


class RichSink:
    """Live bars in a terminal (rich): the plan's stages, each model's epochs (loss, accuracy) and
    each PGD set's rows (image-steps/s, ETA). Use as a context manager; bars vanish when it
    closes (transient), so what the run prints last stays last."""

    def __init__(self, console: Any = None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=28), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                 console=console or Console(), transient=True, refresh_per_second=4)
        self.console = self.progress.console
        self.tasks: dict[str, Any] = {}
        self.sets: dict[str, _SetRate] = {}
        self.labels: dict[str, str] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> RichSink:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def _task(self, name: str, description: str, total: float) -> Any:
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(description, total=total, info="")
        return self.tasks[name]

    def __call__(self, ev: dict[str, Any]) -> None:
        kind, p = ev["event"], self.progress
        with self._lock:
            if kind == "plan":
                self.labels.update(ev.get("labels") or {})
                t = self._task("plan", "stages", ev["total"])
                p.update(t, total=ev["total"], completed=ev["done"] + ev["cached"],
                         info=f"{ev['done']} done, {ev['cached']} cached, {ev['pending']} pending"
                              + (f"  [{ev['current']}]" if ev.get("current") else ""))
            elif kind == "epoch":
                name = self.labels.get(ev["key"], ev["stage"])
                t = self._task(ev["key"], f"{name} ({ev['key'][:8]})", ev["epochs"])
                p.update(t, completed=ev["epoch"],
                         info=f"loss {ev['train_loss']:.3f}  acc {100 * ev['train_acc']:.1f}%")
                if ev["epoch"] >= ev["epochs"]:
                    p.remove_task(t)
                    del self.tasks[ev["key"]]
                    self.console.print(f"trained {name} ({ev['key'][:8]}): loss {ev['train_loss']:.3f}, "
                                       f"train acc {100 * ev['train_acc']:.1f}%")
            elif kind == "pgd_set":
                self.sets[ev["key"]] = _SetRate(ev["rows"])
                self._task(ev["key"], f"PGD {ev['kind']} ({ev['key'][:8]})", max(ev["rows"], 1))
            elif kind in ("pgd_batch", "shard_done") and ev["key"] in self.sets:
                s = self.sets[ev["key"]]
                if kind == "pgd_batch":
                    s.update(ev["shard"], ev["rows_done"], ev["image_steps"])
                else:
                    s.update(ev["shard"], ev["rows"], ev["rows"] * ev.get("steps", 0))
                t = self.tasks.get(ev["key"])
                if t is not None:
                    p.update(t, completed=s.done, info=f"{s.rate():,.0f} image-steps/s")
                    if s.done >= s.rows:
                        p.remove_task(t)
                        del self.tasks[ev["key"]]
                        self.console.print(f"PGD set {ev['key'][:8]}: {s.rows:,} rows at {s.rate():,.0f} "
                                           "image-steps/s")


def auto_sink(mode: str = "auto") -> Any:
    """The display for ``mode``: 'rich' (live bars), 'plain' (lines), 'none', or 'auto' (rich when
    stdout is a terminal, plain lines otherwise)."""
    if mode not in ("auto", "rich", "plain", "none"):
        raise ValueError(f"--progress {mode!r}: use auto, rich, plain or none")
    if mode == "auto":
        mode = "rich" if sys.stdout.isatty() else "plain"
    return {"rich": RichSink, "plain": PlainSink, "none": lambda: None}[mode]()
