"""A PGD set's pending shards fanned out as flow runs of the shard deployment, and watched.

Each flow run takes a batch of shards (``fanout.per_run``; 0 = auto: the pending shards
split evenly over the pool's online shard workers) and runs them one after another; every shard
keeps its own marker and its own count of tries. The parent polls its children:

- a child whose shards all have their markers is done (as soon as the last one appears: the
  parent does not wait for the run's own end, which costs ~1 s of the set's critical path);
- one that ends otherwise (Failed, Crashed, Cancelled), or is *lost* (Running or Pending with no
  heartbeat for ``fanout.heartbeat_multiple`` periods: its worker died with it, so nobody will
  report it; ``flows.liveness.lost``), is marked Crashed if need be, and its unfinished shards
  are resubmitted as one new run, each shard at most ``fanout.retries`` more times;
- past ``fanout.timeout`` seconds the set fails, naming the shards and runs still out.

Idempotency keys are scoped to the parent run, the set, the batch and the try, so a retried
parent does not duplicate its children. ``Children`` is the Prefect side, behind a small
interface so the bookkeeping is tested without a server (tests/test_fanout.py).
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

from flows.liveness import deployment_period, last_heartbeat, lost, mark_crashed
from pipeline.plan import StageSpec
from storage.arrays import shard_done
from storage.store import Store

CONTROL_WORKER_PREFIX = "control"
"""Workers of the pool whose name starts with it run controllers, not shards (serve and the
compose stack name theirs so); the rest count as shard workers for fanout.per_run=0."""


@dataclass(frozen=True)
class RunState:
    type: str          # Prefect StateType value: SCHEDULED, PENDING, RUNNING, COMPLETED, ...
    name: str
    message: str | None
    entered: _dt.datetime | None  # when the run entered this state
    final: bool


class Children(Protocol):
    def submit(self, shards: list[int], attempt: int) -> UUID: ...
    def state(self, run_id: UUID) -> RunState: ...
    def last_heartbeat(self, run_id: UUID) -> _dt.datetime | None: ...
    def mark_crashed(self, run_id: UUID, message: str) -> None: ...
    def heartbeat_period(self) -> float | None: ...
    def shard_workers(self) -> int: ...


def label(shards: list[int]) -> str:
    return f"shard {shards[0]}" if len(shards) == 1 else "shards " + ", ".join(map(str, shards))


def batches(pending: list[int], per_run: int, workers: int) -> list[list[int]]:
    """Pending shards cut into runs of ``per_run`` (0 = auto: ceil(pending / workers), so every
    online shard worker gets one run), in order."""
    size = per_run or max(1, math.ceil(len(pending) / max(1, workers)))
    return [pending[i:i + size] for i in range(0, len(pending), size)]


def fan_out(spec: StageSpec, store_root: str, fo: Any, pending: list[int], children: Children,
            poll: float = 1.0, clock: Callable[[], float] = time.monotonic,
            now: Callable[[], _dt.datetime] = lambda: _dt.datetime.now(_dt.timezone.utc),
            on_done: Callable[[int], None] | None = None, state_poll: float = 0.0) -> None:
    """Run ``pending`` shards of ``spec`` as child flow runs until each has its marker; raise when a
    shard has used up its tries or the set its deadline. ``on_done(shard)`` is called once per shard
    as its marker appears (progress). The store is looked at every ``poll`` seconds (a batch is
    done once all its markers are there, without waiting for its run to end), the server asked for
    a child's state at most every ``state_poll`` seconds."""
    if not pending:
        return
    path = Store(store_root).path(spec.folder, spec.key)
    workers = children.shard_workers() if fo.per_run == 0 else 0
    attempts = dict.fromkeys(pending, 0)
    live: dict[UUID, list[int]] = {}
    for batch in batches(pending, fo.per_run, workers):
        live[children.submit(batch, 0)] = batch
    print(f"set {spec.key}: {len(live)} shard runs submitted to deployment {fo.deployment} "
          f"({len(pending)} shards, up to {max(map(len, live.values()))} per run)")
    period = children.heartbeat_period()
    every = max(1.0, (period or 0) / 2)  # heartbeats are read at most this often per child
    checked: dict[UUID, float] = {}
    deadline = clock() + fo.timeout if fo.timeout else None
    reported: set[int] = set()

    def report(shards: list[int]) -> None:
        if on_done is not None:
            for s in sorted(set(shards) - reported):
                if shard_done(path, s):
                    reported.add(s)
                    on_done(s)

    read: dict[UUID, float] = {}  # when each child's state was last read
    while live:
        time.sleep(poll)
        report([s for shards in live.values() for s in shards])
        for run_id, shards in list(live.items()):
            if all(shard_done(path, s) for s in shards):
                del live[run_id]  # every marker is in the store: done, whatever the run does next (it
                report(shards)    # is ending; the zombie-run automation covers it if it dies now)
                continue
            if clock() - read.get(run_id, -math.inf) < state_poll:
                continue
            read[run_id] = clock()
            st = children.state(run_id)
            if not st.final:
                if not _lost(children, run_id, st, period, fo.heartbeat_multiple, every, checked, clock, now):
                    continue
                msg = (f"lost: no heartbeat for over {fo.heartbeat_multiple:g} x {period:.0f} s while {st.name} "
                       f"(its worker died with it); marked Crashed by the parent")
                children.mark_crashed(run_id, msg)
                print(f"{label(shards)} of {spec.key}: flow run {run_id} {msg}")
                st = RunState("CRASHED", "Crashed", msg, now(), True)
            del live[run_id]
            report(shards)  # markers written between the report above and the run's end
            left = [s for s in shards if not shard_done(path, s)]
            if not left:
                continue  # every marker is there (even if the run died after the last one)
            for s in left:
                attempts[s] += 1
            tries = max(attempts[s] for s in left)
            if tries > fo.retries:
                worst = next(s for s in left if attempts[s] == tries)
                raise RuntimeError(f"shard {worst} of set {spec.key} failed {tries} times "
                                   f"(last: {st.name}: {st.message}); see flow run {run_id}")
            print(f"{label(left)} of {spec.key} ended {st.name}; resubmitting (try {tries + 1})")
            live[children.submit(left, tries)] = left
        if deadline is not None and live and clock() > deadline:
            out = "; ".join(f"{label(s)} in flow run {r}" for r, s in live.items())
            raise TimeoutError(f"set {spec.key}: not done after fanout.timeout={fo.timeout:g} s: "
                               f"{out}; check the shard workers (are any online?) or raise the timeout")


def _lost(children: Children, run_id: UUID, st: RunState, period: float | None, multiple: float, every: float,
          checked: dict[UUID, float], clock: Callable[[], float], now: Callable[[], _dt.datetime]) -> bool:
    """``liveness.lost`` for one child, reading its heartbeat at most every ``every`` seconds."""
    if not lost(st.type, st.entered, None, now(), period, multiple):
        return False  # alive by its state's own timestamp: no need to ask for heartbeats
    if clock() - checked.get(run_id, -math.inf) < every:
        return False
    checked[run_id] = clock()
    return lost(st.type, st.entered, children.last_heartbeat(run_id), now(), period, multiple)


class PrefectChildren:
    """Children as flow runs of the ``deployment`` on the Prefect server of this flow run, each
    given the ``runtime`` settings (a plain dict)."""

    def __init__(self, client: Any, spec: StageSpec, store_root: str, deployment: str, runtime: dict[str, Any]):
        from prefect.context import get_run_context

        self.client, self.spec, self.store_root, self.deployment, self.runtime = (client, spec, store_root,
                                                                                  deployment, runtime)
        self.parent = get_run_context().flow_run.id
        self.since = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=5)

    def submit(self, shards: list[int], attempt: int) -> UUID:
        from prefect.deployments import run_deployment  # looked up per call, so tests can stand in

        run = run_deployment(self.deployment, timeout=0, as_subflow=True,
                             idempotency_key=f"{self.parent}:{self.spec.key}:{'+'.join(map(str, shards))}:{attempt}",
                             parameters={"spec": self.spec.as_dict(), "store_root": self.store_root,
                                         "shards": list(shards), "runtime": self.runtime})
        return run.id

    def state(self, run_id: UUID) -> RunState:
        s = self.client.read_flow_run(run_id).state
        if s is None:
            return RunState("SCHEDULED", "Scheduled", None, None, False)
        return RunState(s.type.value, s.name or s.type.value.title(), s.message, s.timestamp, s.is_final())

    def last_heartbeat(self, run_id: UUID) -> _dt.datetime | None:
        return last_heartbeat(self.client, run_id, self.since)

    def mark_crashed(self, run_id: UUID, message: str) -> None:
        mark_crashed(self.client, run_id, message)

    def heartbeat_period(self) -> float | None:
        return deployment_period(self.client, self.deployment)

    def shard_workers(self) -> int:
        """Online workers of the shard deployment's pool, less the controllers."""
        pool = self.client.read_deployment_by_name(self.deployment).work_pool_name
        if not pool:
            return 1
        workers = self.client.read_workers_for_work_pool(pool)
        return sum(1 for w in workers if str(getattr(w.status, "value", w.status)).upper() == "ONLINE"
                   and not w.name.startswith(CONTROL_WORKER_PREFIX))
