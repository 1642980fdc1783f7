"""register -> promote -> rollback -> embed against a real `mlflow server` whose backend store is
PostgreSQL (started by infra/test-services.sh), through the same code and CLI as production."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from registry_helpers import (
    FEATURES,
    FIRST,
    GOOD_IMAGES,
    log_tiny_encoder,
    read_rows,
    tiny_encoder,
    write_images,
)
from typer.testing import CliRunner

from pipeline import registry
from pipeline.cli import app
from pipeline.config import dump_params, load_params
from pipeline.promote import promote
from pipeline.registry import version_by_alias

pytestmark = pytest.mark.integration


def test_registry_lifecycle_on_postgres_backed_server(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # wins over tracking.uri
    monkeypatch.setattr(registry, "REMOTE_LOCKS", tmp_path / "locks")  # not ~/.cache
    params = load_params(None, ["registry.model_name=server-encoder", "registry.min_gain=0.01"])
    client = MlflowClient(mlflow_server)
    # Artifacts go through the server (mlflow-artifacts:/), not to a local path.
    client.create_experiment(params.tracking.experiment)
    model_uri = log_tiny_encoder(params, tiny_encoder(tmp_path / "encoder"))

    first = promote(params, model_uri, FIRST, {"eval_version": "d1"})
    better = promote(params, model_uri, {**FIRST, "knn_top1": 0.85}, {"eval_version": "d1"})
    assert first.promoted and better.promoted and better.previous_production == first.version
    production = version_by_alias(client, "server-encoder", "production")
    assert production is not None and str(production.version) == better.version
    assert production.tags["decision"] == "promoted"

    dump_params(params, tmp_path / "params.yaml")
    runner = CliRunner()
    rolled = runner.invoke(app, ["rollback", "--reason", "server test"])
    assert rolled.exit_code == 0, rolled.output
    assert f"v{first.version} -> @production" in rolled.output
    assert json.loads(Path("promotion.json").read_text())["action"] == "rollback"
    assert list((tmp_path / "locks").glob("*.lock"))  # promotions went through the lock
    restored = version_by_alias(client, "server-encoder", "production")
    assert restored is not None and str(restored.version) == first.version

    images = write_images(tmp_path / "images")
    out = tmp_path / "emb.parquet"
    embedded = runner.invoke(app, ["embed", "--source", str(images), "--out", str(out)])
    assert embedded.exit_code == 0, embedded.output
    rows = read_rows(out)
    assert sorted(row["key"] for row in rows) == sorted(GOOD_IMAGES)
    assert {len(row["embedding"]) for row in rows} == {FEATURES}
