"""`python lock_holder.py PARAMS SECONDS`: a flow that holds the project's run lock for a while,
with the project's heartbeat setting: the zombie test's stand-in for a long retrain, killed
with SIGKILL while it holds the lock."""

from __future__ import annotations

import sys
import time

from prefect import flow

from flows.lock import project_lock
from pipeline.automations import heartbeats
from pipeline.config import load_params


@flow(name="hold-lock")
def hold_lock(seconds: float) -> None:
    with project_lock():
        print("holding the project lock", flush=True)
        time.sleep(seconds)


if __name__ == "__main__":
    with heartbeats(load_params(sys.argv[1])):
        hold_lock(float(sys.argv[2]))
