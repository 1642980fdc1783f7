"""Prefect's own machinery for a schedule nobody watches: heartbeats, a run whose heartbeats
stop marked Crashed, and notifications where the team looks.

- Flow runs send `prefect.flow-run.heartbeat` every `alerts.heartbeat_seconds`
  (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, which Prefect 3.9 floors at 30 s): `heartbeats()` sets it
  for the flows this process runs or serves.
- `ensure_automations()` creates or updates, by name, the automations on the Prefect server:
  the zombie one (Prefect's documented proactive trigger: no flow-run event within
  `crashed_after_heartbeats` periods of a heartbeat -> Crashed) and, when a notification target
  is configured, one for failed/crashed runs of the project's flows and one for the pipeline's
  own events (`pipeline/events.py`: promoted, challenger, rolled back, drift).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any
from uuid import UUID

from pipeline.config import Params

ZOMBIE = "moco-pipeline: crashed when heartbeats stop"
RUN_FAILED = "moco-pipeline: notify on a failed or crashed run"
MODEL_EVENTS = "moco-pipeline: notify on model and drift events"
FLOWS = ("retrain", "sweep")  # the project's flows (flows/<name>.py:<name>)
EVENT_PREFIX = "moco-pipeline."  # pipeline/events.py names every event it emits with this
WEBHOOK_BLOCK = "moco-pipeline-webhook"
SLACK_BLOCK = "moco-pipeline-slack"

RUN_BODY = (
    "Flow run {{ flow.name }}/{{ flow_run.name }} entered {{ flow_run.state.name }} at "
    "{{ flow_run.state.timestamp }}.\n"
    "Flow run ID: {{ flow_run.id }}\n"
    "State message: {{ flow_run.state.message }}"
)
EVENT_BODY = "{{ event.payload.message }}\nEvent: {{ event.event }} ({{ event.id }})"


def api_url() -> str | None:
    """The Prefect server this process talks to (None: the ephemeral one, which keeps no
    automations and is gone when the process ends)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


@contextmanager
def heartbeats(params: Params) -> Iterator[None]:
    """Flow runs started (or served) inside this block send heartbeats every
    `alerts.heartbeat_seconds`; a served deployment's runs inherit the setting."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: params.alerts.heartbeat_seconds}):
        yield


def zombie_window(params: Params) -> timedelta:
    alerts = params.alerts
    return timedelta(seconds=alerts.heartbeat_seconds * alerts.crashed_after_heartbeats)


def build_automations(params: Params, blocks: list[UUID]) -> list[Any]:
    """The automations as Prefect objects: the zombie one always, the notifying ones when
    `blocks` (notification block document ids) is not empty."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState, SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    window = zombie_window(params)
    automations = [
        AutomationCore(
            name=ZOMBIE,
            description=(
                f"A flow run with no event within {int(window.total_seconds())} s of its last "
                "heartbeat lost its process (SIGKILL, OOM, a lost node): mark it Crashed."
            ),
            trigger=EventTrigger(
                after={"prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.*"},
                match={"prefect.resource.id": "prefect.flow-run.*"},
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive,
                threshold=1,
                within=window,
            ),
            actions=[
                ChangeFlowRunState(
                    state=StateType.CRASHED,
                    message=f"No heartbeat for {int(window.total_seconds())} s: the flow's "
                    "process is gone (marked by the zombie automation)",
                )
            ],
        )
    ]
    if not blocks:
        return automations
    notify = lambda subject, body: [  # noqa: E731
        SendNotification(block_document_id=block, subject=subject, body=body) for block in blocks
    ]
    automations += [
        AutomationCore(
            name=RUN_FAILED,
            description=f"A run of {', '.join(FLOWS)} failed or crashed.",
            trigger=EventTrigger(
                expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOWS},
                posture=Posture.Reactive,
                threshold=1,
            ),
            actions=notify(
                "moco-pipeline: {{ flow.name }} run {{ flow_run.name }} {{ flow_run.state.name }}",
                RUN_BODY,
            ),
        ),
        AutomationCore(
            name=MODEL_EVENTS,
            description="Promotion, kept as challenger, rollback, drift alarm.",
            trigger=EventTrigger(
                expect={f"{EVENT_PREFIX}*"},
                match={"prefect.resource.id": f"{EVENT_PREFIX}*"},
                posture=Posture.Reactive,
                threshold=1,
            ),
            actions=notify("moco-pipeline: {{ event.payload.title }}", EVENT_BODY),
        ),
    ]
    return automations


def notification_blocks(params: Params) -> list[UUID]:
    """The configured notification targets as block documents on the server (saved, or
    overwritten, under fixed names; an existing block is looked up by slug/name)."""
    from prefect.blocks.core import Block
    from prefect.blocks.notifications import CustomWebhookNotificationBlock, SlackWebhook

    alerts, ids = params.alerts, []
    if alerts.webhook_url:
        block = CustomWebhookNotificationBlock(
            name=WEBHOOK_BLOCK,
            url=alerts.webhook_url,
            json_data={"subject": "{{subject}}", "body": "{{body}}", "text": "{{body}}"},
        )
        ids.append(block.save(WEBHOOK_BLOCK, overwrite=True))
    if alerts.slack_webhook_url:
        ids.append(SlackWebhook(url=alerts.slack_webhook_url).save(SLACK_BLOCK, overwrite=True))
    if alerts.block:
        try:
            ids.append(Block.load(alerts.block)._block_document_id)
        except ValueError as error:
            raise ValueError(
                f"alerts.block: {alerts.block!r} is not a block on {api_url()} ({error}); "
                "create it (`prefect block create ...`) or fix alerts.block"
            ) from None
    return ids


def ensure_automations(params: Params) -> list[str]:
    """Create or update (same name: updated, never duplicated) the project's automations on
    the Prefect server at PREFECT_API_URL, and the MLflow registry webhook where the tracking
    server takes one; returns one line per thing done or skipped."""
    from prefect.client.orchestration import get_client

    from pipeline.preflight import require_answer
    from pipeline.registry_webhooks import ensure_registry_webhook

    url = api_url()
    if url is None:
        raise ValueError(
            "PREFECT_API_URL is not set: automations live on a Prefect server; start one "
            "(`prefect server start`) and set PREFECT_API_URL"
        )
    require_answer(f"PREFECT_API_URL={url}", url, "start the server or fix PREFECT_API_URL")
    lines, wanted = [], build_automations(params, notification_blocks(params))
    with get_client(sync_client=True) as client:
        for automation in wanted:
            found = client.read_automations_by_name(automation.name)
            if found:
                client.update_automation(found[0].id, automation)
                for duplicate in found[1:]:
                    client.delete_automation(duplicate.id)
                lines.append(f"automation updated: {automation.name}")
            else:
                client.create_automation(automation)
                lines.append(f"automation created: {automation.name}")
        for name in {ZOMBIE, RUN_FAILED, MODEL_EVENTS} - {a.name for a in wanted}:
            for stale in client.read_automations_by_name(name):  # no target configured now
                client.delete_automation(stale.id)
                lines.append(f"automation removed (no alerts target): {name}")
    return [*lines, ensure_registry_webhook(params)]


def ensure_if_server(params: Params) -> list[str]:
    """For `python -m flows`: a run started by hand against a server is covered too; the
    ephemeral server keeps nothing, so there is nothing to ensure there."""
    return ensure_automations(params) if api_url() else []
