"""The in-memory splits equal what the eval loader gives; the feature cache and its key."""

from __future__ import annotations

from pathlib import Path

import torch
from evaluation_helpers import TINY_SPEC

from moco.augment import eval_transform
from pipeline.dataset import eval_loader, shard_urls
from pipeline.evaluation.features import (
    LOADER_WORKERS,
    cached,
    load_split,
    model_fingerprint,
)


def test_split_in_memory_equals_the_eval_loader(digits_shards: Path) -> None:
    split = load_split(str(digits_shards), "test", image_size=16, channels=1, batch_size=100)
    batches = list(
        eval_loader(
            shard_urls(digits_shards, "test"),
            transform=eval_transform(16),
            batch_size=100,
            loader_workers=LOADER_WORKERS,
        )
    )
    images, labels = (torch.cat(column) for column in zip(*batches, strict=True))
    assert split.images.dtype == torch.uint8 and split.images.shape == (len(labels), 1, 16, 16)
    assert torch.equal(split.floats(), images) and torch.equal(split.labels, labels)
    assert split.num_classes == 10
    rgb = load_split(str(digits_shards), "test", image_size=16, channels=3, batch_size=100)
    assert rgb.images.shape[1] == 3 and torch.equal(rgb.images[:, 1:2], split.images)


def test_cache_computes_once_per_key(tmp_path: Path) -> None:
    calls = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return torch.arange(12.0).view(4, 3)

    first = cached(tmp_path / "key", "train", compute, rows=4)
    second = cached(tmp_path / "key", "train", compute, rows=4)
    assert torch.equal(first, second) and len(calls) == 1
    cached(tmp_path / "key", "train", compute, rows=5)  # a changed split is recomputed
    cached(None, "train", compute, rows=4)  # no cache folder: always computed
    assert len(calls) == 3


def test_fingerprint_follows_weights_and_settings() -> None:
    torch.manual_seed(0)
    encoder, _ = TINY_SPEC.build()
    key = model_fingerprint(encoder, bf16=False)
    assert key == model_fingerprint(encoder, bf16=False)
    assert key != model_fingerprint(encoder, bf16=True)
    with torch.no_grad():
        next(encoder.parameters()).add_(1e-3)
    assert key != model_fingerprint(encoder, bf16=False)
