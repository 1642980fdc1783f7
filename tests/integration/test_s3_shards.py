"""The shard stage and the readers on a real S3-compatible server (moto), through the standard
AWS environment only."""

from __future__ import annotations

import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.config import Params, load_params
from pipeline.dataset import (
    ShardIntegrityError,
    data_version,
    eval_loader,
    read_manifest,
    shard_urls,
)
from pipeline.errors import StageError
from pipeline.shard import shard

pytestmark = pytest.mark.integration


def _images(root: Path, indices: range) -> Path:
    """8x8 grayscale PNGs whose first pixel pair spells the index, in class folders c0/c1."""
    for i in indices:
        pixels = np.full((8, 8), i % 251, dtype=np.uint8)
        pixels[0, 0], pixels[0, 1] = divmod(i, 256)
        folder = root / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"img{i:05d}.png")
    return root


def _params(shards_dir: str, **data: object) -> Params:
    settings = {"labels": "folders", "holdout_percent": 0, "min_shards": 4} | data
    overrides = [f"data.shards_dir={shards_dir}"] + [f"data.{k}={v}" for k, v in settings.items()]
    return load_params(None, overrides)


def _indices(urls: list[str]) -> list[int]:
    batches = eval_loader(urls, transform=lambda x: x, batch_size=16)
    return sorted(int(p[0, 0, 0]) * 256 + int(p[0, 0, 1]) for images, _ in batches for p in images)


def test_shard_append_and_read_on_s3(s3_bucket: str, tmp_path: Path) -> None:
    source = _images(tmp_path / "src", range(40))
    url = f"{s3_bucket}/shards"
    started = time.perf_counter()
    summary = shard(_params(url), str(source))
    print(f"sharded 40 images to S3 in {time.perf_counter() - started:.2f} s")
    assert summary.shards_dir == url
    local = shard(_params(str(tmp_path / "local")), str(source))
    assert summary.data_version == local.data_version == data_version(url)  # same bytes
    urls = shard_urls(url, "train")
    assert len(urls) == 4 and all(u.startswith(f"{url}/train/shard-") for u in urls)
    assert _indices(urls) == list(range(40))

    fs = fsspec.filesystem("s3")
    before = {u: fs.info(u)["ETag"] for u in urls}
    _images(source, range(40, 56))
    appended = shard(_params(url), str(source))
    assert appended.splits["train"]["new_samples"] == 16
    manifest = read_manifest(url, "train")
    assert manifest["samples"] == 56 and len(manifest["shards"]) == 8
    assert {u: fs.info(u)["ETag"] for u in urls} == before  # old shards never rewritten
    assert _indices(shard_urls(url, "train")) == list(range(56))
    assert shard(_params(url), str(source)).skipped


def test_s3_refuses_rebuild_and_corrupt_shards(s3_bucket: str, tmp_path: Path) -> None:
    source = _images(tmp_path / "src", range(24))
    url = f"{s3_bucket}/shards"
    shard(_params(url), str(source))
    version = data_version(url)
    with pytest.raises(StageError, match=r"data\.shards_dir=s3://.*'train' must be rebuilt"):
        shard(_params(url, min_shards=6), str(source))
    assert data_version(url) == version  # the refused rebuild wrote nothing

    urls = shard_urls(url, "train")
    other = shard(_params(str(tmp_path / "other")), str(_images(tmp_path / "o", range(99, 123))))
    replacement = Path(other.shards_dir, "train", "shard-000001.tar").read_bytes()
    fsspec.filesystem("s3").pipe(urls[1], replacement)  # a valid tar, the wrong bytes
    with pytest.raises(ShardIntegrityError, match=r"shard s3://.*/train/shard-000001\.tar"):
        _indices(urls)


def test_preflight_refuses_wrong_credentials_and_missing_bucket(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.preflight import check_endpoints

    endpoint = f"AWS_ENDPOINT_URL={__import__('os').environ['AWS_ENDPOINT_URL']}"
    check_endpoints(_params(f"{s3_bucket}/shards"))  # the right bucket and keys pass
    with pytest.raises(StageError) as missing:
        check_endpoints(_params("s3://no-such-bucket/shards"))
    assert str(missing.value) == (
        f"data.shards_dir=s3://no-such-bucket/shards ({endpoint}): bucket no-such-bucket does "
        "not exist; create it or fix data.shards_dir"
    )
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGKEYVALUE000")
    with pytest.raises(StageError) as refused:
        check_endpoints(_params(f"{s3_bucket}/shards"))
    message = str(refused.value)
    assert message.startswith(f"data.shards_dir={s3_bucket}/shards ({endpoint}): the object")
    assert "refused our credentials" in message and "AWS_ACCESS_KEY_ID" in message
    assert "AKIAWRONGKEYVALUE000" not in message and "\n" not in message
