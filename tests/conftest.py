"""Test-wide isolation."""

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _own_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI into os.environ, where the next test's
    stages would read it as the user's choice: each test starts without it, and it is restored
    afterwards."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset")  # records the original, so undo restores
    monkeypatch.delenv("MLFLOW_TRACKING_URI")


@pytest.fixture(scope="session", autouse=True)
def _session_precision_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`train.precision: auto` caches its probe in ~/.cache unless MOCO_PRECISION_CACHE moves
    it: the suite never reads or writes the machine's answers. Set for the session first, so
    processes started by session fixtures (Ray clusters, servers) inherit a test path too."""
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("precision") / "precision.json"
        patch.setenv("MOCO_PRECISION_CACHE", str(cache))
        yield


@pytest.fixture(autouse=True)
def _own_precision_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's in-process precision decisions go to a cache of its own."""
    monkeypatch.setenv("MOCO_PRECISION_CACHE", str(tmp_path / "precision-cache" / "precision.json"))


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that nothing listens on (an endpoint that is down): bound, never
    listening, for the whole test, so no other process can take it meanwhile (connections to it
    are refused)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]
