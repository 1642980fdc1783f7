"""A real two-node Ray cluster on this machine: a head and a second node started with
`ray start --block` in their own process groups, one CPU each, own ports and temp folder, token
authentication on. Nothing here touches /tmp/ray: a plain ray.init() elsewhere in the session
never finds this cluster, and it is ended by pid (never `ray stop`, which stops every Ray)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from object_store import free_port, stop_group, wait_for_port

RAY = str(Path(sys.executable).with_name("ray"))
READY_TIMEOUT_S = 120.0
STATUS_TIMEOUT_S = 30.0


@dataclass
class TwoNodeCluster:
    """The nodes' processes and what a driver needs to reach them."""

    folder: Path
    env: dict[str, str]  # the nodes' and drivers' environment: AWS_*, RAY_AUTH_*
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    head: subprocess.Popen | None = None
    worker: subprocess.Popen | None = None
    temp: Path | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> None:
        # short: Ray's socket paths under it must stay within 107 bytes
        self.temp = Path(tempfile.mkdtemp(prefix="moco-ray-"))
        token = self.folder / "ray-token"  # a file: the token never appears in a command line
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        self.head = self._node(
            "head",
            "--head",
            f"--port={self.gcs_port}",
            f"--temp-dir={self.temp}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
        )
        wait_for_port(self.gcs_port, READY_TIMEOUT_S, self.head)
        self.start_worker()

    def start_worker(self) -> None:
        """(Re)start the second node and wait until the cluster has both CPUs."""
        self.worker = self._node("worker", f"--address={self.address}")
        self.wait_for_cpus(2)

    def kill_worker(self) -> None:
        """SIGKILL the second node's whole process group (its raylet and its workers)."""
        assert self.worker is not None
        stop_group(self.worker, first=signal.SIGKILL)

    def stop(self) -> None:
        for process in (self.worker, self.head):
            if process is not None:
                stop_group(process)
        if self.temp is not None:
            shutil.rmtree(self.temp, ignore_errors=True)

    def wait_for_cpus(self, cpus: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            status = subprocess.run(
                [RAY, "status", f"--address={self.address}"],
                env=os.environ | self.env,
                capture_output=True,
                text=True,
                timeout=STATUS_TIMEOUT_S,
                check=False,
            )
            if f"/{cpus}.0 CPU" in status.stdout:
                return
            time.sleep(1)
        raise TimeoutError(f"the Ray cluster at {self.address} did not reach {cpus} CPUs")

    def _node(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
        with log:
            return subprocess.Popen(
                [RAY, "start", "--block", "--num-cpus=1", "--disable-usage-stats", *args],
                env=os.environ | self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
