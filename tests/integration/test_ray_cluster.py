"""Without RAY_ADDRESS the stages start their own Ray, whatever an earlier `ray start` left."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

# In a fresh process with its own Ray temp dir, so this machine's other Ray users are untouched.
START = """
import ray
from pipeline.ray_cluster import ensure_ray
ensure_ray()
print(ray.get_runtime_context().gcs_address)
ray.shutdown()
"""


def test_a_dead_cluster_left_in_ray_current_cluster_is_not_joined(closed_port: int) -> None:
    # short: Ray's socket paths under it must stay within the OS limit
    with tempfile.TemporaryDirectory(prefix="rt", dir="/tmp") as temp:
        stale = f"127.0.0.1:{closed_port}"  # a head that died without `ray stop`
        (Path(temp) / "ray").mkdir()
        (Path(temp) / "ray" / "ray_current_cluster").write_text(stale)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": temp}

        done = subprocess.run(
            [sys.executable, "-c", START], env=env, capture_output=True, text=True, timeout=180
        )

    assert done.returncode == 0, done.stderr[-2000:]
    started = done.stdout.strip().splitlines()[-1]
    assert started and started != stale  # a plain ray.init() retried the dead GCS for minutes
