"""Scheduled runs: serve a flow as a Prefect deployment on a cron schedule.

The flow is loaded from its entrypoint (`flows/retrain.py:retrain`), the same reference
prefect.yaml uses, so the pipeline package never imports the flows package.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.automations import FLOWS, ensure_automations, heartbeats
from pipeline.config import Params

FLOWS_DIR = Path(__file__).resolve().parents[1] / "flows"


def check_cron(cron: str, timezone: str = "UTC") -> None:
    """Refuse a bad schedule now, with the fix, rather than deep inside Prefect."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as error:
        detail = error.errors()[0]["msg"].removeprefix("Value error, ")
        raise ValueError(
            f"--cron {cron!r} --timezone {timezone!r}: {detail}; use five cron fields, e.g. "
            "'0 3 * * *', and an IANA zone such as UTC"
        ) from None


def serve_on_schedule(
    flow: str, cron: str, params_file: str, params: Params, timezone: str = "UTC"
) -> None:
    """Create (or update) the deployment `<flow>-scheduled` and its automations (zombie runs
    marked Crashed, alerts), and run it on schedule until stopped, from the params file's
    folder (the project); one run of it at a time, each sending heartbeats."""
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron

    if flow not in FLOWS:
        raise ValueError(f"--flow {flow!r}: choose one of {', '.join(FLOWS)}")
    check_cron(cron, timezone)
    params_path = Path(params_file).resolve()
    os.chdir(params_path.parent)  # runs use the project's relative paths (shards, dvc, lock)
    for line in ensure_automations(params):
        print(line)
    loaded = load_flow_from_entrypoint(f"{FLOWS_DIR / flow}.py:{flow}")
    with heartbeats(params):  # the runner passes its settings to each run's process
        loaded.serve(
            name=f"{flow}-scheduled",
            schedules=[Cron(cron, timezone=timezone)],
            parameters={"params_file": str(params_path)},
            global_limit=1,
        )
