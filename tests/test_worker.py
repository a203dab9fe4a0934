"""flows.worker's wake-up logic with a stand-in worker (the real one runs under serve in
tests/test_deployment.py, whose workers poll every 45 s, so its runs are taken on events).

The worker's sleeps run on a virtual clock that only the test moves, so what happens within a
settle period does not depend on how busy the machine is."""

import asyncio

from flows import worker as W


class FakeWorker:
    def __init__(self, free=1, setup=True):
        self.is_setup, self.free, self.queries = setup, free, 0

    @property
    def limiter(self):
        outer = self

        class L:
            @property
            def available_tokens(self):
                return outer.free
        return L()

    async def get_and_submit_flow_runs(self):
        self.queries += 1
        return []


async def _let_tasks_run():
    for _ in range(10):  # a woken task runs to its next await within a few loop turns
        await asyncio.sleep(0)


class Clock:
    """Virtual time for flows.worker: its ``asyncio.sleep(s)`` ends when ``run_until`` passes now + s."""

    def __init__(self):
        self.now, self.sleepers = 0.0, []

    async def sleep(self, seconds):
        fut = asyncio.get_running_loop().create_future()
        self.sleepers.append((self.now + seconds, fut))
        await fut

    async def run_until(self, t):
        await _let_tasks_run()
        while due := [s for s in self.sleepers if s[0] <= t]:
            first = min(due, key=lambda s: s[0])
            self.sleepers.remove(first)
            self.now = first[0]
            if not first[1].done():
                first[1].set_result(None)
            await _let_tasks_run()
        self.now = t


class _VirtualAsyncio:
    def __init__(self, clock):
        self.sleep = clock.sleep

    def __getattr__(self, name):
        return getattr(asyncio, name)


def _clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(W, "asyncio", _VirtualAsyncio(clock))
    return clock


async def _drive(clock, worker, bursts, settle=0.5):
    """Bursts of events, each spread over less than a settle period, 10 periods apart."""
    wake = asyncio.Event()
    task = asyncio.create_task(W._take_when_woken(worker, wake, settle=settle))
    for n in bursts:
        for _ in range(n):
            wake.set()
            await clock.run_until(clock.now + settle / 10)
        await clock.run_until(clock.now + 10 * settle)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_a_burst_of_events_is_one_query(monkeypatch):
    w = FakeWorker()
    asyncio.run(_drive(_clock(monkeypatch), w, [5, 1, 3]))
    assert w.queries == 3  # one per burst, not one per event


def test_the_query_waits_for_the_settle_period(monkeypatch):
    clock, w = _clock(monkeypatch), FakeWorker()

    async def main():
        wake = asyncio.Event()
        task = asyncio.create_task(W._take_when_woken(w, wake, settle=0.5))
        wake.set()
        await clock.run_until(0.49)
        before = w.queries
        await clock.run_until(0.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return before

    assert asyncio.run(main()) == 0 and w.queries == 1


def test_a_busy_or_unready_worker_does_not_query(monkeypatch):
    busy, unready = FakeWorker(free=0), FakeWorker(setup=False)
    asyncio.run(_drive(_clock(monkeypatch), busy, [1, 1]))
    asyncio.run(_drive(_clock(monkeypatch), unready, [1, 1]))
    assert busy.queries == 0 and unready.queries == 0


def test_a_slot_freed_just_after_the_wake_is_used(monkeypatch):
    """The worker lost the race for the run whose Pending event woke it: its slot frees a moment
    later, and it still queries for the next run."""
    clock, w = _clock(monkeypatch), FakeWorker(free=0)

    async def main():
        wake = asyncio.Event()
        task = asyncio.create_task(W._take_when_woken(w, wake, settle=0.04))
        wake.set()
        await clock.run_until(0.06)  # after the settle: busy, looking again every 0.02 s
        assert w.queries == 0
        w.free = 1
        await clock.run_until(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert w.queries == 1


def test_no_limit_is_never_busy():
    class NoLimit(FakeWorker):
        @property
        def limiter(self):
            raise RuntimeError("Worker has not been correctly initialized")

    assert not W._busy(NoLimit())


def test_this_prefects_worker_has_the_internals_the_wake_ups_use():
    """Fails on a Prefect release that renamed them: the worker then only polls (see the next test)."""
    from prefect.workers.process import ProcessWorker

    assert W.missing_internals(ProcessWorker(work_pool_name="p")) == []


def test_a_worker_without_the_internals_falls_back_to_polling(monkeypatch, caplog):
    """No wake-up helpers (nothing calls the missing members), a warning naming them, and the
    worker's own start (its polling loop) still runs."""
    import logging

    class Bare:
        def __init__(self, **kw):
            self.started = False

        async def start(self, printer=print):
            self.started = True

    made = []
    monkeypatch.setattr("prefect.workers.process.ProcessWorker", lambda **kw: made.append(Bare(**kw)) or made[-1])
    with caplog.at_level(logging.WARNING, logger="prefect.advfeatures.worker"):
        asyncio.run(W.run("pool", ["shards"], 1, "w"))
    assert made[0].started
    assert "get_and_submit_flow_runs, limiter, is_setup" in caplog.text and "polls only" in caplog.text
