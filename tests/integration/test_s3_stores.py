"""The two stores a cluster keeps on S3 besides shards and checkpoints: the DVC remote (dvc-s3)
and the MLflow server's artifact store, both on the moto server through the AWS environment."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from mlflow.tracking import MlflowClient
from object_store import free_port, stop_group, wait_for_port

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
def mlflow_on_s3(s3_bucket: str, tmp_path: Path) -> Iterator[str]:
    """`mlflow server` whose artifact store is the bucket (infra/'s layout, SQLite for speed:
    the PostgreSQL backend has its own test in tests/registry)."""
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
    mlflow_on_s3: str, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An S3 artifact store makes the server offer presigned URLs for direct downloads; moto
    # with authentication on answers those with a 500 (a real S3 or MinIO serves them), so
    # this client downloads through the server, as one without a route to the bucket must.
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
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
