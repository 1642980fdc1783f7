"""A throwaway project folder with real git, DVC, MLflow (SQLite), Ray and Prefect."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pipeline.config import DataParams
from pipeline.sources import FASHION_MNIST_CLASSES, fashion_mnist

ROOT = Path(__file__).resolve().parents[2]
DVC = str(Path(sys.executable).with_name("dvc"))

# Small enough for 2 CPUs, real enough to exercise every component.
TINY = {
    "data": {"train_limit": 1024, "test_limit": 256, "min_shards": 4},
    "model": {"width": 8},
    "moco": {"queue_size": 256},
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


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    folder = make_project(tmp_path / "project")
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield folder


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray cluster for the session (starting one costs ~10 s here)."""
    import ray

    from pipeline.ray_cluster import ensure_ray

    ensure_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Prefect's ephemeral server keeps its state in a throwaway folder."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


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


def _write_fashion_images(root: Path, split: str, start: int, count: int) -> None:
    """Fashion-MNIST images `start..start+count` of a split as PNG files in class folders."""
    limits = {"train": 2000, "test": 400}
    images = fashion_mnist(Path(DataParams().fashion_mnist_dir), limits).splits[split]
    for candidate in images[start : start + count]:
        folder = root / split / FASHION_MNIST_CLASSES[candidate.label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{candidate.ref.replace('#', '-')}.png").write_bytes(candidate.read())


@pytest.fixture
def flow_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = make_project(tmp_path / "project", FLOW)
    _write_fashion_images(folder / "images", "train", 0, 1024)
    _write_fashion_images(folder / "images", "test", 0, 256)
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return folder


@pytest.fixture
def write_fashion_images():
    return _write_fashion_images
