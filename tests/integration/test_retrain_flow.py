"""End to end: the `retrain` Prefect flow on a small real Fashion-MNIST subset.

Real Ray Train workers (2, gloo DDP), a real MLflow SQLite store and registry, a real Prefect flow
run on the ephemeral server, and a real DVC repo with a local remote.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from prefect.artifacts import Artifact

pytestmark = pytest.mark.integration
DVC = str(Path(sys.executable).with_name("dvc"))


def test_retrain_flow_records_every_stage(project: Path, ray_cluster: None) -> None:
    from flows.retrain import retrain

    state = retrain(params_file="params.yaml", return_state=True)
    assert state.is_completed(), state.message

    # shard: versioned shards with a manifest, pushed to the DVC remote
    manifest = json.loads((project / "data/shards/train/manifest.json").read_text())
    assert manifest["samples"] == 1024
    assert any((project / "dvc-remote").rglob("*")), "dvc push sent nothing to the remote"

    # pretrain: one MLflow run with per-epoch metrics and a logged model
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    client = MlflowClient()
    run_info = json.loads((project / "models/encoder/run.json").read_text())
    run = client.get_run(run_info["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["data_version"] == run_info["data_version"]
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [0, 1]
    assert len(client.get_metric_history(run.info.run_id, "knn_top1")) == 2

    # evaluate: metrics.json with the references, the same numbers on the run
    metrics = json.loads((project / "metrics.json").read_text())
    for key in ("knn_top1", "pixels_knn_top1", "random_knn_top1"):
        assert 0.0 <= metrics[key] <= 1.0
    assert client.get_run(run.info.run_id).data.metrics["eval_knn_top1"] == metrics["knn_top1"]

    # promote: a registered version whose alias matches the recorded decision
    decision = json.loads((project / "promotion.json").read_text())
    version = client.get_model_version("moco-encoder", decision["version"])
    assert version.run_id == run.info.run_id
    assert ("production" if decision["promoted"] else "challenger") in version.aliases
    assert version.tags["decision_reason"] == decision["reason"]

    # the summary is a Prefect artifact, and DVC sees nothing out of date
    summary = Artifact.get("retrain-summary")
    assert summary is not None and run.info.run_id in summary.data
    status = subprocess.run([DVC, "status", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(status.stdout) == {}
