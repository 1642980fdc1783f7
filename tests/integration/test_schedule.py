"""`mocopipe schedule` serves the retrain flow as a deployment on a real Prefect server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import pytest
from integration_helpers import BIN, prefect_server, wait_until

from pipeline.automations import ZOMBIE

pytestmark = pytest.mark.integration


async def deployments(url: str) -> list:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(url) as client:
        return await client.read_deployments()


async def automation_names(url: str) -> list[str]:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(url) as client:
        return [automation.name for automation in await client.read_automations()]


def test_schedule_creates_a_cron_deployment_of_the_retrain_flow(project: Path) -> None:
    with prefect_server(project / "prefect-home") as env:
        url = env["PREFECT_API_URL"]
        serve = subprocess.Popen(
            [BIN / "mocopipe", "schedule", "--cron", "0 3 * * *", "--timezone", "Europe/Paris"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_until(lambda: asyncio.run(deployments(url)), 120, "the deployment")
            (deployment,) = asyncio.run(deployments(url))
            assert deployment.name == "retrain-scheduled"
            assert deployment.entrypoint.endswith("flows/retrain.py:retrain")
            assert deployment.parameters == {"params_file": str(project / "params.yaml")}
            (schedule,) = deployment.schedules
            assert (schedule.schedule.cron, schedule.schedule.timezone) == (
                "0 3 * * *",
                "Europe/Paris",
            )
            assert schedule.active
            # the set-up that serves the deployment also marks its dead runs Crashed
            assert asyncio.run(automation_names(url)) == [ZOMBIE]
        finally:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(timeout=60)
