"""The pipeline's own Prefect events: what a team wants to be told (a promotion, a candidate
kept as `@challenger`, a rollback, a drift alarm), with the model version, the reason and the
metrics in the payload. The automations of pipeline/automations.py turn them into
notifications; the events also show in the Prefect UI's event feed, next to the flow runs."""

from __future__ import annotations

import math

from pipeline.automations import EVENT_PREFIX, api_url
from pipeline.config import Params
from pipeline.evaluation.keys import DRIFT_MMD, DRIFT_P
from pipeline.promote import Decision


def _decision_event(decision: Decision) -> tuple[str, str]:
    name, version = decision.model_name, decision.version
    if decision.action == "rollback":
        return "model.rolled-back", f"{name} rolled back to v{version} (@production)"
    if decision.promoted:
        return "model.promoted", f"{name} v{version} promoted to @production"
    return "model.challenger", f"{name} v{version} kept as @challenger (not promoted)"


def _score(decision: Decision) -> str:
    if decision.candidate is None:
        return ""
    against = "" if decision.baseline is None else f" vs {decision.baseline:.4f}"
    return f" ({decision.metric} {decision.candidate:.4f}{against})"


def announce(
    params: Params, decision: Decision, metrics: dict[str, float] | None = None
) -> list[str]:
    """Emit the decision's event, and a drift alarm when `drift_p_value` is under
    `alerts.drift_p_value_below`; returns the events' names. Only against a Prefect server
    (PREFECT_API_URL): the ephemeral one has no automations to act on them."""
    if api_url() is None:
        return []
    try:
        return _emit(params, decision, metrics or {})
    except Exception as error:  # a lost alert must not fail a finished promotion
        print(f"warning: alerts not sent to {api_url()}: {error!r}")
        return []


def _emit(params: Params, decision: Decision, metrics: dict[str, float]) -> list[str]:
    from prefect.context import FlowRunContext
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
    resource = {
        "prefect.resource.id": f"{EVENT_PREFIX}model.{decision.model_name}",
        "prefect.resource.name": decision.model_name,
        f"{EVENT_PREFIX}version": decision.version,
    }
    common = {
        "model": decision.model_name,
        "version": decision.version,
        "data_version": decision.data_version,
        "metrics": metrics,
    }
    kind, title = _decision_event(decision)
    emitted = [f"{EVENT_PREFIX}{kind}"]
    emit_event(
        event=emitted[0],
        resource=resource,
        payload={
            **common,
            "title": title,
            "message": f"{title}: {decision.reason}{_score(decision)}",
            "action": decision.action,
            "promoted": decision.promoted,
            "reason": decision.reason,
            "metric": decision.metric,
            "candidate": decision.candidate,
            "baseline": decision.baseline,
            "previous_production": decision.previous_production,
        },
    )
    p_value, threshold = metrics.get(DRIFT_P), params.alerts.drift_p_value_below
    if p_value is not None and p_value < threshold:
        title = f"drift alarm on data {decision.data_version or '?'}"
        emitted.append(f"{EVENT_PREFIX}data.drift")
        emit_event(
            event=emitted[-1],
            resource=resource,
            payload={
                **common,
                "title": title,
                "message": (
                    f"{title}: {DRIFT_P} {p_value:.4g} < alerts.drift_p_value_below {threshold}"
                    + (f" ({DRIFT_MMD} {metrics[DRIFT_MMD]:.4g})" if DRIFT_MMD in metrics else "")
                    + " vs production's training data; candidate "
                    f"{decision.model_name} v{decision.version}"
                ),
                DRIFT_P: p_value,
                "threshold": threshold,
            },
        )
    if FlowRunContext.get() is None:  # a CLI command: send before the process ends
        EventsWorker.drain_all(timeout=30)
    return emitted
