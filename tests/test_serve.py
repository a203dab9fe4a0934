"""`advfeatures serve` and `deploy`: prefect.yaml's deployments served through Prefect's public
API (``prefect.serve``), their schedules kept. A served run end to end, its shards on Dask, each its
own task run: test_flow (it starts from that module's first run)."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_served_deployments_are_prefect_yamls_with_their_schedules():
    import yaml

    from flows.serve import SERVED, runner_deployments

    spec = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert set(spec) == set(SERVED)  # no shard deployment any more
    served = {d.name: d for d in runner_deployments()}
    assert set(served) == set(spec)
    for name, d in served.items():
        assert d.tags == spec[name]["tags"] and d.parameters == spec[name]["parameters"]
        want = [(s["cron"], s.get("active", True)) for s in spec[name].get("schedules") or []]
        assert [(s.schedule.cron, s.active) for s in d.schedules] == want
    assert served["replicate"].schedules  # the weekly rerun, inactive until enabled in the UI


def test_a_deployment_override_cannot_drop_the_served_executor(tiny_tar, monkeypatch):
    """ADVFEATURES_SET (what serve and the compose stack set) sits below a run's overrides: a run
    with overrides of its own still sends its shards to Dask; runtime.threads may come from there
    too (a host's share of CPUs per worker process); a setting outside fanout.*/dask.* and
    runtime.threads is refused there (it could change a result without entering the parameters)."""
    from advfeatures.config import ConfigError, resolve

    monkeypatch.setenv("ADVFEATURES_SET", "fanout.executor=dask dask.address=tcp://h:8786")
    cfg = resolve("tiny", ["attack.steps=2"], data=str(tiny_tar))
    assert (cfg.fanout.executor, cfg.dask.address, cfg.attack.steps) == ("dask", "tcp://h:8786", 2)
    assert resolve("tiny", ["fanout.executor=local"], data=str(tiny_tar)).fanout.executor == "local"
    monkeypatch.setenv("ADVFEATURES_SET", "runtime.threads=3")
    assert resolve("tiny", [], data=str(tiny_tar)).runtime.threads == 3
    assert resolve("tiny", ["runtime.threads=4"], data=str(tiny_tar)).runtime.threads == 4
    for other in ("attack.steps=9", "runtime.device=cuda"):
        monkeypatch.setenv("ADVFEATURES_SET", other)
        with pytest.raises(ConfigError, match="not a fanout.., dask.. or runtime.threads setting"):
            resolve("tiny", [], data=str(tiny_tar))


def test_the_zombie_automation_crashes_tagged_runs_silent_for_k_periods():
    """The automation's rule, as Prefect will apply it: after a sign of life of a run tagged
    advfeatures, another (or a final state) within multiple x period seconds, else Crashed."""
    from prefect.client.schemas.objects import StateType

    from flows.liveness import HEARTBEAT_TAG, zombie_automation

    a = zombie_automation(30, 3)
    assert a.trigger.within.total_seconds() == 90 and a.trigger.posture.value == "Proactive"
    assert "prefect.flow-run.heartbeat" in a.trigger.after and "prefect.flow-run.Completed" in a.trigger.expect
    assert f"prefect.tag.{HEARTBEAT_TAG}" in str(a.trigger.match_related)
    assert a.actions[0].state == StateType.CRASHED
    assert zombie_automation(30, 0.1).trigger.within.total_seconds() == 10  # Prefect's floor


def test_a_cli_runs_flows_send_heartbeats_only_when_a_period_is_set():
    """`advfeatures run` turns off Prefect's default heartbeat (180 s): no automation judges an
    untagged CLI run, and Prefect's engine waits up to 1 s for the heartbeat thread at the end of
    every flow run. A period the user set (environment or profile) is kept, and so is serve's."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY as H, get_current_settings, temporary_settings

    from flows.liveness import heartbeats_unless_asked

    def period():  # what Prefect's flow engine reads when a flow run starts
        return get_current_settings().flows.heartbeat_frequency

    assert period() is not None  # Prefect's default beats
    with heartbeats_unless_asked():
        assert period() is None
    with temporary_settings(updates={H: 60}), heartbeats_unless_asked():
        assert period() == 60


@pytest.mark.slow
def test_deploy_registers_the_pool_the_deployments_and_the_automation(prefect_api, monkeypatch):
    """`advfeatures deploy` on a server: the process pool, prefect.yaml's deployments (their runs
    beating every --heartbeat seconds) and one zombie automation, also once it is installed again
    (a redeploy replaces it)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.liveness import HEARTBEAT_ENV, ZOMBIE_AUTOMATION, install_zombie_automation
    from flows.serve import POOL, deploy

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        deploy(heartbeat=45)
        with get_client(sync_client=True) as client:
            install_zombie_automation(client, 45, 3)  # what a second deploy does last
            assert client.read_work_pool(POOL).type == "process"
            for name in ("replicate/replicate", "experiment/experiment"):
                d = client.read_deployment_by_name(name)
                assert d.work_pool_name == POOL and d.job_variables["env"][HEARTBEAT_ENV] == "45"
            assert len(client.read_automations_by_name(ZOMBIE_AUTOMATION)) == 1


def test_the_server_serve_starts_has_a_ui_that_asks_its_own_port():
    """Without PREFECT_UI_API_URL the UI of a server on another port than 4200 asks 4200's API
    (seen: the flow-run page said "Something went wrong")."""
    from flows.serve import server_command

    cmd, env = server_command("127.0.0.1", 4300)
    assert cmd[-4:] == ["--host", "127.0.0.1", "--port", "4300"]
    assert env["PREFECT_UI_API_URL"] == "http://127.0.0.1:4300/api"
