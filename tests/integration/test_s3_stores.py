"""The two stores a cluster keeps on S3 besides shards and checkpoints: the DVC remote (dvc-s3)
and the MLflow server's artifact store, both on the moto server through the AWS environment."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from object_store import free_port, stop_group, wait_for_port

from pipeline.config import ModelParams, Params, load_params
from pipeline.encoder import EncoderSpec, load_encoder, save_encoder
from pipeline.promote import promote
from pipeline.tracking import log_encoder, setup_mlflow
from pipeline.versioning import push

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def _objects(bucket_url: str, prefix: str) -> list[str]:
    bucket = bucket_url.removeprefix("s3://")
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for item in listed.get("Contents", [])]


def _run(*command: str, cwd: Path) -> None:
    subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True)


def test_the_dvc_remote_on_s3_takes_the_data_and_gives_it_back(
    s3_bucket: str, s3_env: dict[str, str], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    (repo / "data/shards").mkdir(parents=True)
    shard = repo / "data/shards/train-000000.tar"
    shard.write_bytes(bytes(range(256)) * 64)
    _run("git", "init", "-q", cwd=repo)
    _run(str(BIN / "dvc"), "init", "-q", cwd=repo)
    # README "Scaling out": the remote and its endpoint, credentials from the environment only
    _run(str(BIN / "dvc"), "remote", "add", "-d", "s3", f"{s3_bucket}/moco/dvc", cwd=repo)
    endpoint = s3_env["AWS_ENDPOINT_URL"]
    _run(str(BIN / "dvc"), "remote", "modify", "s3", "endpointurl", endpoint, cwd=repo)
    _run(str(BIN / "dvc"), "add", "data/shards", cwd=repo)
    assert "AWS" not in (repo / ".dvc/config").read_text()  # no credential in the repo

    assert push(str(repo)) == 2  # the flows' own push: the shard and the folder's .dir listing
    assert _objects(s3_bucket, "moco/dvc/")  # content-addressed files in the bucket

    original = shard.read_bytes()
    subprocess.run(["rm", "-rf", str(repo / ".dvc/cache"), str(repo / "data/shards")], check=True)
    _run(str(BIN / "dvc"), "pull", "-q", cwd=repo)
    assert shard.read_bytes() == original


@pytest.fixture
def mlflow_on_s3(s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """`mlflow server` whose artifact store is the bucket (infra/'s layout, SQLite for speed:
    the PostgreSQL backend has its own test in tests/registry).

    An S3 artifact store makes the server offer presigned URLs for direct downloads; moto with
    authentication on answers those with a 500 (a real S3 or MinIO serves them), and the client
    retries for minutes. So clients here download through the server, as one without a route to
    the bucket must (README "Scaling out")."""
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
    port, log = free_port(), tmp_path / "mlflow.log"
    command = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--artifacts-destination", f"{s3_bucket}/mlflow",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with log.open("wb") as sink:
        server = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True
        )
    try:
        wait_for_port(port, 180, server)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(server)


def test_the_mlflow_server_keeps_artifacts_in_the_bucket(
    mlflow_on_s3: str, s3_bucket: str, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_on_s3)
    experiment = client.create_experiment("s3-artifacts")
    run = client.create_run(experiment)
    report = tmp_path / "report.json"
    report.write_text('{"knn_top1": 0.83}')
    # the client talks HTTP only (mlflow-artifacts:/ proxied by the server): no S3 on clients
    client.log_artifact(run.info.run_id, str(report))
    assert client.get_run(run.info.run_id).info.artifact_uri.startswith("mlflow-artifacts:")

    keys = _objects(s3_bucket, "mlflow/")
    assert [k for k in keys if k.endswith(f"{run.info.run_id}/artifacts/report.json")], keys
    back = client.download_artifacts(run.info.run_id, "report.json", str(tmp_path / "back"))
    assert Path(back).read_text() == report.read_text()


def test_the_pipeline_logs_promotes_and_serves_a_model_through_the_s3_backed_server(
    mlflow_on_s3: str, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stages' own calls, not a bare client: log_encoder, promote (register, gate, alias)
    and load_encoder("models:/...@production"), with every artifact in the bucket."""
    monkeypatch.chdir(tmp_path)  # promotion.json and the registry lock land here
    params = load_params(None, [f"tracking.uri={mlflow_on_s3}", "registry.model_name=s3-enc"])
    spec = EncoderSpec.from_params(Params(model=ModelParams(width=4, image_size=16)))
    torch.manual_seed(3)
    trained, _ = spec.build()
    folder = save_encoder(trained.eval(), spec, tmp_path / "encoder")
    with mlflow.start_run(experiment_id=setup_mlflow(params)) as run:
        model_uri = log_encoder(folder)
    keys = _objects(s3_bucket, "mlflow/")
    assert [k for k in keys if k.endswith("encoder.safetensors")], keys  # in the bucket

    versions = {"data_version": "d1", "benchmark_version": "", "eval_version": "e1"}
    decision = promote(params, model_uri, {"knn_top1": 0.8, "random_knn_top1": 0.7}, versions)
    assert decision.promoted and decision.version == "1"

    served, served_spec = load_encoder("models:/s3-enc@production")
    images = torch.rand(4, spec.in_channels, spec.image_size, spec.image_size)
    with torch.no_grad():
        assert torch.equal(served(images), trained(images))
    assert served_spec == spec
    assert MlflowClient(mlflow_on_s3).get_model_version("s3-enc", "1").run_id == run.info.run_id
