"""The streaming reader: rank/worker splitting, exact-once epochs, determinism, safe decoding."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import fsspec
import pytest
import torch
from data_stage_helpers import (
    ddp_rank_main,
    decode_index,
    identity_pair,
    indexed_image,
    png_bytes,
    top_left_crop,
    write_indexed,
)
from webdataset import TarWriter

from pipeline.dataset import (
    data_version,
    eval_loader,
    read_manifest,
    shard_urls,
    steps_per_epoch,
    training_loader,
)
from pipeline.shard import shard


@pytest.fixture
def indexed_shards(tmp_path, make_params):
    """64 indexed images in 8 shards of 8 (labels: index % 2)."""
    folder = write_indexed(tmp_path / "src", range(64))
    return shard(make_params(), str(folder)).shards_dir


def _rank_epoch(urls, *, rank, monkeypatch, seed=0, epoch=0, batch=4, workers=2):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = training_loader(
        urls,
        transform=identity_pair,
        batch_size=batch,
        shuffle_buffer=16,
        seed=seed,
        epoch=epoch,
        loader_workers=workers,
    )
    batches = []
    for view_q, view_k in loader:
        assert view_q.shape == (batch, 1, 8, 8) and view_q.dtype == torch.float32
        assert torch.equal(view_q, view_k)
        batches.append(decode_index(view_q))
    return batches


def _flat(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


def test_two_ranks_x_two_workers_see_every_sample_once(indexed_shards, monkeypatch):
    urls = shard_urls(indexed_shards, "train")
    per_rank = [_rank_epoch(urls, rank=rank, monkeypatch=monkeypatch) for rank in (0, 1)]
    seen = [i for batches in per_rank for i in _flat(batches)]
    assert sorted(seen) == list(range(64))
    steps = steps_per_epoch(indexed_shards, "train", world_size=2, loader_workers=2, batch_size=4)
    assert steps == 8 and [len(batches) for batches in per_rank] == [8, 8]


def test_gloo_ranks_split_by_torch_distributed_not_stale_env(indexed_shards, tmp_path):
    urls = shard_urls(indexed_shards, "train")
    torch.multiprocessing.spawn(ddp_rank_main, args=(2, urls, str(tmp_path), 4), nprocs=2)
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    seen = [i for batches in per_rank for i in _flat(batches)]
    assert sorted(seen) == list(range(64))
    assert [len(batches) for batches in per_rank] == [8, 8]


def test_steps_per_epoch_is_the_minimum_over_ranks_for_uneven_shards(
    tmp_path, make_params, monkeypatch
):
    folder = write_indexed(tmp_path / "src", range(40))
    params = make_params()
    shard(params, str(folder))
    write_indexed(folder, range(40, 45))  # an append: 5 one-sample shards
    root = params.data.shards_dir
    shard(params, str(folder))
    counts = [s["samples"] for s in read_manifest(root, "train")["shards"]]
    assert counts == [5] * 8 + [1] * 5
    urls = shard_urls(root, "train")
    actual = [len(_rank_epoch(urls, rank=r, monkeypatch=monkeypatch, batch=3)) for r in (0, 1)]
    steps = steps_per_epoch(root, "train", world_size=2, loader_workers=2, batch_size=3)
    assert actual == [7, 6] and steps == min(actual)
    too_big = steps_per_epoch(root, "train", world_size=2, loader_workers=2, batch_size=64)
    assert too_big == 0


def test_training_order_depends_only_on_seed_and_epoch(indexed_shards, monkeypatch):
    urls = shard_urls(indexed_shards, "train")
    first = _rank_epoch(urls, rank=0, monkeypatch=monkeypatch, seed=3, epoch=1)
    again = _rank_epoch(urls, rank=0, monkeypatch=monkeypatch, seed=3, epoch=1)
    other = _rank_epoch(urls, rank=0, monkeypatch=monkeypatch, seed=3, epoch=2)
    assert first == again
    assert first != other and sorted(_flat(first)) == sorted(_flat(other))


def test_resampled_mode_streams_exactly_the_requested_steps(indexed_shards):
    urls = shard_urls(indexed_shards, "train")
    common = {"transform": identity_pair, "batch_size": 4, "shuffle_buffer": 0, "seed": 0}
    with pytest.raises(ValueError, match="steps"):
        training_loader(urls, **common, epoch=0, loader_workers=0, resampled=True)
    loader = training_loader(urls, **common, epoch=0, loader_workers=1, steps=30, resampled=True)
    assert len(loader) == 30
    batches = [decode_index(q) for q, _ in loader]
    assert len(batches) == 30  # more than one pass over 64 samples
    again = [decode_index(q) for q, _ in loader]
    assert batches == again


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_loader_reads_every_sample_once_with_labels(indexed_shards, workers):
    urls = shard_urls(indexed_shards, "train")
    batches = list(eval_loader(urls, transform=top_left_crop, batch_size=5, loader_workers=workers))
    indices = [i for images, _ in batches for i in decode_index(images)]
    labels = [int(label) for _, labels in batches for label in labels]
    assert sorted(indices) == list(range(64))
    assert labels == [i % 2 for i in indices]
    if workers == 0:  # shard order = manifest order = sorted source paths: c0/... then c1/...
        assert indices == [*range(0, 64, 2), *range(1, 64, 2)]


def test_rgb_shards_give_three_channel_batches(corpus, make_params):
    shards_dir = shard(make_params(max_pixels=1_000_000), str(corpus)).shards_dir
    urls = shard_urls(shards_dir, "train")
    images, labels = next(iter(eval_loader(urls, transform=top_left_crop, batch_size=64)))
    assert images.shape == (11, 3, 4, 4) and labels.dtype == torch.int64


class _Payload:
    """Unpickling this creates a file: proof that a pickle decoder ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_members_are_never_decoded(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    shard_path = tmp_path / "evil.tar"
    with TarWriter(str(shard_path), encoder=False) as writer:
        writer.write(
            {
                "__key__": "sample",
                "png": png_bytes(indexed_image(7)),
                "cls": b"3",
                "pyd": payload,
                "pth": payload,
                "pickle": payload,
            }
        )
    (images, labels), *rest = eval_loader([str(shard_path)], transform=top_left_crop, batch_size=4)
    assert not rest and decode_index(images) == [7] and labels.tolist() == [3]
    assert not marker.exists()


def test_file_and_pipe_urls_read_the_same_samples(indexed_shards):
    paths = shard_urls(indexed_shards, "train")
    variants = [paths, [f"file://{p}" for p in paths], [f"pipe:cat {p}" for p in paths]]
    results = []
    for urls in variants:
        batches = eval_loader(urls, transform=top_left_crop, batch_size=64)
        results.append([i for images, _ in batches for i in decode_index(images)])
    assert results[0] == results[1] == results[2] and len(results[0]) == 64


def test_an_fsspec_shards_dir_is_read_through_fsspec(indexed_shards):
    memory = fsspec.filesystem("memory")
    local = Path(indexed_shards)
    for path in local.rglob("*"):
        if path.is_file():
            memory.pipe(f"/shards-test/{path.relative_to(local).as_posix()}", path.read_bytes())
    remote = "memory://shards-test"
    try:
        assert read_manifest(remote, "train") == read_manifest(local, "train")
        assert data_version(remote) == data_version(local)
        urls = shard_urls(remote, "train")
        assert urls[0] == "memory://shards-test/train/shard-000000.tar"
        batches = eval_loader(urls, transform=top_left_crop, batch_size=64)
        assert sorted(i for images, _ in batches for i in decode_index(images)) == list(range(64))
    finally:
        memory.rm("/shards-test", recursive=True)


def test_more_loader_workers_than_shards_is_fine(tmp_path, make_params):
    folder = write_indexed(tmp_path / "src", range(3))
    urls = shard_urls(shard(make_params(min_shards=1), str(folder)).shards_dir, "train")
    assert len(urls) == 1
    batches = eval_loader(urls, transform=top_left_crop, batch_size=2, loader_workers=2)
    assert sorted(i for images, _ in batches for i in decode_index(images)) == [0, 1, 2]
