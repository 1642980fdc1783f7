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

# Another run trying the lock once: prints what it got.
CHALLENGER = """
import sys
from pathlib import Path
from flows.lock import project_lock
from pipeline.errors import StageError
try:
    with project_lock(Path(sys.argv[1])):
        print("acquired")
except StageError as refused:
    print(f"refused: {refused}")
"""


def _challenge(lock: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", CHALLENGER, str(lock)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


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
    with project_lock(lock):  # the OS freed the dead holder's lock: we hold it now
        answer = _challenge(lock)
        assert answer.startswith("refused: ") and f"flow run (pid {os.getpid()}) holds" in answer
    assert _challenge(lock) == "acquired"  # and released it on leaving the block
