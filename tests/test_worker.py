"""flows.worker's wake-up logic with a stand-in worker (the real one runs under serve in
tests/test_deployment.py, whose workers poll every 45 s, so its runs are taken on events)."""

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


async def _drive(worker, bursts, settle=0.02, between=0.2):
    wake = asyncio.Event()
    task = asyncio.create_task(W._take_when_woken(worker, wake, settle=settle))
    for n in bursts:
        for _ in range(n):
            wake.set()
            await asyncio.sleep(settle / 10)
        await asyncio.sleep(between)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_a_burst_of_events_is_one_query():
    w = FakeWorker()
    asyncio.run(_drive(w, [5, 1, 3]))
    assert w.queries == 3  # one per burst, not one per event


def test_a_busy_or_unready_worker_does_not_query():
    busy, unready = FakeWorker(free=0), FakeWorker(setup=False)
    asyncio.run(_drive(busy, [1, 1]))
    asyncio.run(_drive(unready, [1, 1]))
    assert busy.queries == 0 and unready.queries == 0


def test_a_slot_freed_just_after_the_wake_is_used():
    """The worker lost the race for the run whose Pending event woke it: its slot frees a moment
    later, and it still queries for the next run."""
    w = FakeWorker(free=0)

    async def main():
        wake = asyncio.Event()
        task = asyncio.create_task(W._take_when_woken(w, wake, settle=0.04))
        wake.set()
        await asyncio.sleep(0.06)  # after the settle: busy
        w.free = 1
        await asyncio.sleep(0.1)
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
