"""The promote stage: register the candidate encoder and move `@production` only if it earns it.

Production is an alias, not a stage label: promotion and rollback are alias moves, and the
version that held `@production` keeps `@previous` so a rollback is one call.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import Params
from pipeline.evaluate import REFERENCES
from pipeline.tracking import git_commit, setup_mlflow

PRODUCTION, PREVIOUS, CHALLENGER = "production", "previous", "challenger"
DECISION_FILE = "promotion.json"


@dataclass
class Decision:
    model_name: str
    version: str
    promoted: bool
    reason: str
    metric: str
    candidate: float
    baseline: float  # what it had to beat: production's score, or the best reference
    previous_production: str | None

    def render(self) -> str:
        verdict = f"@{PRODUCTION}" if self.promoted else f"@{CHALLENGER} (not promoted)"
        return f"promote: {self.model_name} v{self.version} -> {verdict}: {self.reason}"


def _production_version(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, PRODUCTION)
    except MlflowException:
        return None


def _gate(params: Params, metrics: dict[str, float], production) -> tuple[bool, float, str]:
    """(promote?, baseline, reason): beat production by min_gain, or both references if none."""
    key, gain = params.registry.primary_metric, params.registry.min_gain
    candidate = metrics[key]
    if production is not None and key in production.tags:
        baseline = float(production.tags[key])
        ok = candidate >= baseline + gain
        verb = "beats" if ok else "does not beat"
        return (
            ok,
            baseline,
            (
                f"{key} {candidate:.4f} {verb} production v{production.version} {baseline:.4f} "
                f"+ min_gain {gain}"
            ),
        )
    references = {ref: metrics[f"{ref}_{key}"] for ref in REFERENCES if f"{ref}_{key}" in metrics}
    baseline = max(references.values(), default=float("-inf"))
    ok = candidate > baseline
    shown = ", ".join(f"{ref} {value:.4f}" for ref, value in references.items())
    verb = "beats" if ok else "does not beat"
    return (
        ok,
        baseline,
        f"no production model yet; {key} {candidate:.4f} {verb} the references ({shown})",
    )


def promote(
    params: Params, model_uri: str, metrics: dict[str, float], data_version: str
) -> Decision:
    """Register `model_uri`, gate it, move the aliases, and write promotion.json."""
    setup_mlflow(params)
    client = MlflowClient()
    name = params.registry.model_name
    production = _production_version(client, name)
    version = mlflow.register_model(model_uri, name).version
    promoted, baseline, reason = _gate(params, metrics, production)
    decision = Decision(
        model_name=name,
        version=str(version),
        promoted=promoted,
        reason=reason,
        metric=params.registry.primary_metric,
        candidate=metrics[params.registry.primary_metric],
        baseline=baseline,
        previous_production=production.version if production else None,
    )
    tags = {k: f"{v:.6g}" for k, v in metrics.items()} | {
        "data_version": data_version,
        "git_commit": git_commit(),
        "decision": "promoted" if promoted else "rejected",
        "decision_reason": reason,
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if promoted:
        if production is not None:
            client.set_registered_model_alias(name, PREVIOUS, production.version)
        client.set_registered_model_alias(name, PRODUCTION, version)
    else:
        client.set_registered_model_alias(name, CHALLENGER, version)
    Path(DECISION_FILE).write_text(json.dumps(asdict(decision), indent=2) + "\n")
    return decision
