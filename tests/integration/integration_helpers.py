"""Shared by the integration tests: a throwaway project folder with real git and DVC, small
params, and Fashion-MNIST images written as files. A plain module (not conftest) so test
modules can import it by name."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.config import DataParams
from pipeline.sources import FASHION_MNIST_CLASSES, fashion_mnist

ROOT = Path(__file__).resolve().parents[2]
DVC = str(Path(sys.executable).with_name("dvc"))

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
