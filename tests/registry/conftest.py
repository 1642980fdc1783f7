"""A real MLflow store with a tiny random encoder logged once, and real data to score and embed.

Nothing here trains: the gate is fed explicit metrics, and the encoder only has to be a real
logged model. Tests share the store (logging a model costs seconds) but each gets its own
registered-model name, so their aliases never meet.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from registry_helpers import Store, free_port, log_tiny_encoder, tiny_encoder

from pipeline.config import Params, load_params

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "infra" / "test-services.sh"
MLFLOW = str(Path(sys.executable).with_name("mlflow"))
SKIP_POSTGRES = "MOCO_SKIP_POSTGRES"  # the only way to skip the server tests

# kNN and the linear probe only: the gate needs a real score, not the whole suite.
CHEAP_EVAL = [
    "eval.knn_k=20",
    "eval.knn_extra_k=[]",
    "eval.probe_iters=5",
    "eval.low_label_fractions=[]",
    "eval.fewshot_episodes=0",
    "eval.transfer_source=''",
    "eval.noise_rates=[]",
    "eval.supervised_steps=0",
    "eval.robustness_subset=0",
    "eval.tsne_points=0",
    "eval.features_dir=''",
]

for _name, _value in {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}.items():
    os.environ.setdefault(_name, _value)


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's digits as shards (train and test), a few hundred images."""
    from pipeline.shard import shard

    root = tmp_path_factory.mktemp("digits") / "shards"
    overrides = ["data.source=digits", f"data.shards_dir={root}", "data.min_shards=2"]
    shard(load_params(None, [*overrides, "data.train_limit=300", "data.test_limit=100"]))
    return root


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """A SQLite tracking store holding one logged tiny encoder."""
    folder = tmp_path_factory.mktemp("store")
    uri, artifacts = f"sqlite:///{folder / 'mlflow.db'}", folder / "artifacts"
    params = load_params(None, [f"tracking.uri={uri}", f"tracking.artifact_location={artifacts}"])
    encoder_dir = tiny_encoder(folder / "encoder")
    return Store(uri, artifacts, encoder_dir, log_tiny_encoder(params, encoder_dir))


@pytest.fixture
def make_params(
    store: Store, digits_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Params]:
    """Params on the shared store, each call with a registered-model name of its own; cwd is
    tmp_path (promotion.json lands there). Extra arguments are `key=value` overrides."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = [
        f"tracking.uri={store.uri}",
        f"tracking.artifact_location={store.artifacts}",
        f"data.shards_dir={digits_shards}",
        "registry.lock_timeout_s=60",
        *CHEAP_EVAL,
    ]

    def make(*overrides: str) -> Params:
        name = f"registry.model_name=enc-{uuid.uuid4().hex[:8]}"
        return load_params(None, [*base, name, *overrides])

    return make


# --- real servers: PostgreSQL (infra/test-services.sh) and `mlflow server` --------------------


@pytest.fixture(scope="session")
def postgres_uri() -> Iterator[str]:
    """A throwaway PostgreSQL cluster (infra/test-services.sh installs Debian's postgresql when
    run as root). Where none can be had the tests fail, saying how to provide one; only an
    explicit MOCO_SKIP_POSTGRES=1 skips them."""
    folder = Path(tempfile.mkdtemp(prefix="mocopipe-pg-"))
    started = subprocess.run(
        ["bash", str(SERVICES), "postgres-start", str(folder), str(free_port())],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if started.returncode == 3:
        shutil.rmtree(folder, ignore_errors=True)
        why = " ".join(started.stderr.split())
        if os.environ.get(SKIP_POSTGRES) == "1":
            pytest.skip(f"PostgreSQL unavailable ({why}); skipped: {SKIP_POSTGRES}=1")
        pytest.fail(
            f"PostgreSQL unavailable ({why}): install it (apt-get install -y postgresql, or run "
            f"the tests as root) or opt out explicitly with {SKIP_POSTGRES}=1",
            pytrace=False,
        )
    if started.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"infra/test-services.sh postgres-start failed: {started.stderr.strip()}")
    try:
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(SERVICES), "postgres-stop", str(folder)], timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
        Path(f"{folder}.initdb.log").unlink(missing_ok=True)


def _wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited ({server.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"mlflow server not healthy after {timeout_s:.0f} s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def mlflow_server(postgres_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with the PostgreSQL backend store and proxied artifacts."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port, log = free_port(), folder / "server.log"
    # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; the venv has psycopg2-binary.
    store_uri = postgres_uri.replace("postgresql://", "postgresql+psycopg2://", 1)
    command = [
        MLFLOW, "server", "--backend-store-uri", store_uri,
        "--artifacts-destination", str(folder / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with log.open("w") as sink:
        server = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, server, log, timeout_s=180)
        yield url
    finally:
        _stop_group(server)


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the server's own process group (its workers too); SIGKILL if it lingers (uvicorn
    waits for idle keep-alive connections from the test's client before it exits)."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
