"""Encoded training batches (train.gpu_decode): the loader passes each image's bytes and
`decode_batch` decodes them on the training device; the images must be those the loader's own
decoding gives."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import encode_jpeg

from pipeline.config import load_params
from pipeline.dataset import (
    _pack_encoded,
    decode_batch,
    decode_image,
    shard_urls,
    training_loader,
)
from pipeline.shard import shard
from pipeline.train_worker import decodes_on_device, views_on_device

SIZE = 10
# (width, height) of the JPEGs: mixed, so each is resized and centre-cropped to SIZE
SHAPES = [(20, 12), (16, 16), (12, 18), (24, 14)]


def _colour_folder(folder: Path) -> Path:
    """16 RGB JPEGs of mixed sizes (smooth gradients with a per-image tint) and 4 RGB PNGs."""
    rng = np.random.default_rng(0)
    for i in range(20):
        width, height = SHAPES[i % len(SHAPES)]
        ramp = np.linspace(0, 1, width * height).reshape(height, width, 1)
        pixels = (255 * ramp * rng.uniform(0.3, 1.0, 3)).astype(np.uint8)
        path = folder / f"c{i % 2}" / (f"{i:02d}.png" if i % 5 == 4 else f"{i:02d}.jpg")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
    return folder


def _epoch(urls: list[str], workers: int, transform=None, **options: object) -> list:
    loader = training_loader(
        urls,
        transform=transform,
        batch_size=4,
        shuffle_buffer=8,
        seed=0,
        epoch=0,
        loader_workers=workers,
        **options,
    )
    return list(loader)


@pytest.fixture
def colour_urls(tmp_path: Path, make_params) -> list[str]:
    folder = _colour_folder(tmp_path / "src")
    params = make_params(image_mode="RGB")
    urls = shard_urls(shard(params, str(folder)).shards_dir, "train")
    members = []
    for url in urls:
        with tarfile.open(url) as tar:
            members += [Path(name).suffix for name in tar.getnames()]
    assert members.count(".jpg") == 16 and members.count(".png") == 4  # kept as they came
    return urls


def _decoded_like_the_loader(urls: list[str], device: torch.device, workers: int) -> float:
    """Largest mean absolute difference (0-255 levels) between a batch decoded by
    decode_batch on `device` and the same batch decoded by the loader on the CPU."""
    plain = _epoch(urls, workers, raw_size=SIZE)
    encoded = _epoch(urls, workers, raw_size=SIZE, encoded=True)
    assert len(encoded) == len(plain) >= 4
    # the JPEGs come as their bytes, the PNGs decoded by the loader (no GPU decoder for them)
    assert sum(len(batch["jpeg_at"]) for batch in encoded) > 0
    assert sum(len(batch["image_at"]) for batch in encoded) > 0
    worst = 0.0
    for raw, batch in zip(plain, encoded, strict=True):
        assert batch["jpeg_bytes"].dtype == torch.uint8 and batch["jpeg_bytes"].ndim == 1
        images = decode_batch(batch, SIZE, 3, device)
        assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.uint8
        assert images.device.type == device.type
        difference = (images.cpu().float() - raw.float()).abs().mean().item()
        worst = max(worst, difference)
    return worst


def test_encoded_batches_decode_to_the_loaders_images(colour_urls: list[str]) -> None:
    """On the CPU torchvision's libjpeg-turbo decodes JPEGs as PIL does: the same pixels, in
    the same order, also through loader processes."""
    for workers in (0, 2):
        assert _decoded_like_the_loader(colour_urls, torch.device("cpu"), workers) == 0.0


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: GPU JPEG decoding (nvJPEG) not run here"
)
def test_encoded_batches_decode_on_the_gpu(colour_urls: list[str]) -> None:
    """nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by a level or two; a
    wrong channel order, crop or colour mode differs by tens."""
    assert _decoded_like_the_loader(colour_urls, torch.device("cuda"), 0) < 3.0


def test_a_batch_of_only_jpegs_or_only_decoded_images() -> None:
    image = torch.arange(3 * SIZE * SIZE, dtype=torch.uint8).reshape(3, SIZE, SIZE)
    encoded = encode_jpeg(image, quality=100)
    cpu = torch.device("cpu")
    only_decoded = decode_batch(_pack_encoded([image, image]), SIZE, 3, cpu)
    assert torch.equal(only_decoded, torch.stack([image, image]))
    only_jpegs = decode_batch(_pack_encoded([encoded, encoded]), SIZE, 3, cpu)
    expected = decode_image(encoded.numpy().tobytes())  # PIL, as the loader decodes
    assert torch.equal(only_jpegs, torch.stack([expected, expected]))


def test_encoded_batches_are_raw_batches_only(colour_urls: list[str]) -> None:
    with pytest.raises(ValueError, match="raw batches only"):
        _epoch(colour_urls, 0, encoded=True, transform=lambda image: (image, image))


def test_cpu_workers_ignore_gpu_decode() -> None:
    """The setting is the GPU's: a CPU worker still gets decoded uint8 batches."""
    params = load_params(None, ["train.gpu_decode=true"])
    assert not decodes_on_device(params, torch.device("cpu"))
    views = views_on_device(params, torch.device("cpu"))
    view_q, view_k = views(torch.zeros(4, 1, 28, 28, dtype=torch.uint8))
    assert view_q.shape == view_k.shape == (4, 1, 28, 28)
