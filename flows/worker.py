"""`python -m flows.worker`: Prefect's process worker, woken by the server's events.

A stock worker (`prefect worker start`) learns of new flow runs by polling the server every
PREFECT_WORKER_QUERY_SECONDS (jittered by +-30%): a run waits half a period for its worker on
average, and every poll costs the server CPU whether there is work or not. This worker is the same
``ProcessWorker`` (same pool, queues, limit, run processes, heartbeats, cancellation), plus a
subscription to the server's event stream: when a flow run is scheduled, taken or ended, a
worker with a free slot asks for runs (``SETTLE_SECONDS`` after the first event of a burst).
Polling stays, as the fallback for a dropped subscription, so it can be slow
(``flows.serve.QUERY_SECONDS``). A stock worker still works with everything here; it is only
slower to take runs.

    advfeatures worker --work-queue shards [--limit 1] [--name NAME] [--pool advfeatures]
    python -m flows.worker --work-queue shards ...                  (the same)

PREFECT_WORKER_QUERY_SECONDS defaults to ``flows.serve.QUERY_SECONDS`` here (unless set).

Signals are handled as by `prefect worker start` (Prefect's own handlers).

The wake-ups use three members of Prefect's ``BaseWorker`` that are not public API
(``get_and_submit_flow_runs``, ``limiter``, ``is_setup``). A Prefect release without them does
not break this worker: it logs a warning and takes runs on its polls only, as a stock worker
(tests/test_worker.py fails on such a release, so the loss of the wake-ups does not go unseen).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

WAKE_EVENTS = ["prefect.flow-run.Scheduled", "prefect.flow-run.Pending", "prefect.flow-run.Completed",
               "prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.Cancelled"]
"""A run to take (Scheduled); a run taken (Pending), after which a worker that lost the race for it
looks again (a stock worker tries one run per query at ``--limit 1``, and two workers woken together
both try the first); a slot that may have come free (a run's end)."""

SETTLE_SECONDS = 0.5
"""How long a worker waits after the first event of a burst before it asks for runs. A fan-out
submits its runs ~0.1 s apart; a worker that took the first at once and started its process
slowed the server enough to delay the next submission by 2 s (measured, 2 cores), and the next
worker with it."""

BUSY_LOOKS = 8  # x settle/2: how long a woken worker waits for a slot held by a lost claim

log = logging.getLogger("prefect.advfeatures.worker")


async def _wake_on_events(wake: asyncio.Event) -> None:
    """Set ``wake`` for every event in WAKE_EVENTS, resubscribing (with a pause) when the stream
    drops; polling covers the gap."""
    from prefect.events.clients import get_events_subscriber
    from prefect.events.filters import EventFilter, EventNameFilter

    while True:
        try:
            async with get_events_subscriber(filter=EventFilter(event=EventNameFilter(name=WAKE_EVENTS))) as events:
                async for _ in events:
                    wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the server restarting, a network error: polling goes on meanwhile
            log.warning("event subscription lost (%s: %s); polling every %s s until it is back",
                        type(e).__name__, e, os.environ.get("PREFECT_WORKER_QUERY_SECONDS", "?"))
        await asyncio.sleep(5)


async def _take_when_woken(worker, wake: asyncio.Event, settle: float = SETTLE_SECONDS) -> None:
    """One query per burst of events, ``settle`` seconds after its first, by a worker with a free
    slot. A slot held for a run this worker just failed to claim (another took it: the Pending
    event that woke it) frees within ~0.1 s, so a busy worker looks again for a moment first."""
    while True:
        await wake.wait()
        await asyncio.sleep(settle)
        wake.clear()
        if not worker.is_setup:
            continue  # its own first poll comes right after setup
        for _ in range(BUSY_LOOKS):
            if not _busy(worker):
                break
            await asyncio.sleep(settle / 2)
        else:
            continue  # busy with a run: its end wakes it
        try:
            await worker.get_and_submit_flow_runs()
        except Exception as e:  # as a failed poll: the next event or poll tries again
            log.warning("query for flow runs failed: %s: %s", type(e).__name__, e)


def _busy(worker) -> bool:
    """At its ``--limit`` (no limit: never)."""
    try:
        return worker.limiter.available_tokens < 1
    except (RuntimeError, AttributeError):
        return False


INTERNALS = ("get_and_submit_flow_runs", "limiter", "is_setup")
"""The members of Prefect's worker that the wake-ups use (not public API)."""


def missing_internals(worker) -> list[str]:
    """Which of ``INTERNALS`` this Prefect's worker lacks (looked up on the class, then the
    instance: ``limiter`` is a property that raises before the worker is set up)."""
    return [n for n in INTERNALS if not hasattr(type(worker), n) and n not in getattr(worker, "__dict__", {})]


async def run(pool: str, queues: list[str], limit: int | None, name: str | None) -> None:
    from prefect.settings import PREFECT_WORKER_HEARTBEAT_SECONDS
    from prefect.workers.process import ProcessWorker

    worker = ProcessWorker(name=name, work_pool_name=pool, work_queues=queues, limit=limit,
                           heartbeat_interval_seconds=int(PREFECT_WORKER_HEARTBEAT_SECONDS.value()))
    wake = asyncio.Event()
    missing = missing_internals(worker)
    if missing:
        import prefect

        log.warning("prefect %s's worker has no %s: this worker takes runs on its polls only (every %s s), as a "
                    "stock worker would", prefect.__version__, ", ".join(missing),
                    os.environ.get("PREFECT_WORKER_QUERY_SECONDS", "?"))
    helpers = [] if missing else [asyncio.create_task(_wake_on_events(wake)),
                                  asyncio.create_task(_take_when_woken(worker, wake))]
    try:
        await worker.start(printer=print)
    finally:
        for t in helpers:
            t.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from flows.serve import POOL

    p.add_argument("--pool", default=POOL, help=f"work pool (default: {POOL})")
    p.add_argument("--work-queue", action="append", dest="queues", required=True,
                   help="work queue to take runs from (shards, control); repeatable")
    p.add_argument("--limit", type=int, default=None, help="flow runs at once (1 for a shard worker)")
    p.add_argument("--name", default=None, help="worker name (control-* for a controller: not counted "
                                                "as a shard worker)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.worker", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return start(p.parse_args(argv))


def start(a: argparse.Namespace) -> int:
    from flows.serve import QUERY_SECONDS

    os.environ.setdefault("PREFECT_WORKER_QUERY_SECONDS", QUERY_SECONDS)  # before Prefect reads its settings
    from prefect.utilities.processutils import setup_signal_handlers_worker

    setup_signal_handlers_worker(os.getpid(), "the process worker", print)
    try:
        asyncio.run(run(a.pool, a.queues, a.limit, a.name))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("Worker stopped!")
    return 0


if __name__ == "__main__":
    sys.exit(main())
