"""Remote endpoints are checked before any work starts: a refusal is one line that names the
setting and the endpoint and never a credential, given before Ray is started. Real sockets and
HTTP servers on 127.0.0.1; nothing is mocked."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from pipeline.config import load_params
from pipeline.errors import StageError
from pipeline.preflight import check_endpoints, check_ray_address

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    for name in ("RAY_ADDRESS", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


# The CLI as `mocopipe` runs it, in a fresh interpreter that then reports whether Ray was
# initialised in that process: the refusal has to come before ray.init, not from it.
RUN_CLI = """
import sys
import ray
from pipeline.cli import app
try:
    app(sys.argv[1:], prog_name="mocopipe")
    code = 0
except SystemExit as done:
    code = done.code
print(f"ray initialized: {ray.is_initialized()}")
sys.exit(code)
"""


def run_cli(project: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    """`mocopipe ARGS` in its own process; its stdout ends with whether Ray was initialised."""
    return subprocess.run(
        [sys.executable, "-c", RUN_CLI, *args],
        cwd=project,
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_unreachable_tracking_server_is_refused_before_ray_starts(
    project: Path, closed_port: int
) -> None:
    uri = f"http://127.0.0.1:{closed_port}"
    done = run_cli(project, ["pretrain"], MLFLOW_TRACKING_URI=uri)

    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: MLFLOW_TRACKING_URI={uri}: nothing answers at {uri.removeprefix('http://')} "
        "(connection refused); start the server or fix MLFLOW_TRACKING_URI"
    ]
    assert done.stdout.strip().splitlines()[-1] == "ray initialized: False"


@pytest.mark.parametrize(
    ("setting", "args", "env_name"),
    [("RAY_ADDRESS", [], "RAY_ADDRESS"), ("--address", ["--address"], None)],
)
def test_a_ray_cluster_that_does_not_answer_is_refused_before_connecting(
    project: Path, closed_port: int, setting: str, args: list[str], env_name: str | None
) -> None:
    address = f"127.0.0.1:{closed_port}"
    env = {env_name: address} if env_name else {}
    done = run_cli(project, ["pretrain", *args, *([address] if args else [])], **env)

    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1  # our own line, not ray.init's traceback after its retries
    assert lines[0].startswith(f"error: {setting}={address}: nothing answers at {address}")
    assert done.stdout.strip().splitlines()[-1] == "ray initialized: False"


def test_ray_addresses_client_port_local_default_and_a_bad_port(
    project: Path, closed_port: int
) -> None:
    client = f"ray://127.0.0.1:{closed_port}"
    with pytest.raises(StageError, match=f"--address={client}: nothing answers"):
        check_ray_address(client)
    assert check_ray_address(None) is None  # no address: a local instance, nothing to probe
    with pytest.raises(StageError, match=r"^--address=127\.0\.0\.1:6379x: not a valid address"):
        check_ray_address("127.0.0.1:6379x")


class _Refusing(BaseHTTPRequestHandler):
    """A server that answers every request with the status in the server's `status`."""

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        self.send_response(self.server.status)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[HTTPServer]:
    server = HTTPServer(("127.0.0.1", 0), _Refusing)
    server.paths = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("status", "needle"),
    [
        (401, "the server refused our credentials (HTTP 401); fix MLFLOW_TRACKING_USERNAME"),
        (404, "not an MLflow tracking server (HTTP 404 on /api/2.0/mlflow/experiments/search)"),
    ],
)
def test_a_server_that_refuses_us_is_named_without_the_password(
    project: Path,
    http_server: HTTPServer,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    needle: str,
) -> None:
    http_server.status = status
    uri = f"http://127.0.0.1:{http_server.server_port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-pw")

    with pytest.raises(StageError) as refused:
        check_endpoints(load_params())

    message = str(refused.value)
    assert message.startswith(f"MLFLOW_TRACKING_URI={uri}: ") and needle in message
    assert "s3cret-pw" not in message and "\n" not in message
    assert len(http_server.paths) == 1  # one request: MLflow's retries are off for the probe


def test_credentials_in_the_tracking_uri_are_never_printed(
    project: Path, monkeypatch: pytest.MonkeyPatch, closed_port: int
) -> None:
    port = closed_port
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cret-pw@127.0.0.1:{port}/?token=t0k")

    with pytest.raises(StageError) as refused:
        check_endpoints(load_params())

    assert str(refused.value).startswith(
        f"MLFLOW_TRACKING_URI=http://127.0.0.1:{port}/: nothing answers at 127.0.0.1:{port}"
    )
    assert "s3cret" not in str(refused.value) and "t0k" not in str(refused.value)


def test_an_object_store_endpoint_is_probed_only_for_s3_paths(
    project: Path, monkeypatch: pytest.MonkeyPatch, closed_port: int
) -> None:
    endpoint = f"http://127.0.0.1:{closed_port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    check_endpoints(load_params())  # local paths (and sqlite): nothing to probe

    with pytest.raises(StageError) as refused:
        check_endpoints(load_params(overrides=["data.shards_dir=s3://bucket/shards"]))

    assert str(refused.value) == (
        f"AWS_ENDPOINT_URL={endpoint}: nothing answers at {endpoint.removeprefix('http://')} "
        "(connection refused); start the object store or fix AWS_ENDPOINT_URL (used by "
        "data.shards_dir)"
    )


def test_the_stages_check_before_they_start_ray(
    project: Path, monkeypatch: pytest.MonkeyPatch, closed_port: int
) -> None:
    """The flows call the stage functions, not the CLI: they refuse the same way, the warm-start
    lookup in the registry (the retrain flow's first MLflow call) included."""
    from pipeline.pretrain import pretrain, warm_start_or_scratch
    from pipeline.tune import sweep

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port}")
    warm = ["train.init_from=models:/moco-encoder@production"]
    for stage, overrides in ((pretrain, []), (sweep, []), (warm_start_or_scratch, warm)):
        with pytest.raises(StageError, match=r"^MLFLOW_TRACKING_URI=.*nothing answers"):
            stage(load_params(overrides=overrides))
