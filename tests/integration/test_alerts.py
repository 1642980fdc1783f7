"""Operating a schedule on real servers: a SIGKILLed flow run turns Crashed through the project's
zombie automation and frees the project lock; promotions, drift alarms and failed runs reach a
real HTTP receiver through the project's notification automations (Prefect), and an alias change
through the registry webhook (`mlflow server`), signed."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from integration_helpers import BIN, ROOT, free_port, healthy, prefect_server, wait_until

from pipeline.automations import FLOWS, MODEL_EVENTS, RUN_FAILED, ZOMBIE, ensure_automations
from pipeline.config import load_params
from pipeline.events import announce
from pipeline.promote import Decision
from pipeline.registry_webhooks import NAME, SECRET_ENV, ensure_registry_webhook

pytestmark = pytest.mark.integration
HEARTBEAT_S, MISSED = 30, 2  # Prefect's shortest period; Crashed after 60 s of silence


class Receiver(ThreadingHTTPServer):
    """What a team's webhook endpoint got: (path, headers, body) per request."""

    received: list[tuple[str, dict[str, str], bytes]]

    def bodies(self) -> list[dict]:
        return [json.loads(body) for _, _, body in self.received]


class _Record(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.received.append((self.path, dict(self.headers), body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver(("127.0.0.1", 0), _Record)
    server.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One Prefect server for the module (it takes ~20 s to start here)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect-server")
    with prefect_server(home) as env, temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        yield env


@pytest.fixture
def alerting(project: Path, receiver: Receiver) -> Path:
    """The project's params.yaml with a short heartbeat and the receiver as the webhook."""
    path = project / "params.yaml"
    tree = yaml.safe_load(path.read_text())
    tree["alerts"] = {
        "heartbeat_seconds": HEARTBEAT_S,
        "crashed_after_heartbeats": MISSED,
        "webhook_url": f"http://127.0.0.1:{receiver.server_port}/alerts",
    }
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def _api(env: dict[str, str], method: str, path: str, body: dict | None = None) -> dict | list:
    response = httpx.request(method, env["PREFECT_API_URL"] + path, json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def _runs(env: dict[str, str], flow: str) -> list[dict]:
    return _api(env, "POST", "/flow_runs/filter", {"flows": {"name": {"any_": [flow]}}})


def _heartbeats(env: dict[str, str], run_id: str) -> int:
    found = _api(
        env,
        "POST",
        "/events/filter",
        {
            "filter": {
                "event": {"name": ["prefect.flow-run.heartbeat"]},
                "resource": {"id": [f"prefect.flow-run.{run_id}"]},
            }
        },
    )
    return len(found["events"])


def _hold_lock(env: dict[str, str], project: Path, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, ROOT / "tests/integration/lock_holder.py", "params.yaml", str(seconds)],
        cwd=project,
        env=env | {"PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def test_sigkilled_run_turns_crashed_and_the_next_run_takes_the_lock(
    project: Path, alerting: Path, server: dict[str, str]
) -> None:
    set_up = subprocess.run(
        [BIN / "mocopipe", "automations"], cwd=project, env=server, capture_output=True, text=True
    )
    assert set_up.returncode == 0, set_up.stderr
    assert f"automation created: {ZOMBIE}" in set_up.stdout
    # the same set-up again (a second `prefect deploy`, a `python -m flows` run) updates
    again = ensure_automations(load_params(alerting))
    assert f"automation updated: {ZOMBIE}" in again
    names = [a["name"] for a in _api(server, "POST", "/automations/filter", {})]
    assert sorted(names) == sorted([ZOMBIE, RUN_FAILED, MODEL_EVENTS])
    (zombie,) = [a for a in _api(server, "POST", "/automations/filter", {}) if a["name"] == ZOMBIE]
    assert zombie["trigger"]["within"] == HEARTBEAT_S * MISSED
    assert zombie["actions"][0]["state"] == "CRASHED"

    holder = _hold_lock(server, project, 600)
    try:
        wait_until(lambda: _runs(server, "hold-lock"), 120, "the flow run")
        run_id = _runs(server, "hold-lock")[0]["id"]
        wait_until(lambda: _heartbeats(server, run_id), 120, "a heartbeat")
        assert _api(server, "GET", f"/flow_runs/{run_id}")["state"]["type"] == "RUNNING"
        assert (project / "runs/flow.lock").exists()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # no `finally`, no hook: the process is gone
        holder.wait(timeout=30)
    killed = time.monotonic()
    state = lambda: _api(server, "GET", f"/flow_runs/{run_id}")["state"]  # noqa: E731
    assert state()["type"] == "RUNNING"  # nothing reported the death
    wait_until(lambda: state()["type"] == "CRASHED", 240, "Crashed after the SIGKILL")
    print(f"SIGKILL -> Crashed in {time.monotonic() - killed:.0f} s: {state()['message']}")
    assert "No heartbeat" in state()["message"]

    # the next run takes the lock, and lives past the window on its heartbeats: not marked
    after = _hold_lock(server, project, HEARTBEAT_S * MISSED + 15)
    assert after.wait(timeout=300) == 0
    states = sorted(run["state"]["type"] for run in _runs(server, "hold-lock"))
    assert states == ["COMPLETED", "CRASHED"]


def test_decisions_drift_and_a_failed_run_reach_the_receiver(
    project: Path, alerting: Path, server: dict[str, str], receiver: Receiver
) -> None:
    params = load_params(alerting)
    ensure_automations(params)
    receiver.received.clear()
    decision = Decision(
        model_name="moco-encoder",
        version="7",
        promoted=True,
        reason="knn_top1 0.8400 beats production v6 (0.8300) by at least min_gain 0.0",
        metric="knn_top1",
        candidate=0.84,
        baseline=0.83,
        previous_production="6",
        data_version="d4t4v3rs10n",
    )
    emitted = announce(params, decision, {"knn_top1": 0.84, "drift_p_value": 0.004})
    assert emitted == ["moco-pipeline.model.promoted", "moco-pipeline.data.drift"]
    kept = replace(decision, version="8", promoted=False, reason="no gain over v7")
    assert announce(params, kept, {"drift_p_value": 0.5}) == ["moco-pipeline.model.challenger"]
    back = replace(decision, version="6", action="rollback", reason="rolled back: bad outputs")
    assert announce(params, back) == ["moco-pipeline.model.rolled-back"]
    # a run started by hand against the server: it ensures the automations, then fails
    by_hand = subprocess.run(
        [sys.executable, "-m", "flows", "retrain", "--set", "data.source=no-such-folder"],
        cwd=project,
        env=server | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert by_hand.returncode != 0 and f"automation updated: {ZOMBIE}" in by_hand.stdout
    (failed,) = [run for run in _runs(server, "retrain") if run["state"]["type"] == "FAILED"]
    assert "retrain" in FLOWS

    wait_until(lambda: len(receiver.received) >= 5, 120, "five notifications")
    time.sleep(5)  # and nothing more than those five
    bodies = receiver.bodies()
    print(json.dumps(bodies, indent=1))
    assert len(bodies) == 5
    assert {path for path, _, _ in receiver.received} == {"/alerts"}
    by_subject = {body["subject"]: body["body"] for body in bodies}
    promoted = by_subject["moco-pipeline: moco-encoder v7 promoted to @production"]
    assert decision.reason in promoted and "knn_top1 0.8400 vs 0.8300" in promoted
    drift = by_subject["moco-pipeline: drift alarm on data d4t4v3rs10n"]
    assert "drift_p_value 0.004 < alerts.drift_p_value_below 0.01" in drift
    assert "moco-encoder v7" in drift
    challenger = by_subject["moco-pipeline: moco-encoder v8 kept as @challenger (not promoted)"]
    assert "no gain over v7" in challenger
    rolled = by_subject["moco-pipeline: moco-encoder rolled back to v6 (@production)"]
    assert "rolled back: bad outputs" in rolled
    run_failed = by_subject[f"moco-pipeline: retrain run {failed['name']} Failed"]
    assert f"Flow run ID: {failed['id']}" in run_failed and "no-such-folder" in run_failed

    # the automations follow params.yaml: no target any more, no notifying automations
    lines = ensure_automations(load_params(alerting, ["alerts.webhook_url=''"]))
    assert f"automation removed (no alerts target): {MODEL_EVENTS}" in lines
    assert [a["name"] for a in _api(server, "POST", "/automations/filter", {})] == [ZOMBIE]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on SQLite, allowed to call a plain-http receiver on 127.0.0.1."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    url = f"http://127.0.0.1:{free_port()}"
    env = os.environ | {
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    server = subprocess.Popen(
        [BIN / "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts"),
         "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1"],
        cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_until(lambda: healthy(url), 180, "mlflow server")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


def test_an_alias_change_reaches_the_receiver_signed(
    mlflow_server: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    secret = "team-webhook-secret"
    monkeypatch.setenv(SECRET_ENV, secret)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    url = f"http://127.0.0.1:{receiver.server_port}/mlflow"
    params = load_params(None, [f"alerts.webhook_url={url}"])
    assert ensure_registry_webhook(params) == f"MLflow registry webhook created: {NAME} -> {url}"
    assert ensure_registry_webhook(params) == f"MLflow registry webhook updated: {NAME} -> {url}"
    local = load_params(None, [f"alerts.webhook_url={url}", "tracking.uri=sqlite:///x.db"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert "skipped" in ensure_registry_webhook(local)  # no server, no webhooks: said, not hidden

    client = MlflowClient(mlflow_server)
    run = client.create_run(client.create_experiment("webhooks"))
    client.create_registered_model("moco-encoder")
    source, run_id = f"runs:/{run.info.run_id}/model", run.info.run_id
    version = client.create_model_version("moco-encoder", source, run_id=run_id)
    receiver.received.clear()
    client.set_registered_model_alias("moco-encoder", "production", version.version)

    wait_until(lambda: any(p == "/mlflow" for p, _, _ in receiver.received), 60, "the webhook")
    ((headers, body),) = [(h, b) for p, h, b in receiver.received if p == "/mlflow"]
    payload = json.loads(body)
    assert (payload["entity"], payload["action"]) == ("model_version_alias", "created")
    assert payload["data"] == {"name": "moco-encoder", "alias": "production", "version": "1"}
    signed = f"{headers['X-MLflow-Delivery-Id']}.{headers['X-MLflow-Timestamp']}.{body.decode()}"
    digest = hmac.new(secret.encode(), signed.encode(), hashlib.sha256).digest()
    assert headers["X-MLflow-Signature"] == "v1," + base64.b64encode(digest).decode()
