"""Raw training batches (transform=None): uint8 images for an augmentation on the device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from data_stage_helpers import decode_index, identity_pair, write_indexed
from PIL import Image

from moco.augment import BatchMoCoAugment, BatchTwoCrops
from pipeline.dataset import shard_urls, steps_per_epoch, training_loader
from pipeline.shard import shard


def _raw_epoch(urls: list[str], *, workers: int = 2, **options: object) -> list[torch.Tensor]:
    loader = training_loader(
        urls,
        transform=None,
        batch_size=4,
        shuffle_buffer=16,
        seed=0,
        epoch=0,
        loader_workers=workers,
        **options,
    )
    return list(loader)


def test_raw_batches_split_across_ranks_and_workers_exactly_once(
    tmp_path: Path, make_params, monkeypatch
) -> None:
    root = shard(make_params(), str(write_indexed(tmp_path / "src", range(64)))).shards_dir
    urls = shard_urls(root, "train")
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        batches = _raw_epoch(urls)
        assert all(b.shape == (4, 1, 8, 8) and b.dtype == torch.uint8 for b in batches)
        per_rank.append([decode_index(batch) for batch in batches])
    seen = sorted(i for batches in per_rank for batch in batches for i in batch)
    assert seen == list(range(64))
    steps = steps_per_epoch(root, "train", world_size=2, loader_workers=2, batch_size=4)
    assert [len(batches) for batches in per_rank] == [steps, steps]
    view_q, view_k = BatchTwoCrops(BatchMoCoAugment(8))(batches[0])  # what the caller does next
    assert view_q.shape == view_k.shape == (4, 1, 8, 8) and view_q.dtype == torch.float32


def test_mixed_sizes_need_raw_size(tmp_path: Path, make_params) -> None:
    folder = write_indexed(tmp_path / "src", range(8))
    for i in range(8):
        pixels = np.full((12, 20), i * 30, dtype=np.uint8)  # 20 wide, 12 high
        Image.fromarray(pixels).save(folder / f"c{i % 2}" / f"wide{i}.png")
    urls = shard_urls(shard(make_params(), str(folder)).shards_dir, "train")
    with pytest.raises(ValueError, match="raw_size"):
        _raw_epoch(urls, workers=0)
    batches = _raw_epoch(urls, workers=0, raw_size=10)
    assert len(batches) == 4
    assert all(b.shape == (4, 1, 10, 10) and b.dtype == torch.uint8 for b in batches)
    with pytest.raises(ValueError, match="raw_size"):
        training_loader(
            urls,
            transform=identity_pair,
            batch_size=4,
            shuffle_buffer=0,
            seed=0,
            epoch=0,
            loader_workers=0,
            raw_size=10,
        )
