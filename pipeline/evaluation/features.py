"""Labelled splits held in memory once, frozen features of them, and a feature cache.

Why: the suite runs many protocols on the same images (kNN, probes, few-shot, attacks,
corruptions, a supervised baseline) and the encoder's forward pass over 70k images is the most
expensive part of the stage on a CPU. So every split is decoded once into a uint8 tensor at the
encoder's resolution (Fashion-MNIST: 55 MB), each feature network runs over it once, and encoder
features are cached on disk under `<features_dir>/<model-hash>-<data-version>/`, so re-scoring the
same model on the same data (promotion, a re-run after a plot change) costs no forward pass.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import Tensor, nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from pipeline.dataset import eval_loader, read_manifest, shard_urls

LOADER_WORKERS = 2  # decoding processes per split: fixed, see load_split


def ticker(progress: Progress | None, what: str, total: float) -> Callable[..., None]:
    """A progress bar's `advance(n=1)`, or a no-op without a bar (tests, library use)."""
    if progress is None:
        return lambda n=1: None
    task = progress.add_task(what, total=total)
    return lambda n=1: progress.advance(task, n)


@dataclass(frozen=True)
class LabelledSplit:
    """Images as uint8 [N, C, S, S] at the encoder's resolution, labels int64 [N]."""

    images: Tensor
    labels: Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def floats(self, index: Tensor | None = None) -> Tensor:
        """Images in [0, 1], as `eval_transform` gives them (optionally a subset)."""
        images = self.images if index is None else self.images[index]
        return TF.to_dtype(images, torch.float32, scale=True)  # eval_transform's own op


def load_split(
    shards_dir: str,
    split: str,
    *,
    image_size: int,
    channels: int,
    batch_size: int,
    progress: Progress | None = None,
) -> LabelledSplit:
    """Every labelled sample of a split, resized and centre-cropped like `eval_transform`.

    Resize and crop act on uint8 before `eval_transform` scales to float, so storing uint8 here
    and scaling later gives exactly the tensors the eval loader would (4x less memory). Images
    already at the size skip both (a no-op that costs a third of the decode time). The shards are
    read by a fixed number of loader processes: their interleaving sets the sample order, and
    with it every seeded subset, so it must not depend on the machine's CPU count."""
    manifest = read_manifest(shards_dir, split)
    advance = ticker(progress, f"load {split}", manifest["samples"])
    images, labels = _decode(
        shard_urls(shards_dir, split), image_size, channels, batch_size, advance
    )
    keep = labels >= 0  # unlabelled samples cannot be scored
    if not bool(keep.any()):
        raise ValueError(f"{shards_dir}/{split}: no labelled samples to evaluate on")
    return LabelledSplit(images[keep], labels[keep].long(), list(manifest["classes"]))


def load_images(
    urls: list[str],
    *,
    image_size: int,
    channels: int,
    batch_size: int,
    limit: int,
    progress: Progress | None = None,
    what: str = "load images",
) -> Tensor:
    """The first `limit` images (labelled or not) of the shards at `urls`, as `load_split`
    prepares them: the label-free metrics and the drift test need no labels."""
    advance = ticker(progress, what, limit)
    return _decode(urls, image_size, channels, batch_size, advance, limit)[0]


def _decode(
    urls: list[str],
    image_size: int,
    channels: int,
    batch_size: int,
    advance: Callable[..., None],
    limit: int = 0,
) -> tuple[Tensor, Tensor]:
    """uint8 images and labels (-1: none) of the shards, in the loader's fixed order."""
    images, labels, seen = [], [], 0
    for batch, targets in eval_loader(
        urls,
        transform=_Prepare(image_size, channels),
        batch_size=batch_size,
        loader_workers=LOADER_WORKERS,
    ):
        images.append(batch)
        labels.append(targets)
        seen += len(targets)
        advance(len(targets))
        if limit and seen >= limit:
            break
    if not images:
        return torch.empty(0, channels, image_size, image_size, dtype=torch.uint8), torch.empty(0)
    stop = limit or seen
    return torch.cat(images)[:stop], torch.cat(labels)[:stop]


class _Prepare:
    """uint8 [C, H, W] -> uint8 [channels, size, size]: eval_transform's resize and crop, and
    grayscale sets fed to an RGB encoder by repeating the channel (the reverse by a mean)."""

    def __init__(self, size: int, channels: int) -> None:
        self.size, self.channels = size, channels
        self.resize = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])

    def __call__(self, image: Tensor) -> Tensor:
        if image.shape[-2:] != (self.size, self.size):
            image = self.resize(image)
        if image.shape[0] == self.channels:
            return image
        if self.channels == 3:
            return image.expand(3, -1, -1).contiguous()
        return image.float().mean(0, keepdim=True).round().to(torch.uint8)


class L2Normalize(nn.Module):
    """Flatten and L2-normalise: features for cosine kNN, prototypes and the probe."""

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x.flatten(1).float(), dim=1)


def feature_net(encoder: nn.Module | None) -> nn.Module:
    """Images in [0, 1] -> L2-normalised features; `None` is the raw-pixel reference.

    One module for both the frozen features and the end-to-end attacks, so the network an
    attack differentiates through is exactly the one whose features the probe was fitted on."""
    if encoder is None:
        return L2Normalize()
    return nn.Sequential(channels_last(encoder), L2Normalize()).eval()


def channels_last(net: nn.Module) -> nn.Module:
    """The network with channels-last weights, in place: ~1.5x faster forward and backward on
    this CPU (oneDNN), and for 1-channel inputs no input conversion is needed at all."""
    return net.to(memory_format=torch.channels_last)


@torch.no_grad()
def extract(
    net: nn.Module,
    split: LabelledSplit,
    *,
    batch_size: int,
    bf16: bool = False,
    progress: Progress | None = None,
    what: str = "features",
) -> Tensor:
    """float32 features [N, D] of every image of the split, in batches, in eval mode."""
    net.eval()
    advance = ticker(progress, what, len(split))
    out = []
    for start in range(0, len(split), batch_size):
        index = torch.arange(start, min(start + batch_size, len(split)))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out.append(net(split.floats(index)).float())
        advance(len(index))
    return torch.cat(out)


def model_fingerprint(net: nn.Module, **settings: object) -> str:
    """A short hash of a network's weights and buffers plus the settings that change its
    features (e.g. precision): the same encoder gets the same key wherever it was loaded from."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cached(folder: Path | None, name: str, compute: Callable[[], Tensor], rows: int) -> Tensor:
    """`compute()` once per folder and name, kept as `<folder>/<name>.npy`; `None` = no cache.

    A file with the wrong number of rows (a changed split under the same name) is recomputed.
    Writes go through a temp file and a rename, so a killed run never leaves half a cache."""
    if folder is None:
        return compute()
    path = folder / f"{name}.npy"
    if path.exists():
        array = np.load(path, allow_pickle=False)
        if array.shape[0] == rows:
            os.utime(folder)  # last use: retention keeps the most recently used caches
            return torch.from_numpy(array)
    features = compute()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.{os.getpid()}.npy"
    np.save(tmp, features.numpy(), allow_pickle=False)
    tmp.replace(path)
    return features
