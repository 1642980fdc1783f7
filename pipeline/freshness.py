"""Whether a retrain has anything to learn: the current data, benchmark, settings and code
against what the registry recorded for production and for the last registered candidate.

A scheduled retrain on unchanged inputs would spend the training time to mint a copy of a model
the registry already has; this check lets it end in seconds instead. It reads MLflow (the
model versions' tags), never files a run left on one machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from pipeline.config import Params
from pipeline.evaluation.data import versions
from pipeline.fingerprint import Fingerprint
from pipeline.registry import PRODUCTION, version_by_alias
from pipeline.tracking import setup_mlflow


@dataclass(frozen=True)
class Unchanged:
    """The registered version whose inputs the current ones equal."""

    model_name: str
    version: str
    role: str  # "production v3" or "the last retrain, v4 (rejected)"
    fingerprint: Fingerprint

    def render(self) -> str:
        return (
            f"nothing new since {self.role} of {self.model_name} "
            f"({self.fingerprint.describe()}): no training, no new model version"
        )

    def summary(self) -> str:
        """The markdown a retrain that stopped here leaves as its artifact."""
        return "\n".join(
            [
                "## moco-pipeline retrain",
                "",
                f"- {self.render()}",
                "- to retrain anyway: `python -m flows retrain --force`, or "
                "`registry.retrain_unchanged: true` in params.yaml",
            ]
        )


def _latest(client: MlflowClient, name: str) -> ModelVersion | None:
    found = client.search_model_versions(
        f"name='{name}'", max_results=1, order_by=["version_number DESC"]
    )
    return found[0] if found else None


def _role(version: ModelVersion, production: ModelVersion | None) -> str:
    if production is not None and production.version == version.version:
        return f"production v{version.version}"
    return f"the last retrain, v{version.version} ({version.tags.get('decision', 'not promoted')})"


def nothing_new(params: Params) -> Unchanged | None:
    """The version (production first, else the newest) that was trained and evaluated on
    exactly the current inputs, or None when something changed or nothing is registered.
    Needs the shards and the benchmark in place (after the shard and benchmark stages)."""
    setup_mlflow(params)
    client, name = MlflowClient(), params.registry.model_name
    current = Fingerprint.of(params, versions(params))
    production = version_by_alias(client, name, PRODUCTION)
    for candidate in (production, _latest(client, name)):
        if candidate is not None and Fingerprint.from_tags(candidate.tags) == current:
            role = _role(candidate, production)
            return Unchanged(name, str(candidate.version), role, current)
    return None
