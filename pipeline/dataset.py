"""Reading the shards: manifests, data version, and the streaming train/eval loaders.

Why it is built this way:
- Shards are split by rank and by DataLoader worker *before* they are shuffled, so which shards a
  rank reads never changes between epochs and `steps_per_epoch` can be exact. DDP needs every rank
  to take the same number of steps or it hangs: iterate at most `steps_per_epoch` batches (pass
  `steps=` to `training_loader`).
- The rank is read once, when the loader is built (torch.distributed first, as Ray Train and
  torchrun initialise it, then RANK/WORLD_SIZE), and baked into the pipeline: DataLoader worker
  processes never see an initialised process group, and webdataset's own `split_by_node` trusts
  RANK/WORLD_SIZE before torch.distributed.
- Only image, `cls` and `json` members are ever read out of a tar and they are decoded
  explicitly (PIL for images): no pickle-based decoder can run on shard contents.
- Shard URLs may be local paths, `pipe:` commands or any fsspec URL (s3://, gs://, file://...).
- Every shard read to its end is checked against the sha256 its manifest lists: a corrupt or
  replaced shard (a bad upload, a bit flip in the object store) fails the run naming the shard,
  never skipped. Its samples were already yielded by then; the check is on the stream, so it
  costs no second read.
- Small images are not decoded at all: the raw training loader (`DecodedShards`, bounded by
  train.decoded_cache_mb) reads the uint8 array the shard stage stored beside each shard of
  small images (checked against its sha256 like a tar), or, for shards without one, decodes the
  shard once and keeps its images in the training process for later epochs. Reading a 28-px
  sample out of a tar and decoding its PNG costs ~160 us on one core, ~15% of a CPU worker's
  step; from the array or memory it costs nothing. Large images (224-px
  JPEGs) do not fit: they stream, decoded in loader processes off the training thread, or, on
  GPU workers (`encoded=True`, train.gpu_decode), not decoded by the loader at all: it passes
  each JPEG's bytes and `decode_batch` decodes the batch's JPEGs on the GPU (nvJPEG).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from itertools import islice
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import fsspec
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander
from webdataset.utils import make_seed

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
JPEG_MAGIC = b"\xff\xd8"  # a JPEG's first two bytes (SOI), whatever its member's name
_READ_KEYS = frozenset((*IMAGE_KEYS, "cls", "json"))
_NATIVE_SCHEMES = ("", "pipe")  # everything else goes through fsspec
NO_LABEL = -1


# --- manifests --------------------------------------------------------------------------------


def read_manifest(shards_dir: str | Path, split: str) -> dict[str, Any]:
    """`<shards_dir>/<split>/manifest.json`, local or through fsspec."""
    fs, root = fsspec.core.url_to_fs(str(shards_dir))
    path = f"{root.rstrip('/')}/{split}/manifest.json"
    try:
        with fs.open(path, "rt") as stream:
            return json.load(stream)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{shards_dir}/{split}/manifest.json not found: run the shard stage "
            "(dvc repro shard) or fetch the shards (dvc pull)"
        ) from None


def manifest_version(manifest: dict[str, Any]) -> str:
    """A split's data version: what a model sees (shard contents, classes, image mode)."""
    seen = {
        "split": manifest["split"],
        "classes": manifest["classes"],
        "image_mode": manifest["image_mode"],
        "shards": [[s["file"], s["sha256"], s["samples"]] for s in manifest["shards"]],
    }
    return _short_hash(json.dumps(seen, sort_keys=True))


def data_version(shards_dir: str | Path) -> str:
    """A short stable hash over every split's manifest version (for MLflow tags and logs)."""
    fs, root = fsspec.core.url_to_fs(str(shards_dir))
    paths = sorted(fs.glob(f"{root.rstrip('/')}/*/manifest.json"))
    if not paths:
        raise FileNotFoundError(f"no split manifest under {shards_dir}: run the shard stage first")
    parts = []
    for path in paths:
        with fs.open(path, "rt") as stream:
            manifest = json.load(stream)
        parts.append(f"{manifest['split']}:{manifest['data_version']}")
    return _short_hash("\n".join(parts))


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def shard_urls(shards_dir: str | Path, split: str) -> list[str]:
    """Absolute local paths, or `<shards_dir>/<split>/<file>` URLs for remote shards_dir."""
    files = [s["file"] for s in read_manifest(shards_dir, split)["shards"]]
    fs, root = fsspec.core.url_to_fs(str(shards_dir))
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols:
        base = Path(root).resolve() / split
        return [str(base / name) for name in files]
    return [f"{str(shards_dir).rstrip('/')}/{split}/{name}" for name in files]


def steps_per_epoch(
    shards_dir: str | Path, split: str, *, world_size: int, loader_workers: int, batch_size: int
) -> int:
    """Full batches every rank can yield in one pass: the minimum over ranks (0: some rank
    cannot fill one batch; lower the batch size or re-shard with a larger data.min_shards).

    Mirrors the loader: shard i goes to rank i % world_size, then round-robin to that rank's
    loader workers; each worker batches its own stream and drops its last partial batch."""
    counts = [s["samples"] for s in read_manifest(shards_dir, split)["shards"]]
    return min(
        _rank_batches(counts[rank::world_size], loader_workers, batch_size)
        for rank in range(world_size)
    )


def _rank_batches(counts: Sequence[int], loader_workers: int, batch_size: int) -> int:
    workers = max(1, loader_workers)
    return sum(sum(counts[w::workers]) // batch_size for w in range(workers))


# --- loaders --------------------------------------------------------------------------------


def training_loader(
    urls: list[str],
    *,
    transform: Callable[[Tensor], tuple[Tensor, Tensor]] | None,
    batch_size: int,
    shuffle_buffer: int,
    seed: int,
    epoch: int,
    loader_workers: int,
    steps: int | None = None,
    resampled: bool = False,
    raw_size: int | None = None,
    decoded: DecodedShards | None = None,
    encoded: bool = False,
    pin_memory: bool = False,
) -> Iterable[tuple[Tensor, Tensor]] | Iterable[Tensor] | Iterable[dict[str, Tensor]]:
    """(view_q, view_k) batches [B, C, H, W] for this rank; same (seed, epoch), same order.

    `transform=None` yields the unaugmented uint8 images instead, one [B, C, H, W] tensor per
    batch, for a batched augmentation on the training device (moco.augment.BatchTwoCrops): per
    sample, torchvision's overhead dominates at 28 px. A split keeps one image mode, but folder
    sources may mix sizes: `raw_size` then resizes each image's shorter side to it and centre-crops
    it square (a no-op for images already that size).

    `steps` caps the batches (pass steps_per_epoch(...) so all DDP ranks stop together; required
    with `resampled=True`, where shards are drawn with replacement, seeded per rank and worker,
    for runs whose epochs should not follow shard boundaries).

    `decoded` (raw batches, in-process loading only) serves shards decoded in an earlier epoch
    from memory and keeps the ones decoded now; the batches are the same as without it.
    `encoded` (raw batches) yields each batch as a dict of tensors, the JPEGs' bytes packed for
    `decode_batch` to decode on the training device, other images decoded as usual.
    `pin_memory` pins batches for asynchronous copies to a GPU."""
    if resampled and steps is None:
        raise ValueError("training_loader(resampled=True) streams forever: pass steps=")
    if transform is not None and (raw_size is not None or decoded is not None or encoded):
        raise ValueError("raw_size, decoded and encoded apply to raw batches only (transform=None)")
    if encoded and decoded is not None:
        raise ValueError("encoded batches are decoded by decode_batch: pass decoded=None")
    if decoded is not None and loader_workers > 0:
        raise ValueError(
            "decoded shards live in the training process: use them with loader_workers=0 "
            "(loader processes decode off the training thread already)"
        )
    rank, world_size = _rank_world()
    shard_seed = make_seed(seed, epoch)
    if resampled:
        worker_seed = _RankWorker(rank)
        shards = [
            wds.ResampledShards(
                _require(urls), seed=shard_seed, worker_seed=worker_seed, deterministic=True
            )
        ]
    else:
        shards = [
            wds.SimpleShardList(_require(urls)),
            _NodeSplit(rank, world_size),
            wds.split_by_worker,
            wds.detshuffle(len(urls), initial=len(urls), seed=shard_seed),
        ]
    if transform is not None:
        samples, views = [_tar_samples], [wds.map(partial(_two_views, transform=transform))]
        batch = wds.batched(batch_size, collation_fn=_collate, partial=False)
    elif encoded:
        samples, views = [_tar_samples], [wds.map(partial(_jpeg_bytes_or_image, size=raw_size))]
        batch = wds.batched(batch_size, collation_fn=_pack_encoded, partial=False)
    elif decoded is not None:  # decoded before the shuffle buffer: it then holds images
        samples, views = [partial(_decoded_images, size=raw_size, decoded=decoded)], []
        batch = wds.batched(batch_size, collation_fn=_stack_raw, partial=False)
    else:
        samples, views = [_tar_samples], [wds.map(partial(_raw_image, size=raw_size))]
        batch = wds.batched(batch_size, collation_fn=_stack_raw, partial=False)
    stages = [*shards, *samples]
    if shuffle_buffer > 0:
        seed_buffer = make_seed(seed, epoch, rank)
        stages.append(wds.shuffle(shuffle_buffer, initial=shuffle_buffer, seed=seed_buffer))
    stages += [*views, batch]
    generator = torch.Generator().manual_seed(make_seed(seed, epoch, rank))
    return _loader(stages, loader_workers, steps, generator, pin_memory)


def eval_loader(
    urls: list[str],
    *,
    transform: Callable[[Tensor], Tensor],
    batch_size: int,
    loader_workers: int = 0,
) -> Iterable[tuple[Tensor, Tensor]]:
    """(images, labels) batches; every sample once, in shard order (not split by rank).

    Labels are class indices, -1 for unlabelled samples. With loader_workers > 0, batches
    interleave round-robin over workers: still deterministic for a given worker count."""
    stages = [
        wds.SimpleShardList(_require(urls)),
        wds.split_by_worker,
        _tar_samples,
        wds.map(partial(_labelled_view, transform=transform)),
        wds.batched(batch_size, collation_fn=_collate, partial=True),
    ]
    return _loader(stages, loader_workers, None, None)


class DecodedShards:
    """Whole shards' decoded uint8 images, kept in this process across epochs, up to a byte
    budget (shards past it stream and decode as usual). A shard enters only once it was
    checked against its manifest (its stored array, or its tar read to its end); later epochs
    read it from memory."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._images: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return len(self._images)

    def get(self, url: str) -> Tensor | None:
        """The shard's images [N, C, H, W] in shard order, or None when not kept."""
        return self._images.get(url)

    def offer(self, url: str, images: Tensor) -> None:
        """Keep a verified shard's images [N, C, H, W] if they fit the budget."""
        if self.bytes + images.numel() <= self.max_bytes:
            self._images[url] = images
            self.bytes += images.numel()


def _decoded_images(
    src: Iterable[dict[str, Any]], *, size: int | None, decoded: DecodedShards
) -> Iterator[Tensor]:
    """Shards -> raw images (see _raw_image): kept in `decoded`, else the shard's decoded
    array when its manifest lists one of this size, else read and decoded; offered to it."""
    for shard in src:
        url = shard["url"]
        if (kept := decoded.get(url)) is not None:
            yield from kept
            continue
        if (stored := _stored_decoded(url, size)) is not None:
            decoded.offer(url, stored)
            yield from stored
            continue
        images = []
        for sample in _tar_samples([shard]):  # ends after the shard's sha256 check
            images.append(_raw_image(sample, size=size))
            yield images[-1]
        if images and len({image.shape for image in images}) == 1:
            decoded.offer(url, torch.stack(images))


def _stored_decoded(url: str, size: int | None) -> Tensor | None:
    """The uint8 [N, C, H, W] array the shard stage stored beside this shard (small images of
    one size), checked against its manifest's sha256; None when there is none of `size` px."""
    listed = (_listed_shard(url) or {}).get("decoded")
    if listed is None or (size is not None and listed["shape"][-2:] != [size, size]):
        return None
    array_url = f"{url.rpartition('/')[0]}/{listed['file']}"
    with _open_url(array_url) as stream:
        data = stream.read()
    if (actual := hashlib.sha256(data).hexdigest()) != listed["sha256"]:
        raise ShardIntegrityError(
            f"decoded array {array_url}: sha256 {actual[:16]}... does not match its manifest's "
            f"{listed['sha256'][:16]}...; re-run the shard stage or restore it (dvc pull)"
        )
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))


def _require(urls: list[str]) -> list[str]:
    if not urls:
        raise ValueError("no shard URLs given: check shard_urls(shards_dir, split)")
    return list(urls)


def _loader(
    stages: list[Any],
    workers: int,
    steps: int | None,
    generator: torch.Generator | None,
    pin_memory: bool = False,
) -> Iterable[Any]:
    pipeline = wds.DataPipeline(*stages)
    loader = DataLoader(
        pipeline, batch_size=None, num_workers=workers, generator=generator, pin_memory=pin_memory
    )
    return loader if steps is None else _Steps(loader, steps)


class _Steps:
    """At most `steps` batches, with a len() for schedulers and progress bars."""

    def __init__(self, loader: Iterable[Any], steps: int) -> None:
        self.loader, self.steps = loader, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        return islice(iter(self.loader), self.steps)


def _rank_world() -> tuple[int, int]:
    """torch.distributed when initialised (Ray Train, torchrun), else RANK/WORLD_SIZE env."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class _NodeSplit:
    """This rank's shards: every world_size-th, from its rank (fixed at build time)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def __call__(self, src: Iterable[Any]) -> Iterator[Any]:
        return islice(src, self.rank, None, self.world_size)


class _RankWorker:
    """Resampling seed part: distinct per rank and DataLoader worker."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(self) -> int:
        info = get_worker_info()
        return self.rank * 1000 + (info.id if info else 0)


# --- reading samples --------------------------------------------------------------------------


def _tar_samples(src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Opened shards -> samples holding only image/cls/json bytes."""
    files = tar_file_expander(_open_shards(src), select_files=_wanted)
    return group_by_keys(files)


class ShardIntegrityError(RuntimeError):
    """A shard's bytes do not match the sha256 in its manifest."""


def _open_shards(src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Open each shard; once the tar reader asks for the next one (it has read this one to its
    end), the rest of the stream is drained and the digest compared with the manifest's."""
    for item in src:
        url = item["url"]
        stream = _open_url(url)
        expected = (_listed_shard(url) or {}).get("sha256")
        if expected is None:
            yield {**item, "stream": stream}
            continue
        hashed = _HashingStream(stream)
        yield {**item, "stream": hashed}
        if (actual := hashed.finish()) != expected:
            raise ShardIntegrityError(
                f"shard {url}: sha256 {actual[:16]}... does not match its manifest's "
                f"{expected[:16]}...; re-run the shard stage or restore the shard (dvc pull)"
            )


class _HashingStream:
    """A read-only stream that hashes what passes through it."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream, self.digest = stream, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data

    def finish(self) -> str:
        """Hash what the reader left (tar padding), close, and return the hex digest."""
        for block in iter(lambda: self.read(1 << 20), b""):
            del block
        self.stream.close()
        return self.digest.hexdigest()

    def close(self) -> None:
        self.stream.close()


def _open_url(url: str) -> IO[bytes]:
    if urlparse(url).scheme in _NATIVE_SCHEMES:
        return gopen(url, "rb")
    return fsspec.open(url, "rb").open()


def _listed_shard(url: str) -> dict[str, Any] | None:
    """The shard's record in the manifest beside it, read when the shard is opened (a rebuild
    or an append may have changed it); None for `pipe:` URLs and unlisted shards."""
    if urlparse(url).scheme == "pipe":
        return None
    folder, _, name = url.rpartition("/")
    fs, path = fsspec.core.url_to_fs(f"{folder}/manifest.json")
    try:
        with fs.open(path, "rt") as stream:
            shards = json.load(stream)["shards"]
    except FileNotFoundError:
        return None
    return next((s for s in shards if s["file"] == name), None)


def _wanted(name: str) -> bool:
    """Member filter: `.pyd`, `.pth`, `.pickle` and anything else unexpected is never read."""
    return name.rsplit("/", 1)[-1].partition(".")[2].lower() in _READ_KEYS


def decode_image(data: bytes) -> Tensor:
    """Encoded image -> uint8 CHW tensor: 1 channel for grayscale, 3 for colour."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        pixels = np.array(image, dtype=np.uint8)
    tensor = torch.from_numpy(pixels)
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def decode_batch(
    batch: dict[str, Tensor], size: int, channels: int, device: torch.device
) -> Tensor:
    """An encoded batch (training_loader's `encoded`) -> one uint8 [B, C, size, size] batch on
    `device`: its JPEGs decoded there in one torchvision decode_jpeg call (nvJPEG on CUDA; on
    the CPU for a batch nvJPEG refuses, e.g. an unusual chroma subsampling), then resized and
    centre-cropped like `raw_size`; the images the loader decoded copied there."""
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    count = len(batch["jpeg_at"]) + len(batch["image_at"])
    out = torch.empty((count, channels, size, size), dtype=torch.uint8, device=device)
    jpegs = list(torch.split(batch["jpeg_bytes"], batch["jpeg_lengths"].tolist()))
    if jpegs:
        images = [_square(image, size) for image in _decode_jpegs(jpegs, mode, device)]
        out[batch["jpeg_at"].to(device)] = torch.stack(images).to(device)
    if len(batch["image_at"]):
        out[batch["image_at"].to(device)] = batch["images"].to(device, non_blocking=True)
    return out


def _decode_jpegs(jpegs: list[Tensor], mode: ImageReadMode, device: torch.device) -> list[Tensor]:
    # torchvision 0.29 marks decode_jpeg deprecated (for TorchCodec, not a dependency here)
    try:
        return decode_jpeg(jpegs, mode=mode, device=device)
    except RuntimeError:
        if device.type == "cpu":
            raise
        return decode_jpeg(jpegs, mode=mode)


def _pack_encoded(items: list[Tensor]) -> dict[str, Tensor]:
    """A batch of JPEG bytes (1-D) and decoded images (3-D) as five tensors: loader processes
    hand each tensor over as one shared-memory segment, not one per image."""
    jpeg_at = [i for i, item in enumerate(items) if item.ndim == 1]
    image_at = [i for i, item in enumerate(items) if item.ndim == 3]
    jpegs = [items[i] for i in jpeg_at]
    return {
        "jpeg_bytes": torch.cat(jpegs) if jpegs else torch.empty(0, dtype=torch.uint8),
        "jpeg_lengths": torch.tensor([len(j) for j in jpegs], dtype=torch.int64),
        "jpeg_at": torch.tensor(jpeg_at, dtype=torch.int64),
        "images": _stack_raw([items[i] for i in image_at]) if image_at else torch.empty(0, 0),
        "image_at": torch.tensor(image_at, dtype=torch.int64),
    }


def _jpeg_bytes_or_image(sample: dict[str, Any], *, size: int | None) -> Tensor:
    """A JPEG's bytes as a 1-D uint8 tensor (decode_batch decodes it on the device); any other
    image decoded here, as _raw_image does (torchvision decodes only JPEGs on a GPU)."""
    data = sample[_image_key(sample)]
    if data[:2] == JPEG_MAGIC:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return _raw_image(sample, size=size)


def _image_key(sample: dict[str, Any]) -> str:
    for key in IMAGE_KEYS:
        if key in sample:
            return key
    raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image")


def _image(sample: dict[str, Any]) -> Tensor:
    return decode_image(sample[_image_key(sample)])


def _label(sample: dict[str, Any]) -> int:
    return int(sample["cls"]) if "cls" in sample else NO_LABEL


def _two_views(sample: dict[str, Any], *, transform: Callable) -> tuple[Tensor, Tensor]:
    view_q, view_k = transform(_image(sample))
    return view_q, view_k


def _raw_image(sample: dict[str, Any], *, size: int | None) -> Tensor:
    """The decoded uint8 image, made size x size when a size is given (aspect ratio kept)."""
    image = _image(sample)
    return image if size is None else _square(image, size)


def _square(image: Tensor, size: int) -> Tensor:
    """The shorter side resized to `size`, then centre-cropped square (a no-op at that size)."""
    if image.shape[-2:] == (size, size):
        return image
    return TF.center_crop(TF.resize(image, size, antialias=True), [size, size])


def _stack_raw(images: list[Tensor]) -> Tensor:
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) > 1:
        raise ValueError(
            f"raw training batches need one image size, got {sorted(shapes)}: pass raw_size="
        )
    return torch.stack(images)


def _labelled_view(sample: dict[str, Any], *, transform: Callable) -> tuple[Tensor, int]:
    return transform(_image(sample)), _label(sample)


def _collate(samples: list[tuple[Any, ...]]) -> tuple[Tensor, ...]:
    columns = zip(*samples, strict=True)
    return tuple(
        torch.stack(column) if isinstance(column[0], Tensor) else torch.tensor(column)
        for column in columns
    )
