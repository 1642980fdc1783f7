"""Flow runs never overlap on one project, and a killed run never leaves the project locked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flows.lock import project_lock
from pipeline.errors import StageError

HOLDER = """
import sys, time
from pathlib import Path
from flows.lock import project_lock
with project_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_run_is_refused_until_the_holder_is_killed(tmp_path: Path) -> None:
    lock = tmp_path / "runs" / "flow.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = pytest.raises(StageError, match=f"pid {holder.pid}.*never overlap")
        with refused, project_lock(lock):
            pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with project_lock(lock):  # the OS freed the dead holder's lock
        assert lock.exists()
