"""Drift: MMD^2 against a numpy reference, its permutation p-value on known cases, and which
shards each side of the comparison reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_params
from pipeline.evaluation.data import drift_sides
from pipeline.evaluation.drift import mmd_drift

PERMUTATIONS = 99


def _gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + shift


def _mmd2_numpy(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3) with a Gaussian kernel whose bandwidth is
    the (lower) median of the pooled pairwise squared distances, written out by hand."""
    pooled = np.concatenate([x, y]).astype(np.float64)
    squared = ((pooled[:, None, :] - pooled[None, :, :]) ** 2).sum(-1)
    pairs = np.sort(squared[np.triu_indices(len(pooled), k=1)])
    bandwidth = pairs[(len(pairs) - 1) // 2]
    n, m = len(x), len(y)
    k = np.exp(-squared / bandwidth)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return float(
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2 * kxy.mean()
    )


def test_mmd2_matches_numpy_reference() -> None:
    old, new = _gaussian(40, 6, 0), _gaussian(30, 6, 1, shift=0.5)
    drift = mmd_drift(old, new, permutations=5, seed=0)
    assert drift.mmd2 == pytest.approx(_mmd2_numpy(old.numpy(), new.numpy()), rel=1e-9)
    assert (drift.old, drift.new) == (40, 30)


def test_same_distribution_has_no_drift() -> None:
    drift = mmd_drift(_gaussian(150, 8, 2), _gaussian(150, 8, 3), permutations=PERMUTATIONS, seed=0)
    shifted = mmd_drift(
        _gaussian(150, 8, 2), _gaussian(150, 8, 3, shift=1.0), permutations=5, seed=0
    )
    assert abs(drift.mmd2) < 0.02 * shifted.mmd2  # ~0, next to a real shift's size
    assert drift.p_value > 0.05  # not evidence of a difference


def test_shifted_distribution_sits_at_the_permutation_floor() -> None:
    drift = mmd_drift(
        _gaussian(150, 8, 4), _gaussian(150, 8, 5, shift=1.0), permutations=PERMUTATIONS, seed=0
    )
    assert drift.mmd2 > 0.05
    assert drift.p_value == pytest.approx(1 / (PERMUTATIONS + 1))


def _manifest(shards: Path, samples: list[int]) -> None:
    listed = [
        {"file": f"shard-{i:06d}.tar", "samples": n, "sha256": f"{i:064x}"}
        for i, n in enumerate(samples)
    ]
    (shards / "train").mkdir(parents=True)
    (shards / "train" / "manifest.json").write_text(
        json.dumps({"split": "train", "samples": sum(samples), "shards": listed})
    )


def test_drift_sides_split_at_what_production_saw(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    _manifest(shards, [10] * 8)  # production trained on the first 4 shards (40 images)
    params = load_params(None, [f"data.shards_dir={shards}", "eval.drift_samples=20"])
    sides = drift_sides(params, trained_on=40)
    assert sides is not None
    old, new = sides
    names = [[Path(u).name for u in side.urls] for side in (old, new)]
    # every 2nd shard of each side: 20 images spread over its whole range
    assert names == [
        ["shard-000000.tar", "shard-000002.tar"],
        ["shard-000004.tar", "shard-000006.tar"],
    ]
    assert (old.samples, new.samples) == (20, 20)
    assert all(Path(u).parent == (shards / "train").resolve() for u in old.urls + new.urls)
    assert old.version != new.version


def test_drift_sides_none_when_nothing_to_compare(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    _manifest(shards, [10] * 8)
    params = load_params(None, [f"data.shards_dir={shards}", "eval.drift_samples=20"])
    assert drift_sides(params, trained_on=80) is None  # nothing arrived since
    assert drift_sides(params, trained_on=45) is None  # not a shard boundary: split rebuilt
    off = load_params(None, [f"data.shards_dir={shards}", "eval.drift_samples=0"])
    assert drift_sides(off, trained_on=40) is None
