"""The benchmark stage refuses a benchmark that shares images with the training stream."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from data_stage_helpers import indexed_image

from pipeline.benchmark import benchmark
from pipeline.config import Params, load_params
from pipeline.shard import shard
from pipeline.sources import SourceError


def _images(root: Path, start: int, count: int) -> None:
    for i in range(start, start + count):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        indexed_image(i).save(root / f"c{i % 2}" / f"{i:03d}.png")


def _params(tmp_path: Path) -> Params:
    return load_params(
        None,
        [
            f"data.source={tmp_path / 'stream'}",
            "data.labels=none",
            "data.holdout_percent=0",
            f"data.shards_dir={tmp_path / 'shards'}",
            f"eval.benchmark={tmp_path / 'bench'}",
            f"eval.benchmark_dir={tmp_path / 'benchmark'}",
        ],
    )


def test_a_benchmark_apart_from_the_stream_passes_one_that_overlaps_is_refused(
    tmp_path: Path,
) -> None:
    _images(tmp_path / "bench" / "train", 0, 6)
    _images(tmp_path / "bench" / "test", 6, 4)
    _images(tmp_path / "stream" / "day1", 20, 8)
    params = _params(tmp_path)
    shard(params)
    assert benchmark(params) is not None  # apart from the stream: sharded, no complaint

    # a drop that brings one of the benchmark's test images (another name, same bytes)
    (tmp_path / "stream" / "day2").mkdir()
    shutil.copyfile(tmp_path / "bench/test/c1/007.png", tmp_path / "stream/day2/new.png")
    shard(params)
    with pytest.raises(SourceError) as refused:
        benchmark(params)
    message = str(refused.value)
    assert "\n" not in message
    assert "1 image(s) of its test split are also in the training stream" in message
    assert "c1/007.png" in message
