"""The promote stage: register the candidate encoder and move `@production` only if it earns it.

Production is an alias, not a stage label: promotion and rollback are alias moves, and the
version that held `@production` keeps `@previous` so a rollback is one call.

The gate compares like with like: production's numbers are reused only when they were measured
on the same evaluation data (`eval_version`: the benchmark's version and the held-out slice's)
with the same evaluation protocol; otherwise production is re-scored on the current data. The
training stream may grow in between: that changes what a model learns from, not what it is
judged on. Alias moves are serialised by `pipeline.registry`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from pipeline.config import Params
from pipeline.encoder import read_spec
from pipeline.errors import StageError
from pipeline.evaluate import score
from pipeline.evaluation import keys
from pipeline.evaluation.data import versions as current_versions
from pipeline.fingerprint import Fingerprint, config_hash, eval_protocol
from pipeline.registry import (
    CHALLENGER,
    PREVIOUS,
    PRODUCTION,
    move_aliases,
    registry_lock,
    set_version_tags,
    version_by_alias,
    version_number,
)
from pipeline.tracking import EVAL_PREFIX, git_commit, log_eval_metrics, setup_mlflow, tracking_uri

DECISION_FILE = "promotion.json"
REPLACED_TAG = "replaced_version"  # on a promoted version: the production it replaced
VERSION_KEYS = ("data_version", "benchmark_version", "eval_version")  # also in metrics.json
EPSILON = 1e-9  # float slack: a gain of exactly min_gain (a tie at 0) never promotes


@dataclass
class Decision:
    model_name: str
    version: str
    promoted: bool
    reason: str
    metric: str
    candidate: float | None
    baseline: float | None  # what it had to beat: production's score, or the random reference
    previous_production: str | None
    action: str = "promote"  # promote | rollback
    data_version: str = ""  # the training stream's
    eval_version: str = ""  # what both models were scored on
    benchmark_version: str = ""
    config_hash: str = ""
    decided_at: str = ""
    production_metrics: dict[str, float] = field(default_factory=dict)  # what it was gated on

    def render(self) -> str:
        if self.action == "rollback":
            return f"rollback: {self.model_name} v{self.version} -> @{PRODUCTION}: {self.reason}"
        verdict = f"@{PRODUCTION}" if self.promoted else f"@{CHALLENGER} (not promoted)"
        return f"promote: {self.model_name} v{self.version} -> {verdict}: {self.reason}"


@dataclass(frozen=True)
class Baseline:
    """Production's metrics on the candidate's data, and how they were obtained."""

    version: str
    metrics: dict[str, float]
    source: str


# --- the gate ---------------------------------------------------------------------------------


def _needed(params: Params) -> list[str]:
    return [params.registry.primary_metric, *params.registry.guards]


def _recorded(params: Params, production: ModelVersion, eval_version: str) -> dict[str, float]:
    """Production's evaluation metrics (all of them, for the summary, read from its MLflow run)
    if measured on the same evaluation data with this protocol and holding every metric the gate
    needs, else {}."""
    tags = production.tags
    if (tags.get("eval_version"), tags.get("eval_protocol")) != (
        eval_version,
        eval_protocol(params),
    ):
        return {}
    logged = MlflowClient().get_run(production.run_id).data.metrics if production.run_id else {}
    metrics = {
        key.removeprefix(EVAL_PREFIX): value
        for key, value in logged.items()
        if key.startswith(EVAL_PREFIX)
    }
    return metrics if all(k in metrics for k in _needed(params)) else {}


def _baseline(
    params: Params, production: ModelVersion | None, eval_version: str
) -> Baseline | None:
    """Production's comparable metrics (None when there is no production yet)."""
    if production is None:
        return None
    version = str(production.version)
    recorded = _recorded(params, production, eval_version)
    if recorded:
        source = f"recorded metrics reused: same eval data {eval_version}, same protocol"
        return Baseline(version, recorded, source)
    on_disk = current_versions(params)["eval_version"]
    if on_disk != eval_version:
        raise StageError(
            f"the candidate was evaluated on eval data {eval_version} but the shards now give "
            f"{on_disk}: re-run `mocopipe evaluate` so both models see the same data"
        )
    uri = f"models:/{params.registry.model_name}/{version}"
    metrics = score(params, uri, references=False)
    return Baseline(version, metrics, f"re-evaluated on eval data {eval_version}")


def _gain(metric: str, candidate: float, reference: float) -> float:
    """How much better the candidate is, in the metric's own direction."""
    return reference - candidate if keys.lower_is_better(metric) else candidate - reference


def _judge_first(params: Params, metrics: dict[str, float]) -> tuple[bool, float | None, str]:
    """No production yet: beat the random-init encoder of the same shape."""
    key = params.registry.primary_metric
    candidate, random = metrics[key], metrics.get(f"random_{key}")
    if random is None:
        return False, None, f"no production model yet and no random_{key} reference to beat"
    ok = _gain(key, candidate, random) > 0
    pixels = metrics.get(f"pixels_{key}")
    pixel_gap = "" if pixels is None else f"; pixels {pixels:.4f} (gap {candidate - pixels:+.4f})"
    verb = "beats" if ok else "does not beat"
    return (
        ok,
        random,
        (
            f"no production model yet; {key} {candidate:.4f} {verb} random-init {random:.4f}"
            f"{pixel_gap}"
        ),
    )


def _guard_failures(
    guards: dict[str, float], candidate: dict[str, float], production: dict[str, float]
) -> list[str]:
    failures = []
    for metric, tolerance in guards.items():
        if metric not in candidate or metric not in production:
            failures.append(f"guard {metric}: no value to compare (candidate or production)")
        elif -_gain(metric, candidate[metric], production[metric]) > tolerance + EPSILON:
            drop = -_gain(metric, candidate[metric], production[metric])
            failures.append(f"guard {metric} fell {drop:.4f} > tolerance {tolerance}")
    return failures


def _judge(
    params: Params, metrics: dict[str, float], baseline: Baseline | None
) -> tuple[bool, float | None, str]:
    """(promote?, the score to beat, why)."""
    if baseline is None:
        return _judge_first(params, metrics)
    key, gain = params.registry.primary_metric, params.registry.min_gain
    candidate, reference = metrics[key], baseline.metrics.get(key)
    if reference is None:
        return False, None, f"production v{baseline.version} has no {key} to compare with"
    failures = _guard_failures(params.registry.guards, metrics, baseline.metrics)
    better = "lower" if keys.lower_is_better(key) else "higher"
    if _gain(key, candidate, reference) <= gain + EPSILON:  # a tie is not a gain
        failures.insert(
            0,
            f"{key} {candidate:.4f} vs {reference:.4f}: not {better} by more than min_gain {gain}",
        )
    verdict = "; ".join(failures) or (
        f"{key} {candidate:.4f} vs {reference:.4f}: {better} by more than min_gain {gain}"
        + (", guards held" if params.registry.guards else "")
    )
    return (
        not failures,
        reference,
        f"vs production v{baseline.version} ({baseline.source}): {verdict}",
    )


# --- promote and rollback ---------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write(decision: Decision, path: str | Path) -> None:
    Path(path).write_text(json.dumps(asdict(decision), indent=2) + "\n")


def _candidate_tags(
    params: Params, metrics: dict[str, float], decision: Decision, method: str
) -> dict[str, str]:
    """The few tags a reader filters versions on: the gated metrics and what they were measured
    on. Every metric is on the model's run; the decision's reason is the version's description."""
    tags = {key: repr(float(metrics[key])) for key in _needed(params) if key in metrics}
    inputs = {
        "data_version": decision.data_version,
        "benchmark_version": decision.benchmark_version,
    }
    tags |= Fingerprint.of(params, inputs).as_tags()  # what freshness compares next time
    tags |= {
        "eval_version": decision.eval_version,
        "git_commit": git_commit(),
        "config_hash": decision.config_hash,
        "eval_protocol": eval_protocol(params),
        "method": method,  # what trained it: the gate compares encoders whatever trained them
        "decision": "promoted" if decision.promoted else "rejected",
        "decided_at": decision.decided_at,
    }
    if decision.promoted and decision.previous_production is not None:
        tags[REPLACED_TAG] = decision.previous_production
    return tags


def _alias_moves(decision: Decision) -> dict[str, str | None]:
    if not decision.promoted:
        return {CHALLENGER: decision.version}
    if decision.previous_production is None:
        return {PRODUCTION: decision.version}
    return {PREVIOUS: decision.previous_production, PRODUCTION: decision.version}


def _decision(
    params: Params,
    version: str,
    reason: str,
    *,
    promoted: bool,
    candidate: float | None,
    baseline: float | None,
    previous: str | None,
    **extra: Any,
) -> Decision:
    return Decision(
        model_name=params.registry.model_name,
        version=version,
        promoted=promoted,
        reason=reason,
        metric=params.registry.primary_metric,
        candidate=candidate,
        baseline=baseline,
        previous_production=previous,
        config_hash=config_hash(params),
        decided_at=_now(),
        **extra,
    )


def promote(
    params: Params,
    model_uri: str,
    metrics: dict[str, float],
    versions: dict[str, str],
    *,
    decision_file: str | Path = DECISION_FILE,
) -> Decision:
    """Register `model_uri`, gate it against production, move the aliases, record the decision.

    `versions` are what the evaluation measured (`evaluation.data.versions`, in metrics.json).

    The slow part (re-scoring production) runs before the lock; inside it production is read
    again and, if another promotion moved it meanwhile, the gate is re-run against the new one.
    """
    key = params.registry.primary_metric
    if key not in metrics:
        raise ValueError(f"registry.primary_metric {key!r} is not in the candidate's metrics")
    setup_mlflow(params)
    client, name = MlflowClient(), params.registry.model_name
    production = version_by_alias(client, name, PRODUCTION)
    eval_version = versions.get("eval_version", "")
    baseline = _baseline(params, production, eval_version)
    registered = mlflow.register_model(model_uri, name)
    method = read_spec(model_uri, tracking_uri(params)).method  # what trained it (encoder.json)
    version = str(registered.version)
    if registered.run_id:  # the numbers it is gated on, where _recorded reads them next time
        log_eval_metrics(client, registered.run_id, metrics)
    with registry_lock(tracking_uri(params), params.registry.lock_timeout_s):
        current = version_by_alias(client, name, PRODUCTION)
        if version_number(current) != version_number(production):
            production, baseline = current, _baseline(params, current, eval_version)
        promoted, reference, reason = _judge(params, metrics, baseline)
        decision = _decision(
            params,
            version,
            reason,
            promoted=promoted,
            candidate=metrics[key],
            baseline=reference,
            previous=version_number(production),
            data_version=versions.get("data_version", ""),
            eval_version=eval_version,
            benchmark_version=versions.get("benchmark_version", ""),
            production_metrics=dict(baseline.metrics) if baseline else {},
        )
        move_aliases(client, name, _alias_moves(decision))
        tags = _candidate_tags(params, metrics, decision, method)
        set_version_tags(client, name, version, tags)
        client.update_model_version(name, version, description=_description(decision))
    _write(decision, decision_file)
    return decision


def _description(decision: Decision) -> str:
    """What the registry UI shows on the version: the verdict and why, and what it was measured
    on (the numbers themselves are on its MLflow run)."""
    verdict = f"Promoted to @{PRODUCTION}" if decision.promoted else f"Not promoted (@{CHALLENGER})"
    if decision.action == "rollback":
        verdict = f"Restored to @{PRODUCTION} by a rollback"
    on = f"training data `{decision.data_version}`"
    if decision.benchmark_version:
        on += f", benchmark `{decision.benchmark_version}`"
    return f"{verdict} on {decision.decided_at}.\n\n{decision.reason}\n\nMeasured on {on}."


def _metric_tag(version: ModelVersion | None, key: str) -> float | None:
    value = None if version is None else version.tags.get(key)
    return None if value is None else float(value)


def rollback(
    params: Params, *, reason: str = "", decision_file: str | Path = DECISION_FILE
) -> Decision:
    """Move `@production` back to `@previous`.

    `@previous` then steps one further back (the version the restored one had replaced), so
    repeated rollbacks walk the promotion history instead of toggling between two versions.
    """
    setup_mlflow(params)
    client, name, key = MlflowClient(), params.registry.model_name, params.registry.primary_metric
    with registry_lock(tracking_uri(params), params.registry.lock_timeout_s):
        current = version_by_alias(client, name, PRODUCTION)
        target = version_by_alias(client, name, PREVIOUS)
        if target is None:
            raise StageError(f"{name}: no @{PREVIOUS} version to roll back to")
        restored, demoted = str(target.version), version_number(current)
        decision = _decision(
            params,
            restored,
            f"rolled back from v{demoted} to v{restored}: {reason or 'no reason given'}",
            promoted=True,
            candidate=_metric_tag(target, key),
            baseline=_metric_tag(current, key),
            previous=demoted,
            action="rollback",
            data_version=target.tags.get("data_version", ""),
        )
        move_aliases(client, name, {PRODUCTION: restored, PREVIOUS: target.tags.get(REPLACED_TAG)})
        stamp = {"decided_at": decision.decided_at}
        set_version_tags(client, name, restored, {**stamp, "decision": "restored"})
        client.update_model_version(name, restored, description=_description(decision))
        if demoted is not None:
            set_version_tags(client, name, demoted, {**stamp, "decision": "rolled back"})
    _write(decision, decision_file)
    return decision
