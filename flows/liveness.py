"""Runs whose process died: Prefect's flow-run heartbeats and its zombie-run automation.

A flow-run process emits a ``prefect.flow-run.heartbeat`` event every
PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (Prefect raises shorter periods to 30 s). When a run's
process is SIGKILLed, nobody reports the run Crashed: it would stay Running. Prefect's own answer,
an automation on the server, covers it: after a sign of life (a heartbeat, entering Pending or
Running), expect another or a final state within ``multiple`` periods, else set the run Crashed;
for every run of our deployments (tag ``HEARTBEAT_TAG``), so the UI never shows a dead run as
Running. ``advfeatures serve`` and ``advfeatures deploy`` install it, through Prefect's public
automations API. A dead shard is Dask's to rerun (``flows.dask_shards``), not Prefect's.
"""

from __future__ import annotations

import datetime as _dt
from contextlib import contextmanager
from typing import Any, Iterator
from uuid import UUID

HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
MIN_PERIOD = 30
"""Prefect's floor on the heartbeat period (seconds): shorter settings are raised to it."""
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
HEARTBEAT_TAG = "advfeatures"
"""Every run of our deployments carries it (prefect.yaml; subflows inherit it): the runs whose
heartbeat period ``deploy`` controls, and so the runs the zombie automation may judge."""
ZOMBIE_AUTOMATION = "advfeatures: crash runs whose heartbeats stopped"
FINAL_EVENTS = ("Completed", "Failed", "Cancelled", "Crashed", "TimedOut", "Paused", "Suspended")
SIGNS_OF_LIFE = (HEARTBEAT_EVENT, "prefect.flow-run.Pending", "prefect.flow-run.Running")
"""A heartbeat, or entering an alive state. Entering Pending arms the automation too, so a run
whose process died before it ever beat is not left Pending for ever."""


@contextmanager
def heartbeats_unless_asked() -> Iterator[None]:
    """No Prefect heartbeat (by default one every 180 s) unless a period was set (environment or
    profile; serve and deploy set one): no automation judges an untagged CLI run, and Prefect's
    engine waits up to 1 s for the heartbeat thread at the end of every flow run."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    asked = "heartbeat_frequency" in get_current_settings().flows.model_fields_set
    with temporary_settings(updates={} if asked else {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def check_heartbeat(period: int, multiple: float) -> None:
    if period < MIN_PERIOD or multiple <= 1:
        raise ValueError(f"--heartbeat {period} --heartbeat-multiple {multiple:g}: the period must be >= "
                         f"{MIN_PERIOD} s (Prefect's minimum) and the multiple > 1")


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
