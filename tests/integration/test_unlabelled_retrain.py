"""The scenario the pipeline exists for: unlabelled images land in dated folders every day, a
scheduled retrain shards only the new ones, warm-starts from production, is scored on a fixed
labelled benchmark (or, with no labels anywhere, on label-free metrics) and reports drift.

Real Ray Train (2 workers), MLflow (SQLite + registry), Prefect (ephemeral server) and DVC.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from integration_helpers import FLOW, ROOT, make_project
from mlflow.tracking import MlflowClient
from prefect.artifacts import Artifact

from pipeline.config import DataParams, load_params
from pipeline.encoder import load_encoder
from pipeline.evaluation.data import Slice, drift_sides, heldout_slice
from pipeline.evaluation.drift import mmd_drift
from pipeline.evaluation.features import feature_net, load_images
from pipeline.evaluation.label_free import neighbourhood_agreement, rankme
from pipeline.registry import PRODUCTION
from pipeline.sources import fashion_mnist

pytestmark = pytest.mark.integration
DAY = 1000
WARM = "train.init_from=models:/moco-encoder@production"
UNLABELLED = {
    "data": {"source": "incoming", "labels": "none", "holdout_percent": 10, "min_shards": 2},
    "eval": {
        **FLOW["eval"],
        "benchmark_train_limit": 1024,
        "benchmark_test_limit": 256,
        "label_free_samples": 150,
        "drift_samples": 200,
        "drift_permutations": 50,
    },
    # a 900-image day is 14 steps an epoch: at the flow tests' 1 epoch and lr the encoder is
    # still its random init (same seed, same kNN); 4 epochs at lr 0.2 beat it by 8-9 points
    # (measured at seeds 0 and 1)
    "train": {"epochs": 4, "lr": 0.2},
}
BROKEN = {"empty.png": b"", "notes.jpg": b"not a JPEG\n", "cut.png": None}


def _drop(root: Path, day: str, start: int) -> None:
    """Fashion-MNIST training images start..start+DAY as unlabelled PNGs in incoming/<day>/
    (from past the benchmark's first 1024, so the stream and the benchmark do not overlap)."""
    images = fashion_mnist(Path(DataParams().fashion_mnist_dir), {"train": 0, "test": 0})
    folder = root / "incoming" / day
    folder.mkdir(parents=True)
    for candidate in images.splits["train"][10_000 + start : 10_000 + start + DAY]:
        (folder / f"{candidate.ref.replace('#', '-')}.png").write_bytes(candidate.read())


def _broken(folder: Path) -> None:
    for name, data in BROKEN.items():
        whole = next(folder.glob("*.png")).read_bytes()
        (folder / name).write_bytes(whole[: len(whole) // 2] if data is None else data)


def _read(project: Path, name: str) -> dict:
    return json.loads((project / name).read_text())


@torch.no_grad()
def _embed(model_uri: str, piece: Slice) -> torch.Tensor:
    """L2-normalised features of a slice's images by a registered model, computed here (not by
    the evaluate stage) to check which model and which images its numbers came from."""
    encoder, spec = load_encoder(model_uri)
    images = load_images(
        piece.urls,
        image_size=spec.image_size,
        channels=spec.in_channels,
        batch_size=256,
        limit=piece.samples,
    )
    return feature_net(encoder)(images.float() / 255)


@pytest.fixture
def stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = make_project(tmp_path / "project", UNLABELLED)
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return folder


def test_daily_unlabelled_drops_retrain_on_a_benchmark_then_on_label_free_metrics(
    stream: Path, ray_cluster: None
) -> None:
    from flows.retrain import retrain

    overrides = ["data.labels=none", "eval.benchmark=fashion-mnist"]
    _drop(stream, "2026-11-30", 0)
    state = retrain(params_file="params.yaml", overrides=overrides, return_state=True)
    assert state.is_completed(), state.message

    train = _read(stream, "data/shards/train/manifest.json")
    holdout = _read(stream, "data/shards/holdout/manifest.json")
    assert train["classes"] == [] and train["label_counts"] == {}  # no label from the dates
    assert train["samples"] + holdout["samples"] == DAY and 50 <= holdout["samples"] <= 150
    bench = _read(stream, "data/benchmark/test/manifest.json")
    assert bench["samples"] == 256 and len(bench["classes"]) == 10
    day1 = _read(stream, "metrics-full.json")
    assert day1["benchmark_version"] and 0.0 < day1["knn_top1"] <= 1.0
    assert "drift_mmd2" not in day1 and "agreement_production" not in day1  # nothing to compare
    params = load_params("params.yaml", overrides)
    heldout = heldout_slice(params)
    assert heldout is not None and heldout.samples == min(150, holdout["samples"])

    mlflow.set_tracking_uri(f"sqlite:///{stream / 'mlflow.db'}")
    client = MlflowClient()
    run_id = _read(stream, "models/encoder/run.json")["run_id"]
    run = client.get_run(run_id)
    assert run.info.run_name.startswith("retrain-") and run.info.run_name.endswith(
        day1["data_version"]
    )
    inputs = {(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs}
    assert ("train-stream", day1["data_version"]) in inputs
    assert ("fashion-mnist", day1["benchmark_version"]) in inputs
    first = _read(stream, "promotion.json")
    assert first["promoted"], first["reason"]  # beat random init: production from day 1
    v1 = f"models:/moco-encoder/{first['version']}"
    assert day1["rankme"] == pytest.approx(rankme(_embed(v1, heldout)), rel=1e-4)

    # day 2: more images and a few broken files; warm start from production
    old_shards = {p.name: p.read_bytes() for p in (stream / "data/shards/train").glob("*.tar")}
    _drop(stream, "2026-12-01", DAY)
    _broken(stream / "incoming/2026-12-01")
    state = retrain(params_file="params.yaml", overrides=[*overrides, WARM], return_state=True)
    assert state.is_completed(), state.message

    train2 = _read(stream, "data/shards/train/manifest.json")
    holdout2 = _read(stream, "data/shards/holdout/manifest.json")
    assert train2["samples"] + holdout2["samples"] == 2 * DAY
    for name, data in old_shards.items():  # only the new images were sharded
        assert (stream / "data/shards/train" / name).read_bytes() == data
    reasons = {q["path"]: q["reason"] for q in train2["quarantine"] + holdout2["quarantine"]}
    assert set(reasons) == {f"2026-12-01/{name}" for name in BROKEN}
    assert "empty" in reasons["2026-12-01/empty.png"]
    assert "not an image" in reasons["2026-12-01/notes.jpg"]
    assert "truncated" in reasons["2026-12-01/cut.png"]
    day2 = _read(stream, "metrics-full.json")
    assert day2["benchmark_version"] == day1["benchmark_version"]  # the same fixed benchmark
    # drift: production (day 1's model) embeds what it was trained on and what came since
    sides = drift_sides(params, train["samples"])
    assert sides is not None
    old, new = (_embed(v1, side) for side in sides)
    sizes = (day2["drift_old_samples"], day2["drift_new_samples"])
    assert sizes == (len(old), len(new)) == (200, 200)
    expected = mmd_drift(old, new, permutations=50, seed=params.eval.seed)
    assert day2["drift_mmd2"] == pytest.approx(expected.mmd2, rel=1e-3, abs=1e-6)
    assert day2["drift_p_value"] == pytest.approx(expected.p_value, abs=1.01 / 51)  # float ties
    assert abs(day2["drift_mmd2"]) < 0.02  # day 2 is more of the same images: no real shift
    second = _read(stream, "promotion.json")
    heldout2 = heldout_slice(params)
    assert heldout2 is not None
    mine = _embed(f"models:/moco-encoder/{second['version']}", heldout2)
    agreement = neighbourhood_agreement(mine, _embed(v1, heldout2), params.eval.agreement_k)
    assert day2["agreement_production"] == pytest.approx(agreement, abs=1e-6)
    assert f"vs production v{first['version']}" in second["reason"]
    summary = Artifact.get("retrain-summary").data
    assert "warm start from models:/moco-encoder@production" in summary
    assert "MMD^2" in summary and "3 new file(s) quarantined" in summary
    version = client.get_model_version("moco-encoder", second["version"])
    assert version.tags["benchmark_version"] == day1["benchmark_version"]
    assert second["reason"] in version.description

    # no labels anywhere: no benchmark, gated on the effective rank of the embeddings
    production = client.get_model_version_by_alias("moco-encoder", PRODUCTION).version
    label_free = ["eval.benchmark=''", "registry.primary_metric=rankme", WARM]
    state = retrain(params_file="params.yaml", overrides=label_free, return_state=True)
    assert state.is_completed(), state.message
    day3 = _read(stream, "metrics-full.json")
    assert "knn_top1" not in day3 and day3["benchmark_version"] == ""
    third = _read(stream, "promotion.json")
    assert third["metric"] == "rankme" and f"vs production v{production}" in third["reason"]
    assert third["candidate"] == day3["rankme"]
    # drift only against a production trained on less than the stream holds now
    assert ("drift_mmd2" in day3) == (not second["promoted"])


def test_a_flow_that_could_not_evaluate_is_refused_before_training(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project", UNLABELLED)
    _drop(project, "2026-11-30", 0)
    out = subprocess.run(
        [sys.executable, "-m", "flows", "retrain", "--set", "data.labels=none"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: registry.primary_metric=knn_top1 needs labels")
    assert "eval.benchmark=fashion-mnist" in last
    assert not (project / "runs/ray").exists() and not (project / "models").exists()
