"""A throwaway project folder with real git, DVC, MLflow (SQLite), Ray and Prefect."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration_helpers import FLOW, make_project
from integration_helpers import write_fashion_images as write_images
from object_store import make_bucket, moto_server
from ray_nodes import TwoNodeCluster


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    folder = make_project(tmp_path / "project")
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield folder


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray cluster for the session (starting one costs ~10 s here)."""
    import ray

    from pipeline.ray_cluster import ensure_ray

    ensure_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Prefect's ephemeral server keeps its state in a throwaway folder."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


@pytest.fixture
def flow_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = make_project(tmp_path / "project", FLOW)
    write_images(folder / "images", "train", 0, 1024)
    write_images(folder / "images", "test", 0, 256)
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return folder


@pytest.fixture
def write_fashion_images():
    return write_images


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One moto S3 server for the session: its AWS_* settings, not put in os.environ."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with moto_server(log) as env:
        yield env


@pytest.fixture
def s3_env(s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The S3 server's AWS_* settings in os.environ for one test, restored after it (a later
    test never sees them)."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env: dict[str, str], request: pytest.FixtureRequest) -> str:
    """A fresh bucket per test: `s3://<test name>`."""
    name = request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{os.getpid()}"
    return make_bucket(name)


@pytest.fixture(scope="module")
def two_nodes(
    s3_server: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TwoNodeCluster]:
    """One head + one worker node (1 CPU each) for the module's tests, with the S3 settings.

    Not for the session: while a second Ray instance runs on the machine, Ray Train's
    placement-group cleaner in the tests' local instance cannot tell which one is its own
    ("Found multiple active Ray instances"), leaked groups pile up and the next Tune trial's
    workers are never placed."""
    cluster = TwoNodeCluster(tmp_path_factory.mktemp("two-nodes"), dict(s3_server))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
