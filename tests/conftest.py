"""Test-wide isolation."""

import pytest


@pytest.fixture(autouse=True)
def _own_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI into os.environ, where the next test's
    stages would read it as the user's choice: each test starts without it, and it is restored
    afterwards."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset")  # records the original, so undo restores
    monkeypatch.delenv("MLFLOW_TRACKING_URI")


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (an endpoint that is down)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
