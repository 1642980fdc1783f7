"""`mocopipe schedule` serves the retrain flow as a deployment on a real Prefect server."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout_s:.0f} s"
        time.sleep(1)


def healthy(url: str) -> bool:
    try:
        return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
    except OSError:
        return False


async def deployments(url: str) -> list:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(url) as client:
        return await client.read_deployments()


def test_schedule_creates_a_cron_deployment_of_the_retrain_flow(project: Path) -> None:
    port = str(free_port())
    url = f"http://127.0.0.1:{port}/api"
    env = os.environ | {"PREFECT_API_URL": url, "PREFECT_HOME": str(project / "prefect-home")}
    server = subprocess.Popen(
        [
            BIN / "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            url.split(":")[2][:-4],
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    serve = None
    try:
        wait_until(lambda: healthy(url), 120, "prefect server start")
        serve = subprocess.Popen(
            [BIN / "mocopipe", "schedule", "--cron", "0 3 * * *", "--timezone", "Europe/Paris"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_until(lambda: asyncio.run(deployments(url)), 120, "the deployment")
        (deployment,) = asyncio.run(deployments(url))
        assert deployment.name == "retrain-scheduled"
        assert deployment.entrypoint.endswith("flows/retrain.py:retrain")
        assert deployment.parameters == {"params_file": str(project / "params.yaml")}
        (schedule,) = deployment.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 3 * * *", "Europe/Paris")
        assert schedule.active
    finally:
        for process in (serve, server):
            if process is not None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=60)
