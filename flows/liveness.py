"""Is a flow run still alive? Prefect's flow-run heartbeats, read two ways.

A flow-run process emits a ``prefect.flow-run.heartbeat`` event every
PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (>= 30 in Prefect; ``advfeatures deploy`` sets it on
our deployments). When a worker is SIGKILLed together with the run it was executing, nobody
reports the run Crashed: it stays Running, and a parent waiting on it would wait forever. So:

- ``lost`` (pure): a run is lost when it is Running (or Pending on a worker) and its newest sign
  of life (its last heartbeat, or the moment it entered that state) is older than ``multiple``
  heartbeat periods. The shard fan-out (``flows.fanout``) applies it to its children, marks a
  lost child Crashed and resubmits its shards.
- ``zombie_automation``: Prefect's own version of the same rule on the server (a proactive
  trigger: after a sign of life, a heartbeat or entering Pending or Running, expect another or a
  final state within ``multiple`` periods, else set the run Crashed), for every run of our
  deployments (tag ``HEARTBEAT_TAG``),
  so an orphaned ``replicate`` run is marked Crashed too and the UI never shows a dead run as
  Running. ``advfeatures deploy`` creates it.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any
from uuid import UUID

HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
HEARTBEAT_TAG = "advfeatures"
"""Every run of our deployments carries it (prefect.yaml; subflows inherit it): the runs whose
heartbeat period ``deploy`` controls, and so the runs the zombie automation may judge."""
ZOMBIE_AUTOMATION = "advfeatures: crash runs whose heartbeats stopped"
ALIVE_STATES = ("RUNNING", "PENDING")
FINAL_EVENTS = ("Completed", "Failed", "Cancelled", "Crashed", "TimedOut", "Paused", "Suspended")
SIGNS_OF_LIFE = (HEARTBEAT_EVENT, "prefect.flow-run.Pending", "prefect.flow-run.Running")
"""What ``lost`` counts as life, as events: a heartbeat, or entering an alive state. Entering
Pending arms the automation too, so a run whose process died before it ever beat (a subflow
created Pending just before its controller was killed) is not left Pending for ever."""


def lost(state_type: str, entered: _dt.datetime | None, last_heartbeat: _dt.datetime | None,
         now: _dt.datetime, period: float | None, multiple: float) -> bool:
    """True when a run in ``state_type`` (Prefect's StateType value) has shown no sign of life for
    more than ``multiple * period`` seconds at ``now``. Signs of life: ``last_heartbeat`` and
    ``entered`` (when it entered its current state; a run that just started has not beaten yet).
    Scheduled runs (waiting for a worker) and final runs are never lost; without a known
    ``period`` (heartbeats off) nothing is."""
    if state_type not in ALIVE_STATES or not period:
        return False
    seen = [t for t in (entered, last_heartbeat) if t is not None]
    if not seen:
        return False
    return (now - max(seen)).total_seconds() > multiple * period


def min_period() -> int:
    """Prefect's floor on the heartbeat period (seconds): shorter settings are raised to it."""
    from prefect import flow_engine

    return int(getattr(flow_engine, "MINIMUM_HEARTBEAT_INTERVAL", 30))  # not public API: 30 in prefect 3.4-3.9


def deployment_period(client: Any, deployment: str) -> float | None:
    """The heartbeat period of a deployment's runs: its job variables' PREFECT_FLOWS_HEARTBEAT_FREQUENCY
    (set by ``advfeatures deploy``), else Prefect's setting here (its default, 180 s, unless this
    process sets it), as a worker started without it would use. None when heartbeats are off."""
    from prefect.settings import get_current_settings

    env = (client.read_deployment_by_name(deployment).job_variables or {}).get("env") or {}
    value = env.get(HEARTBEAT_ENV) or get_current_settings().flows.heartbeat_frequency
    return max(float(value), min_period()) if value else None


def last_heartbeat(client: Any, run_id: UUID, since: _dt.datetime) -> _dt.datetime | None:
    """When the newest heartbeat event of a flow run occurred (events API), or None."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    page = client.read_events(filter=EventFilter(
        occurred=EventOccurredFilter(since=since),
        event=EventNameFilter(name=[HEARTBEAT_EVENT]),
        resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"])), limit=1)
    return max((e.occurred for e in page.events), default=None)


def mark_crashed(client: Any, run_id: UUID, message: str) -> None:
    from prefect.states import Crashed

    client.set_flow_run_state(run_id, Crashed(message=message), force=True)


def zombie_automation(period: float, multiple: float) -> Any:
    """The automation: after a sign of life of a tagged run (SIGNS_OF_LIFE), expect another (or a
    final state) within ``multiple * period`` seconds (at least 10, Prefect's floor), else set it
    Crashed."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    within = max(10.0, multiple * period)
    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description=(f"Marks a run of the advfeatures deployments Crashed when it has sent no heartbeat for "
                     f"{within:.0f} s ({multiple:g} periods of {period:.0f} s): its process died without "
                     "reporting (SIGKILL, lost host)."),
        trigger=EventTrigger(
            after=set(SIGNS_OF_LIFE),
            expect={*SIGNS_OF_LIFE, *(f"prefect.flow-run.{s}" for s in FINAL_EVENTS)},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{HEARTBEAT_TAG}"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=_dt.timedelta(seconds=within)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, force=True,
                                    message=f"no heartbeat for {within:.0f} s: the run's process died "
                                            "without reporting (see docs/scale.md, 'When a process dies')")])


def install_zombie_automation(client: Any, period: float, multiple: float) -> UUID:
    """Create the automation, replacing one of the same name (a redeploy with other settings)."""
    for old in client.read_automations_by_name(ZOMBIE_AUTOMATION):
        client.delete_automation(old.id)
    return client.create_automation(zombie_automation(period, multiple))
