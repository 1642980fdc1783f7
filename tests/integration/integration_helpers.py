"""Shared by the integration tests: a throwaway project folder with real git and DVC, small
params, and Fashion-MNIST images written as files. A plain module (not conftest) so test
modules can import it by name."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from pipeline.config import DataParams
from pipeline.sources import FASHION_MNIST_CLASSES, fashion_mnist

ROOT = Path(__file__).resolve().parents[2]
DVC = str(Path(sys.executable).with_name("dvc"))
BIN = Path(sys.executable).parent

# Small enough for 2 CPUs, real enough to exercise every component.
TINY = {
    "data": {"train_limit": 1024, "test_limit": 256, "min_shards": 4},
    "model": {"width": 8},
    "method": {"queue_size": 256},
    "train": {"epochs": 2, "batch_size": 32, "checkpoint_every": 1},
    "eval": {"batch_size": 256, "monitor_bank": 256, "monitor_queries": 128},
}


def _merge(base: dict, extra: dict) -> dict:
    """`base` updated by `extra`, section by section."""
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def make_project(folder: Path, overrides: dict | None = None) -> Path:
    """Copy the code DVC hashes, write small params, and init git + DVC with a local remote."""
    for name in ("moco", "pipeline"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", folder)
    params = _merge(
        yaml.safe_load((ROOT / "params.yaml").read_text()),
        _merge(TINY, overrides or {}) if overrides else TINY,
    )
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run = lambda *cmd: subprocess.run(cmd, cwd=folder, check=True, capture_output=True)  # noqa: E731
    run("git", "init", "-q")
    run(DVC, "init", "-q")
    run(DVC, "remote", "add", "-d", "local", str(folder / "dvc-remote"))
    return folder


# one epoch and the cheap protocols only: this test is about the records, not the numbers
FLOW = {
    "data": {"source": "images", "labels": "folders", "min_shards": 2},
    "train": {"epochs": 1},
    "eval": {
        "low_label_fractions": [],
        "fewshot_episodes": 0,
        "transfer_source": "",
        "noise_rates": [],
        "supervised_steps": 0,
        "robustness_subset": 0,
        "tsne_points": 0,
    },
}


def write_fashion_images(root: Path, split: str, start: int, count: int) -> None:
    """Fashion-MNIST images `start..start+count` of a split as PNG files in class folders."""
    limits = {"train": 2000, "test": 400}
    images = fashion_mnist(Path(DataParams().fashion_mnist_dir), limits).splits[split]
    for candidate in images[start : start + count]:
        folder = root / split / FASHION_MNIST_CLASSES[candidate.label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{candidate.ref.replace('#', '-')}.png").write_bytes(candidate.read())


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


@contextmanager
def prefect_server(home: Path) -> Iterator[dict[str, str]]:
    """A real `prefect server start` on a free 127.0.0.1 port with its own PREFECT_HOME; yields
    the environment that points a process at it (PREFECT_API_URL)."""
    url = f"http://127.0.0.1:{free_port()}/api"
    env = os.environ | {
        "PREFECT_API_URL": url,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    port = url.split(":")[2].removesuffix("/api")
    server = subprocess.Popen(
        [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", port],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: healthy(url), 120, "prefect server start")
        yield env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
