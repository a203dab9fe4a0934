"""The deployment fan-out's bookkeeping (flows.fanout), against scripted children instead of a
server: failed, crashed and lost children are resubmitted with a new idempotency key (scoped to
parent run, set, batch and try), each shard of a batch is its own retry unit, lost runs are marked
Crashed, the set's deadline names the shards and runs, and ``liveness.lost`` decides by heartbeat."""

import datetime as dt
import types
import uuid

import pytest

from advfeatures.config import ConfigError, resolve
from flows import fanout as F
from flows.settings import FanoutConfig
from flows.liveness import lost
from pipeline.plan import StageSpec
from storage import arrays as A
from storage.store import Store

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


class Clock:
    """Fake time: every poll advances it by ``step`` seconds."""

    def __init__(self, step=1.0):
        self.t, self.step = 0.0, step

    def tick(self):
        self.t += self.step
        return self.t

    def now(self):
        return T0 + dt.timedelta(seconds=self.t)


class FakeChildren:
    """Children whose runs end as scripted per (batch, try): 'COMPLETED' writes every marker,
    'PARTIAL' writes the first marker then crashes, 'LOST' stays Running with no heartbeat,
    'ENDING' writes every marker but stays Running (silent), anything else ends in that state with
    no new marker. ``reads`` counts the state reads (each one a request to the server)."""

    def __init__(self, path, script, clock, workers=2, period=10.0):
        self.path, self.script, self.clock, self.workers, self.period = path, script, clock, workers, period
        self.submitted, self.runs, self.crashed, self.tries, self.reads = [], {}, [], {}, 0

    def submit(self, shards, attempt):
        key = tuple(shards)
        n = self.tries.get(key, 0)
        self.tries[key] = n + 1
        self.submitted.append((list(shards), attempt))
        outcome = self.script.get((key, n), "COMPLETED")
        done = shards if outcome in ("COMPLETED", "ENDING") else shards[:1] if outcome == "PARTIAL" else []
        for s in done:
            A.marker_path(self.path, s).parent.mkdir(parents=True, exist_ok=True)
            A.marker_path(self.path, s).write_text("{}")
        run = uuid.uuid4()
        self.runs[run] = ("CRASHED" if outcome == "PARTIAL" else outcome, self.clock.now())
        return run

    def state(self, run_id):
        self.reads += 1
        name, since = self.runs[run_id]
        if name in ("LOST", "ENDING"):
            return F.RunState("RUNNING", "Running", None, since, False)
        return F.RunState(name, name.title(), "boom", since, True)

    def last_heartbeat(self, run_id):
        return self.runs[run_id][1] + dt.timedelta(seconds=1)  # one beat, then silence

    def mark_crashed(self, run_id, message):
        self.crashed.append(run_id)
        self.runs[run_id] = ("CRASHED", self.clock.now())

    def heartbeat_period(self):
        return self.period

    def shard_workers(self):
        return self.workers


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    spec = StageSpec("construct", {"kind": "det"}, ("d", "s"))
    root = str(tmp_path)
    path = Store(root).path(spec.folder, spec.key)
    clock = Clock()
    monkeypatch.setattr(F.time, "sleep", lambda s: clock.tick())

    def run(script, rt, pending, **kw):
        kids = FakeChildren(path, script, clock, **kw)
        F.fan_out(spec, root, rt, pending, kids, poll=1.0, clock=lambda: clock.t, now=clock.now)
        return kids

    return spec, path, run


def test_failed_and_crashed_children_are_resubmitted(setup):
    spec, path, run = setup
    kids = run({((1,), 0): "FAILED", ((2,), 0): "CRASHED", ((2,), 1): "FAILED"},
               FanoutConfig(retries=2, per_run=1), [0, 1, 2])
    assert sorted(map(tuple, (s for s, _ in kids.submitted))) == [(0,), (1,), (1,), (2,), (2,), (2,)]
    assert [a for s, a in kids.submitted if s == [2]] == [0, 1, 2]  # the try is in the idempotency key
    assert all(A.shard_done(path, s) for s in (0, 1, 2))


def test_gives_up_after_the_retries(setup):
    spec, path, run = setup
    with pytest.raises(RuntimeError, match="shard 0 of set .* failed 2 times"):
        run({((0,), 0): "FAILED", ((0,), 1): "FAILED"}, FanoutConfig(retries=1, per_run=1), [0, 1])


def test_completed_without_marker_counts_as_failed(setup, monkeypatch):
    """A child that reports success but left no marker (e.g. wrote elsewhere) is not trusted."""
    spec, path, run = setup
    monkeypatch.setattr(F, "shard_done", lambda p, s: False)
    with pytest.raises(RuntimeError, match="failed 1 times"):
        run({}, FanoutConfig(retries=0, per_run=1), [0])


def test_batches_split_pending_shards_over_the_shard_workers():
    assert F.batches([0, 1, 2, 3], 0, 2) == [[0, 1], [2, 3]]
    assert F.batches([0, 1, 2, 3, 4], 0, 2) == [[0, 1, 2], [3, 4]]
    assert F.batches([0, 1, 2], 0, 0) == [[0, 1, 2]]  # no worker online yet: one run, whoever takes it
    assert F.batches([0, 1, 2], 1, 2) == [[0], [1], [2]]
    assert F.batches([5, 7, 9], 2, 9) == [[5, 7], [9]]


def test_a_batch_resubmits_only_its_unfinished_shards(setup):
    """Each shard of a batch is its own marker and retry unit: a batch run that crashed after its
    first shard is resubmitted with the rest only."""
    spec, path, run = setup
    kids = run({((0, 1, 2), 0): "PARTIAL"}, FanoutConfig(retries=1, per_run=3), [0, 1, 2])
    assert kids.submitted == [([0, 1, 2], 0), ([1, 2], 1)]
    assert all(A.shard_done(path, s) for s in (0, 1, 2))


def test_auto_batches_give_every_online_shard_worker_one_run(setup):
    spec, path, run = setup
    kids = run({}, FanoutConfig(per_run=0), [0, 1, 2, 3], workers=2)
    assert kids.submitted == [([0, 1], 0), ([2, 3], 0)]


def test_a_batch_is_done_when_its_markers_are_there_without_waiting_for_its_run(setup):
    """The store decides: once every marker of a batch is written the set goes on, though its run
    is still Running (ending, or silent): no wait for its state, no Crashed mark, no resubmission."""
    spec, path, run = setup
    kids = run({((0, 1), 0): "ENDING", ((2, 3), 0): "ENDING"}, FanoutConfig(per_run=2), [0, 1, 2, 3],
               period=10.0)
    assert kids.submitted == [([0, 1], 0), ([2, 3], 0)] and kids.crashed == [] and kids.reads == 0


def test_a_lost_child_is_marked_crashed_and_resubmitted(setup, capsys):
    """Running, one heartbeat, then silence (its worker was SIGKILLed with it): after
    heartbeat_multiple periods it is marked Crashed and its shard resubmitted."""
    spec, path, run = setup
    kids = run({((1,), 0): "LOST"}, FanoutConfig(retries=1, per_run=1, heartbeat_multiple=3),
               [0, 1], period=10.0)
    assert kids.submitted == [([0], 0), ([1], 0), ([1], 1)]
    assert len(kids.crashed) == 1
    out = capsys.readouterr().out
    assert "lost: no heartbeat for over 3 x 10 s while Running" in out
    assert "shard 1 of" in out and "ended Crashed; resubmitting (try 2)" in out


def test_the_set_deadline_names_the_shard_and_its_run(setup):
    spec, path, run = setup
    with pytest.raises(TimeoutError, match=r"not done after fanout.timeout=5 s: shard 1 in flow run [0-9a-f-]+"):
        run({((1,), 0): "LOST"}, FanoutConfig(per_run=1, timeout=5), [0, 1], period=None)


@pytest.mark.parametrize("state, entered, beat, now, period, multiple, want", [
    ("RUNNING", 0, 50, 75, 10, 3, False),      # last beat 25 s ago < 30 s
    ("RUNNING", 0, 50, 81, 10, 3, True),       # 31 s > 3 periods
    ("RUNNING", 0, None, 31, 10, 3, True),     # never beat since it started running
    ("RUNNING", 0, None, 29, 10, 3, False),    # just started: its start counts as a sign of life
    ("PENDING", 0, None, 31, 10, 3, True),     # taken by a worker that died before starting it
    ("SCHEDULED", 0, None, 999, 10, 3, False),  # waiting for a worker is not lost
    ("COMPLETED", 0, None, 999, 10, 3, False),
    ("RUNNING", 0, None, 999, None, 3, False),  # heartbeats off: never judged
    ("RUNNING", 100, 50, 125, 10, 3, False),   # re-entered Running (a retry) after its last beat
])
def test_lost_decides_from_the_last_sign_of_life(state, entered, beat, now, period, multiple, want):
    at = lambda s: None if s is None else T0 + dt.timedelta(seconds=s)  # noqa: E731
    assert lost(state, at(entered), at(beat), at(now), period, multiple) is want


def test_fanout_settings_are_checked_and_the_old_names_refused():
    assert resolve("tiny", ["fanout.executor=deployment", "fanout.per_run=2"]).fanout == FanoutConfig("deployment",
                                                                                                       per_run=2)
    with pytest.raises(ConfigError, match="runtime.shard_executor is now fanout.executor"):
        resolve("tiny", ["runtime.shard_executor=deployment"])
    with pytest.raises(ConfigError, match="runtime.shards_per_run is now fanout.per_run"):
        resolve({"runtime": {"shards_per_run": 2}})
    with pytest.raises(ConfigError, match="fanout.executor=.ray.; choose local, deployment or dask"):
        resolve("tiny", ["fanout.executor=ray"])
    with pytest.raises(ConfigError, match="heartbeat_multiple must be > 1"):
        FanoutConfig(heartbeat_multiple=1)
    with pytest.raises(ConfigError, match="fanout.per_run must be >= 0"):
        FanoutConfig(per_run=-1)
    with pytest.raises(ConfigError, match="fanout.timeout must be >= 0"):
        FanoutConfig(timeout=-1)


def _flow_run_event(name, run, tags=("advfeatures",)):
    """An event about flow run ``run`` as the server receives it, its tags as related resources."""
    from prefect.events.related import tags_as_related_resources
    from prefect.server.events.schemas.events import ReceivedEvent

    return ReceivedEvent(occurred=T0, event=name, resource={"prefect.resource.id": f"prefect.flow-run.{run}"},
                         related=[dict(r) for r in tags_as_related_resources(tags)], id=uuid.uuid4())


def test_zombie_automation_crashes_a_tagged_run_after_the_same_silence_as_lost():
    """The automation as the server reads it (Prefect's server schema, its own event matching): it
    judges every flow run of ours and no other, each run on its own; any sign of life ``lost``
    counts (a heartbeat, entering Pending or Running) arms it and postpones it, a final state ends
    it; it fires when nothing came for as long as ``lost`` waits, and sets the run Crashed."""
    from prefect.client.schemas.objects import TERMINAL_STATES, StateType
    from prefect.server.events.schemas.automations import AutomationCore as ServerAutomation

    from flows.liveness import ALIVE_STATES, zombie_automation

    run, other_run = uuid.uuid4(), uuid.uuid4()
    for period, multiple in ((30, 3), (3, 5)):
        auto = ServerAutomation.model_validate(zombie_automation(period, multiple).model_dump(mode="json"))
        trig = auto.trigger
        heartbeat = _flow_run_event("prefect.flow-run.heartbeat", run)
        assert trig.covers(heartbeat) and trig.covers(_flow_run_event("prefect.flow-run.Running", run,
                                                                       tags=("advfeatures", "shard")))
        assert not trig.covers(_flow_run_event("prefect.flow-run.heartbeat", run, tags=("someone-else",)))
        assert not trig.covers(_flow_run_event("prefect.flow-run.heartbeat", run, tags=()))
        assert trig.bucketing_key(heartbeat) != trig.bucketing_key(_flow_run_event("prefect.flow-run.heartbeat",
                                                                                   other_run))
        alive = ["prefect.flow-run.heartbeat"] + [f"prefect.flow-run.{s.title()}" for s in ALIVE_STATES]
        assert all(trig.starts_after(e) and trig.expects(e) for e in alive), alive
        final = [f"prefect.flow-run.{s.value.title()}" for s in TERMINAL_STATES]
        assert all(trig.expects(e) and not trig.starts_after(e) for e in final), final
        assert not trig.starts_after("prefect.flow-run.Scheduled")  # waiting for a worker is not life
        assert trig.posture == "Proactive" and trig.meets_threshold(0) and not trig.meets_threshold(1)
        # it fires after the silence that `lost` calls lost, for a Running and a Pending run alike
        within = trig.within.total_seconds()
        for state in ALIVE_STATES:
            assert not lost(state, T0, T0, T0 + dt.timedelta(seconds=within - 0.5), period, multiple)
            assert lost(state, T0, T0, T0 + dt.timedelta(seconds=within + 0.5), period, multiple)
        (action,) = auto.actions
        assert action.type == "change-flow-run-state" and action.state == StateType.CRASHED
        assert action.force and "no heartbeat" in action.message  # a Running run is moved, and says why


def test_zombie_automation_keeps_prefects_floor_on_the_window():
    """Shorter than Prefect's 10-s floor for proactive triggers: the window is the floor, not an
    automation the server refuses."""
    from prefect.events.schemas.automations import EventTrigger, Posture

    from flows.liveness import zombie_automation

    with pytest.raises(ValueError, match="10 seconds"):
        EventTrigger(posture=Posture.Proactive, within=dt.timedelta(seconds=6))
    assert zombie_automation(2, 3).trigger.within == dt.timedelta(seconds=10)


def test_installing_the_zombie_automation_replaces_one_of_the_same_name():
    from flows.liveness import ZOMBIE_AUTOMATION, install_zombie_automation

    class Client:
        deleted, created = [], []

        def read_automations_by_name(self, name):
            return [types.SimpleNamespace(id=f"old-{i}", name=name) for i in range(2)]

        def delete_automation(self, automation_id):
            self.deleted.append(automation_id)

        def create_automation(self, automation):
            self.created.append(automation)
            return "new"

    c = Client()
    assert install_zombie_automation(c, 3, 5) == "new"
    assert c.deleted == ["old-0", "old-1"] and [a.name for a in c.created] == [ZOMBIE_AUTOMATION]
    assert c.created[0].trigger.within == dt.timedelta(seconds=15)


def test_prefect_children_name_their_idempotency_keys(monkeypatch):
    """The real submit: key = parent run : set : batch : try; parameters carry the batch."""
    import prefect.context
    import prefect.deployments

    parent, calls = uuid.uuid4(), []
    monkeypatch.setattr(prefect.context, "get_run_context",
                        lambda: types.SimpleNamespace(flow_run=types.SimpleNamespace(id=parent)))
    monkeypatch.setattr(prefect.deployments, "run_deployment",
                        lambda *a, **k: calls.append(k) or types.SimpleNamespace(id=uuid.uuid4()))
    spec = StageSpec("construct", {"kind": "det"}, ("d", "s"))
    kids = F.PrefectChildren(None, spec, "/store", "generate-shard/generate-shard", {"threads": 1})
    kids.submit([3, 4], 2)
    assert calls[0]["idempotency_key"] == f"{parent}:{spec.key}:3+4:2"
    assert calls[0]["parameters"]["shards"] == [3, 4] and calls[0]["as_subflow"] and calls[0]["timeout"] == 0


def test_every_shard_is_reported_once_even_when_its_marker_lands_as_the_run_ends(setup, tmp_path, monkeypatch):
    """Progress: ``on_done`` once per shard, also for markers written between the poll's report
    and the run's final state (here: written when the state is read)."""
    spec, path, _ = setup
    clock = Clock()
    monkeypatch.setattr(F.time, "sleep", lambda s: clock.tick())

    class LateMarkers(FakeChildren):
        def submit(self, shards, attempt):
            run = super().submit(shards, attempt)
            for s in shards:  # undo the markers: they land only when the run is seen finished
                A.marker_path(self.path, s).unlink(missing_ok=True)
            self.late = {**getattr(self, "late", {}), run: list(shards)}
            return run

        def state(self, run_id):
            for s in self.late.pop(run_id, []):
                A.marker_path(self.path, s).parent.mkdir(parents=True, exist_ok=True)
                A.marker_path(self.path, s).write_text("{}")
            return super().state(run_id)

    done = []
    kids = LateMarkers(path, {}, clock)
    F.fan_out(spec, str(tmp_path), FanoutConfig(per_run=2), [0, 1, 2, 3], kids, poll=1.0,
              clock=lambda: clock.t, now=clock.now, on_done=done.append)
    assert sorted(done) == [0, 1, 2, 3]
