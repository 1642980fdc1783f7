"""Raw training batches (transform=None): uint8 images for an augmentation on the device."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from data_stage_helpers import decode_index, identity_pair, write_indexed
from PIL import Image

from moco.augment import BatchMoCoAugment, BatchTwoCrops
from pipeline import dataset
from pipeline.dataset import (
    DecodedShards,
    ShardIntegrityError,
    shard_urls,
    steps_per_epoch,
    training_loader,
)
from pipeline.shard import shard


def _raw_epoch(
    urls: list[str], *, workers: int = 2, epoch: int = 0, **options: object
) -> list[torch.Tensor]:
    loader = training_loader(
        urls,
        transform=None,
        batch_size=4,
        shuffle_buffer=16,
        seed=0,
        epoch=epoch,
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


def _without_decoded_arrays(root: str) -> None:
    """The split as the shard stage writes it for large images: tars only."""
    manifest_path = Path(root) / "train" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for record in manifest["shards"]:
        (manifest_path.parent / record.pop("decoded")["file"]).unlink()
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("arrays", [True, False], ids=["stored-arrays", "tars-only"])
def test_decoded_shards_give_every_epoch_the_same_batches_as_decoding(
    tmp_path: Path, make_params, arrays: bool
) -> None:
    """Epoch 0 reads the stored arrays (or decodes the tars) and keeps the shards, later epochs
    read them from memory: the batches are, epoch by epoch, those of a loader that decodes
    every PNG every time."""
    root = shard(make_params(), str(write_indexed(tmp_path / "src", range(64)))).shards_dir
    if not arrays:
        _without_decoded_arrays(root)
    urls = shard_urls(root, "train")
    decoded = DecodedShards(max_bytes=1 << 20)
    for epoch in range(3):
        plain = _raw_epoch(urls, workers=0, epoch=epoch)
        kept = _raw_epoch(urls, workers=0, epoch=epoch, decoded=decoded)
        assert [decode_index(b) for b in kept] == [decode_index(b) for b in plain]
        assert all(torch.equal(a, b) for a, b in zip(kept, plain, strict=True))
        assert len(decoded) == len(urls) and decoded.bytes == 64 * 8 * 8
    assert sorted(i for b in kept for i in decode_index(b)) == list(range(64))


def test_decoded_shards_keep_only_what_fits_and_only_in_process(
    tmp_path: Path, make_params
) -> None:
    urls = shard_urls(
        shard(make_params(), str(write_indexed(tmp_path / "src", range(64)))).shards_dir, "train"
    )
    decoded = DecodedShards(max_bytes=3 * 8 * 8 * 8)  # three shards of 8 images of 8x8
    first = _raw_epoch(urls, workers=0, decoded=decoded)
    assert len(decoded) == 3 and decoded.bytes == 3 * 8 * 64
    again = _raw_epoch(urls, workers=0, decoded=decoded)  # the rest stream from the tars
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    with pytest.raises(ValueError, match="loader_workers=0"):
        _raw_epoch(urls, workers=2, decoded=decoded)


def test_stored_arrays_spare_every_png_decode(tmp_path: Path, make_params, monkeypatch) -> None:
    root = shard(make_params(), str(write_indexed(tmp_path / "src", range(64)))).shards_dir
    urls = shard_urls(root, "train")

    def refuse(data: bytes) -> torch.Tensor:
        raise AssertionError("a PNG was decoded")

    monkeypatch.setattr(dataset, "decode_image", refuse)
    batches = _raw_epoch(urls, workers=0, decoded=DecodedShards(max_bytes=1 << 20))
    assert sorted(i for b in batches for i in decode_index(b)) == list(range(64))
    _without_decoded_arrays(root)
    with pytest.raises(AssertionError, match="a PNG was decoded"):
        _raw_epoch(urls, workers=0, decoded=DecodedShards(max_bytes=1 << 20))


def test_a_changed_stored_array_fails_naming_it(tmp_path: Path, make_params) -> None:
    root = shard(make_params(), str(write_indexed(tmp_path / "src", range(64)))).shards_dir
    urls = shard_urls(root, "train")
    array = Path(urls[0]).with_suffix(".npy")
    data = bytearray(array.read_bytes())
    data[-1] ^= 0xFF  # one pixel of the last image
    array.write_bytes(bytes(data))
    decoded = DecodedShards(max_bytes=1 << 20)
    with pytest.raises(ShardIntegrityError, match=array.name):
        _raw_epoch(urls[:1], workers=0, decoded=decoded)
    assert len(decoded) == 0


def test_a_shard_is_kept_only_after_its_checksum_passed(tmp_path: Path, make_params) -> None:
    root = shard(make_params(), str(write_indexed(tmp_path / "src", range(64)))).shards_dir
    _without_decoded_arrays(root)
    urls = shard_urls(root, "train")
    path = Path(urls[0])
    data = bytearray(path.read_bytes())
    data[-600] ^= 0xFF  # in the tar's trailing padding: every sample reads, the digest differs
    path.write_bytes(bytes(data))
    decoded = DecodedShards(max_bytes=1 << 20)
    with pytest.raises(ShardIntegrityError, match=path.name):
        _raw_epoch(urls[:1], workers=0, decoded=decoded)
    assert len(decoded) == 0
