"""Disk after N scheduled retrains on small daily drops, with or without the retention policy.

Builds a throwaway project (git, DVC with a local remote, MLflow on SQLite), writes a small
unlabelled drop of Fashion-MNIST training images per day, runs the real `retrain` flow (Ray
Train, Prefect, MLflow, DVC) on it with a tiny config, and after each run prints and appends to
`<project>/sizes.jsonl` the bytes `du` counts in each store. Sizes, not times: the machine may
be shared.

    python bench/storage_growth.py /tmp/growth-off --policy off   # retention.enabled false, copies
    python bench/storage_growth.py /tmp/growth-on --policy on     # the defaults of params.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import DataParams  # noqa: E402
from pipeline.sources import fashion_mnist  # noqa: E402

DVC = str(Path(sys.executable).with_name("dvc"))
STORES = {  # column -> paths `du` counts together (shared hardlinks once)
    "runs/ray": ["runs/ray"],
    "runs/features": ["runs/features"],
    "data/": ["data"],
    ".dvc/cache": [".dvc/cache"],
    "data/ + .dvc/cache": ["data", ".dvc/cache"],
    "DVC remote": ["dvc-remote"],
    "mlartifacts": ["mlartifacts"],
    "mlflow.db": ["mlflow.db"],
    "total": ["runs", "data", ".dvc/cache", "dvc-remote", "mlartifacts", "mlflow.db", "models"],
}
TINY = {  # one epoch of a width-8 ResNet-10 on a few hundred images; the cheap protocols only
    "data": {"source": "incoming", "labels": "none", "holdout_percent": 10, "min_shards": 2},
    "model": {"width": 8},
    "moco": {"queue_size": 256},
    "train": {"epochs": 1, "batch_size": 32, "num_workers": 1, "precision": "fp32"},
    "eval": {
        "benchmark": "fashion-mnist",
        "benchmark_train_limit": 1000,
        "benchmark_test_limit": 250,
        "batch_size": 256,
        "label_free_samples": 100,
        "drift_samples": 100,
        "drift_permutations": 20,
        "low_label_fractions": [],
        "fewshot_episodes": 0,
        "transfer_source": "",
        "noise_rates": [],
        "supervised_steps": 0,
        "robustness_subset": 0,
        "tsne_points": 0,
    },
}
WARM = "train.init_from=models:/moco-encoder@production"


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def make_project(folder: Path, policy: bool) -> None:
    """The repo's code and dvc.yaml, tiny params, git + DVC; `policy` off also keeps DVC's
    default link type (copies), as the project had before retention."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in ("moco", "pipeline"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", folder)
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    params["retention"]["enabled"] = policy
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run = lambda *cmd: subprocess.run(cmd, cwd=folder, check=True, capture_output=True)  # noqa: E731
    run("git", "init", "-q")
    run(DVC, "init", "-q")
    if policy:
        shutil.copy(ROOT / ".dvc/config", folder / ".dvc/config")
    run(DVC, "remote", "add", "-d", "-f", "local", str(folder / "dvc-remote"))


def drop(folder: Path, day: int, count: int) -> None:
    """`count` Fashion-MNIST training images as incoming/day-NN/<n>.png (past the benchmark's)."""
    images = fashion_mnist(Path(DataParams().fashion_mnist_dir), {"train": 0, "test": 0})
    start = 10_000 + day * count
    target = folder / "incoming" / f"day-{day:02d}"
    target.mkdir(parents=True)
    for n, candidate in enumerate(images.splits["train"][start : start + count]):
        (target / f"{start + n:06d}.png").write_bytes(candidate.read())


def sizes(folder: Path) -> dict[str, int]:
    found = {}
    for column, paths in STORES.items():
        present = [p for p in paths if (folder / p).exists()]
        if not present:
            found[column] = 0
            continue
        out = subprocess.run(
            ["du", "-sb", "--total", *present], cwd=folder, capture_output=True, text=True
        )
        found[column] = int(out.stdout.strip().splitlines()[-1].split()[0])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--policy", choices=["on", "off"], required=True)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--images", type=int, default=300, help="per daily drop")
    args = parser.parse_args()
    folder = args.folder.resolve()
    make_project(folder, args.policy == "on")
    os.chdir(folder)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ["PREFECT_HOME"] = str(folder / ".prefect")  # its own ephemeral server state
    os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "600"  # a loaded machine
    from flows.retrain import retrain

    for day in range(1, args.runs + 1):
        drop(folder, day, args.images)
        overrides = [WARM] if day > 1 else []
        state = retrain(params_file="params.yaml", overrides=overrides, return_state=True)
        row = {"run": day, "ok": state.is_completed(), **sizes(folder)}
        with open(folder / "sizes.jsonl", "a") as out:
            out.write(json.dumps(row) + "\n")
        print("SIZES " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
