"""End to end: the `retrain` Prefect flow on small real Fashion-MNIST images.

Real Ray Train workers (2, gloo DDP), a real MLflow SQLite store and registry, a real Prefect flow
run on the ephemeral server, and a real DVC repo with a local remote. The images land in a
folder, as they would for scheduled retraining, and more arrive between runs.
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

from pipeline.dataset import data_version
from pipeline.registry import PRODUCTION

pytestmark = pytest.mark.integration
DVC = str(Path(sys.executable).with_name("dvc"))


def dvc_status() -> dict:
    out = subprocess.run([DVC, "status", "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_retrain_flow_records_every_stage_skips_unchanged_data_and_shards_only_new_images(
    flow_project: Path, ray_cluster: None, write_fashion_images
) -> None:
    from flows.retrain import retrain

    project = flow_project
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
    assert run.data.tags["data_version"] == run_info["data_version"] == data_version("data/shards")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0]
    assert len(client.get_metric_history(run.info.run_id, "knn_top1")) == 1

    # the training curve for `dvc plots`: one row per epoch, as logged on the run
    curve = (project / "models/encoder/training_curve.csv").read_text().splitlines()
    assert curve[0] == "epoch,loss,knn_top1" and len(curve) == 2
    (loss,) = client.get_metric_history(run.info.run_id, "loss")
    assert float(curve[1].split(",")[1]) == loss.value

    # evaluate: metrics-full.json with the references, the same numbers on the run; the
    # headline files make a table that fits a terminal
    metrics = json.loads((project / "metrics-full.json").read_text())
    for key in ("knn_top1", "pixels_knn_top1", "random_knn_top1"):
        assert 0.0 <= metrics[key] <= 1.0
    assert client.get_run(run.info.run_id).data.metrics["eval_knn_top1"] == metrics["knn_top1"]

    # promote: a registered version whose alias matches the recorded decision
    decision = json.loads((project / "promotion.json").read_text())
    version = client.get_model_version("moco-encoder", decision["version"])
    assert version.run_id == run.info.run_id
    assert ("production" if decision["promoted"] else "challenger") in version.aliases
    assert decision["reason"] in version.description
    assert version.tags["eval_version"] == metrics["eval_version"]

    # the summary is a Prefect artifact; DVC sees nothing out of date and says what made the model
    summary = Artifact.get("retrain-summary")
    assert summary is not None
    for needle in (run.info.run_id, run_info["data_version"], decision["reason"]):
        assert needle in summary.data
    assert dvc_status() == {}
    lock = (project / "dvc.lock").read_text()
    assert "models/encoder" in lock and "data/shards" in lock
    shown = subprocess.run([DVC, "metrics", "show"], capture_output=True, text=True, check=True)
    table = shown.stdout.splitlines()
    rows = {line.split()[0] for line in table[1:]}
    assert rows == {"metrics.json", "metrics-pixels.json", "metrics-random.json"}
    assert max(map(len, table)) <= 100, shown.stdout

    # a second run on unchanged data (data, benchmark, settings and code as production's)
    # ends before training: no MLflow run, no model version
    client.set_registered_model_alias("moco-encoder", PRODUCTION, decision["version"])
    runs_before = len(client.search_runs([run.info.experiment_id]))
    state = retrain(params_file="params.yaml", return_state=True)
    assert state.is_completed(), state.message
    skipped = Artifact.get("retrain-summary").data
    assert f"nothing new since production v{decision['version']} of moco-encoder" in skipped
    assert f"data {run_info['data_version']}" in skipped
    assert len(client.search_model_versions("name='moco-encoder'")) == 1
    assert len(client.search_runs([run.info.experiment_id])) == runs_before

    # --force trains again, skips sharding (Prefect cache on the shard inputs) and is gated
    # against production (the tiny first model may not have passed on its own)
    state = retrain(params_file="params.yaml", force=True, return_state=True)
    assert state.is_completed(), state.message
    assert len(client.search_model_versions("name='moco-encoder'")) == 2
    second = Artifact.get("retrain-summary").data
    assert "sharding skipped: inputs unchanged" in second
    assert f"production v{decision['version']}" in second  # compared against production
    (knn20,) = [row for row in second.splitlines() if row.startswith("| knn20_top1 |")]
    assert knn20.split("|")[3].strip() == f"{metrics['knn20_top1']:.4f}"  # production's value
    assert dvc_status() == {}

    # new images arrive: only they are sharded, into a new data version that DVC records
    old_shards = {p.name: p.read_bytes() for p in (project / "data/shards/train").glob("*.tar")}
    lock_before = (project / "dvc.lock").read_text()
    write_fashion_images(project / "images", "train", 1024, 64)
    state = retrain(params_file="params.yaml", return_state=True)
    assert state.is_completed(), state.message
    manifest = json.loads((project / "data/shards/train/manifest.json").read_text())
    assert manifest["samples"] == 1024 + 64
    assert data_version("data/shards") != run_info["data_version"]
    for name, data in old_shards.items():
        assert (project / "data/shards/train" / name).read_bytes() == data
    assert "train +64 new" in Artifact.get("retrain-summary").data
    assert (project / "dvc.lock").read_text() != lock_before
    assert dvc_status() == {}

    # the history: one row per version, as the artifact and on the last run
    versions = client.search_model_versions("name='moco-encoder'")
    assert len(versions) == 3
    history = Artifact.get("retrain-history").data
    for version in versions:
        assert f"| v{version.version}" in history and version.tags["data_version"] in history
    last = json.loads((project / "models/encoder/run.json").read_text())["run_id"]
    logged = {a.path for a in client.list_artifacts(last, "history")}
    assert logged == {"history/history.md", "history/history.png"}


def test_a_failing_stage_fails_the_flow_and_leaves_production_and_data_versions(
    flow_project: Path, ray_cluster: None, monkeypatch: pytest.MonkeyPatch, write_fashion_images
) -> None:
    from flows.retrain import retrain

    assert retrain(params_file="params.yaml", return_state=True).is_completed()
    tracking = f"sqlite:///{flow_project / 'mlflow.db'}"
    first = json.loads((flow_project / "promotion.json").read_text())["version"]
    MlflowClient(tracking).set_registered_model_alias("moco-encoder", PRODUCTION, first)
    production = MlflowClient(tracking).get_model_version_by_alias("moco-encoder", PRODUCTION)
    lock_before = (flow_project / "dvc.lock").read_text()
    write_fashion_images(flow_project / "images", "train", 1024, 64)  # new data, never versioned

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    state = retrain(params_file="params.yaml", return_state=True)

    assert state.is_failed()
    assert "nothing answers at 127.0.0.1:9" in str(state.result(raise_on_failure=False))
    after = MlflowClient(tracking).get_model_version_by_alias("moco-encoder", PRODUCTION)
    assert after.version == production.version
    assert (flow_project / "dvc.lock").read_text() == lock_before


def test_a_second_flow_run_on_the_same_project_is_refused_while_one_runs(
    project: Path,
) -> None:
    from filelock import FileLock

    from flows.lock import LOCK_FILE
    from flows.retrain import retrain

    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(LOCK_FILE):  # what a running flow holds
        state = retrain(params_file="params.yaml", return_state=True)
    assert state.is_failed()
    assert "holds this project's lock" in str(state.result(raise_on_failure=False))
    assert not (project / "data/shards").exists()  # nothing ran
