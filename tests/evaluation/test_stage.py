"""The whole stage on digits with a tiny encoder: keys, label-free values against numpy,
files, determinism, the cache."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from evaluation_helpers import tiny_params

from pipeline.dataset import read_manifest
from pipeline.encoder import load_encoder
from pipeline.evaluate import EvalReport, evaluate, score
from pipeline.evaluation.data import heldout_slice
from pipeline.evaluation.features import load_images
from pipeline.train_worker import build_augment


@dataclass
class Runs:
    root: Path
    first: EvalReport
    second: EvalReport


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, digits_shards: Path, tiny_encoder: Path) -> Runs:
    """Two stage runs with the same seed, each with a feature cache of its own (the second
    extracts every feature again instead of reading the first's)."""
    root = tmp_path_factory.mktemp("stage")
    first = evaluate(tiny_params(root, digits_shards), str(tiny_encoder))
    fresh = tiny_params(root, digits_shards, features_dir=root / "features-second")
    second = evaluate(fresh, str(tiny_encoder))
    return Runs(root, first, second)


def test_same_seed_same_numbers(runs: Runs) -> None:
    assert runs.first.metrics == runs.second.metrics
    for cache in ("features", "features-second"):  # both extracted, neither read the other
        assert any((runs.root / cache).rglob("train.npy")), f"no feature cache in {cache}"


def _embed(net: torch.nn.Module, batch: torch.Tensor) -> np.ndarray:
    return F.normalize(net(batch).flatten(1).float(), dim=1).numpy()


def _rankme(x: np.ndarray) -> float:
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]  # raw pixels: constant border pixels give zero singular values
    return float(np.exp(-(p * np.log(p)).sum()))


def _uniformity(x: np.ndarray) -> float:
    x = x.astype(np.float64)
    squared = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)[np.triu_indices(len(x), k=1)]
    return float(np.log(np.mean(np.exp(-2.0 * squared))))


def _alignment(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum((a.astype(np.float64) - b) ** 2, axis=1)))


@torch.no_grad()
def test_label_free_metrics_match_references(
    runs: Runs, digits_shards: Path, tiny_encoder: Path
) -> None:
    """RankMe, uniformity and alignment of the encoder and both references, recomputed here
    with numpy from features of the held-out images (digits: the test split)."""
    params = tiny_params(runs.root, digits_shards)
    piece = heldout_slice(params)
    assert piece is not None and piece.samples > 300  # the digits test split, all of it
    encoder, spec = load_encoder(tiny_encoder)
    images = load_images(piece.urls, image_size=16, channels=1, batch_size=256, limit=piece.samples)
    torch.manual_seed(params.eval.seed)  # the stage's random-init reference of this shape
    random_encoder, _ = spec.build()
    nets = {"": encoder.eval(), "pixels_": torch.nn.Identity(), "random_": random_encoder.eval()}
    augment = build_augment(params, 16)
    for prefix, net in nets.items():
        features = _embed(net, images.float() / 255)
        generator = torch.Generator().manual_seed(params.eval.seed)  # the stage's views
        views = [
            np.concatenate(
                [_embed(net, augment(chunk, generator=generator)) for chunk in images.split(256)]
            )
            for _ in "ab"
        ]
        m = runs.first.metrics
        assert m[f"{prefix}rankme"] == pytest.approx(_rankme(features), rel=1e-3), prefix
        assert m[f"{prefix}uniformity"] == pytest.approx(_uniformity(features), rel=1e-4), prefix
        assert m[f"{prefix}alignment"] == pytest.approx(_alignment(*views), rel=1e-3), prefix
    # raw pixels of 360 digits span far more directions than a width-4 random network
    assert runs.first.metrics["pixels_rankme"] > runs.first.metrics["random_rankme"]


def test_report_keys(runs: Runs, digits_shards: Path) -> None:
    m = runs.first.metrics
    own = [
        "knn_top1",
        "knn5_top1",
        "linear_top1",
        "linear_1pct_top1",
        "linear_10pct_top1",
        "fewshot_5w1s",
        "fewshot_5w1s_ci95",
        "fewshot_5w5s",
        "fewshot_5w5s_ci95",
        "transfer_digits_linear_top1",
        "noise20_linear_top1",
        "noise40_linear_top1",
        "robust_clean_top1",
        "corruption_mean_top1",
        "corruption_gaussian_noise_s1_top1",
        "corruption_gaussian_blur_s3_top1",
        "corruption_contrast_s3_top1",
        "fgsm_eps0.05_top1",
        "pgd_eps0.05_top1",
    ]
    for key in own:
        assert key in m and f"pixels_{key}" in m and f"random_{key}" in m, key
    for key in ("supervised_top1", "noise40_supervised_top1"):  # eval.supervised_noise_rates
        assert key in m and f"pixels_{key}" not in m, key
    assert "noise20_supervised_top1" not in m
    for key in ("fgsm_eps0.05", "pgd_eps0.05", "corruption_mean"):
        assert f"{key}_supervised_top1" in m
    # its budget, stated: 10 steps x 16 images over the digits train split
    train_images = sum(s["samples"] for s in read_manifest(digits_shards, "train")["shards"])
    assert m["supervised_train_epochs"] == pytest.approx(10 * 16 / train_images)
    for key in ("rankme", "alignment", "uniformity"):  # values: test_label_free_metrics_...
        assert key in m and f"pixels_{key}" in m and f"random_{key}" in m, key
    label_free = {"rankme", "alignment", "uniformity"}
    accuracies = [
        v
        for k, v in m.items()
        if not k.endswith("_ci95")
        and k != "supervised_train_epochs"
        and k.removeprefix("pixels_").removeprefix("random_") not in label_free
    ]
    assert all(0.0 <= v <= 1.0 for v in accuracies)
    # digits are easy: raw pixels are far above chance (1/10) by every probe
    assert m["pixels_linear_top1"] > 0.8 and m["pixels_knn_top1"] > 0.8


def test_outputs_written(runs: Runs) -> None:
    payload = json.loads((runs.root / "metrics-full.json").read_text())
    assert payload.pop("data_version") == runs.first.data_version
    for key in ("benchmark_version", "heldout_version", "eval_version"):
        assert payload.pop(key) == runs.first.versions[key]
    assert payload == runs.first.metrics
    # the headline DVC shows: the same few keys per subject, one file (a table row) each
    m, headline = runs.first.metrics, ["knn_top1", "linear_top1", "rankme"]
    assert json.loads((runs.root / "metrics.json").read_text()) == {k: m[k] for k in headline}
    for reference in ("pixels", "random"):
        rows = json.loads((runs.root / f"metrics-{reference}.json").read_text())
        assert rows == {k: m[f"{reference}_{k}"] for k in headline}
    names = {p.name for p in (runs.root / "plots").glob("*.png")}
    assert names == {
        "tsne.png",
        "confusion.png",
        "fewshot.png",
        "adversarial.png",
        "corruptions.png",
    }
    assert "pixels" in runs.first.render()


def test_score_without_references_matches(
    runs: Runs, digits_shards: Path, tiny_encoder: Path
) -> None:
    params = tiny_params(runs.root, digits_shards)
    alone = score(params, str(tiny_encoder), references=False)
    assert alone == {k: v for k, v in runs.first.metrics.items() if k in alone}
    own = {k for k in runs.first.metrics if not k.startswith(("pixels_", "random_"))}
    assert set(alone) == {k for k in own if "supervised" not in k}
