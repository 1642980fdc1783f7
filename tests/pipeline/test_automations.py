"""The automations and heartbeats as built from params.yaml, without a server (the real server
runs in tests/integration/test_alerts.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.automations import MODEL_EVENTS, RUN_FAILED, ZOMBIE, build_automations, heartbeats
from pipeline.cli import app
from pipeline.config import ConfigError, load_params

ROOT = Path(__file__).resolve().parents[2]


def test_zombie_automation_waits_the_configured_heartbeats_then_crashes_the_run() -> None:
    params = load_params(None, ["alerts.heartbeat_seconds=45", "alerts.crashed_after_heartbeats=4"])
    (zombie,) = build_automations(params, [])  # no notification target: the zombie one only
    assert zombie.name == ZOMBIE
    trigger = zombie.trigger
    assert trigger.posture == "Proactive" and trigger.within.total_seconds() == 180
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert trigger.for_each == {"prefect.resource.id"}  # each run on its own
    (action,) = zombie.actions
    assert (action.type, action.state.value) == ("change-flow-run-state", "CRASHED")


def test_each_notifying_automation_sends_to_every_block() -> None:
    blocks = [uuid.uuid4(), uuid.uuid4()]
    built = {a.name: a for a in build_automations(load_params(None), blocks)}
    assert set(built) == {ZOMBIE, RUN_FAILED, MODEL_EVENTS}
    for name in (RUN_FAILED, MODEL_EVENTS):
        assert [action.block_document_id for action in built[name].actions] == blocks
    expected = {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    assert built[RUN_FAILED].trigger.expect == expected


def test_runs_inside_heartbeats_send_them_at_the_configured_period() -> None:
    from prefect.settings import get_current_settings

    with heartbeats(load_params(None, ["alerts.heartbeat_seconds=45"])):
        settings = get_current_settings()
        assert settings.flows.heartbeat_frequency == 45  # what the flow engine reads
        # what a served deployment's runner passes to each run's process
        env = settings.to_environment_variables(exclude_unset=True)
        assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "45"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("alerts.heartbeat_seconds=10", "alerts.heartbeat_seconds"),  # Prefect's floor is 30 s
        ("alerts.crashed_after_heartbeats=1", "alerts.crashed_after_heartbeats"),
        ("alerts.block=team-alerts", "alerts.block"),
        ("alerts.webhook_url=hooks.example.com", "alerts.webhook_url"),
    ],
)
def test_bad_alert_settings_are_refused_naming_the_key(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_params(None, [override])


def test_prefect_yaml_deployments_beat_as_params_yaml_says_and_set_up_the_automations() -> None:
    manifest = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    period = load_params(ROOT / "params.yaml").alerts.heartbeat_seconds
    for deployment in manifest["deployments"]:
        env = deployment["work_pool"]["job_variables"]["env"]
        assert int(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) == period, deployment["name"]
    (step,) = manifest["build"]
    assert "mocopipe automations" in step["prefect.deployments.steps.run_shell_script"]["script"]


def test_automations_without_a_server_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.chdir(tmp_path)
    with temporary_settings({PREFECT_API_URL: None}):
        result = CliRunner().invoke(app, ["automations"])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert "PREFECT_API_URL is not set" in line
