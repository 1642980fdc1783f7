"""Batch inference: one embedding row per image, from a folder of images or a shards dir.

Why it is built this way:
- Images are untrusted input, so each one goes through the shard stage's own validation
  (`pipeline.sources.examine`): a bad file is quarantined with the same one-line reason the
  shard stage would give, written next to the output, and the run goes on.
- The encoder is rebuilt from safetensors weights and a JSON spec (`load_encoder`): loading a
  registered model runs no stored code and unpickles nothing.
- Rows stream into Parquet batch by batch (embedding as a fixed-size float32 list), written to a
  temporary file and renamed at the end, so a crash never leaves a half-written output.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import webdataset as wds
from mlflow.exceptions import MlflowException
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import Tensor, nn

from moco.augment import eval_transform
from pipeline.config import Params
from pipeline.dataset import IMAGE_KEYS, _tar_samples, decode_image, read_manifest, shard_urls
from pipeline.encoder import EncoderSpec, load_encoder
from pipeline.errors import StageError
from pipeline.sources import BadImage, Candidate, examine, image_folder
from pipeline.tracking import tracking_uri

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Item:
    """One input image: its split, where it came from, and the candidate whose `ref` (shard key
    or path relative to the split) is the row's key."""

    split: str
    source: str
    candidate: Candidate


@dataclass
class EmbedSummary:
    out: Path
    rows: int
    dim: int
    quarantined: int
    quarantine_file: Path
    device: str

    def render(self) -> str:
        text = f"embed: {self.rows} rows x {self.dim} dims -> {self.out} (on {self.device})"
        if self.quarantined:
            text += f"; {self.quarantined} quarantined (see {self.quarantine_file})"
        return text


# --- inputs -----------------------------------------------------------------------------------


def _shard_splits(source: Path) -> tuple[Path, list[str]]:
    """(shards root, splits) when `source` is a shards dir or one split of it, else (source, [])."""
    if (source / MANIFEST).exists():
        return source.parent, [source.name]
    splits = sorted(p.parent.name for p in source.glob(f"*/{MANIFEST}"))
    return source, splits


def _missing_image() -> bytes:
    raise BadImage("shard sample has no image member")


def _sample_item(split: str, sample: dict[str, Any]) -> Item:
    key = sample["__key__"]
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    read = _missing_image if data is None else partial(bytes, data)
    try:
        origin = json.loads(sample.get("json", b"{}")).get("source", key)
    except (ValueError, AttributeError):
        origin = key
    return Item(split, str(origin), Candidate(key, None, read))


def _shard_items(root: Path, splits: list[str]) -> Iterator[Item]:
    """Samples in shard order; only image/cls/json members are ever read out of a tar."""
    for split in splits:
        samples = wds.DataPipeline(wds.SimpleShardList(shard_urls(root, split)), _tar_samples)
        for sample in samples:
            yield _sample_item(split, sample)


def inputs(source: Path) -> tuple[Iterator[Item], int]:
    """The images under `source` and how many there are (for the progress bar)."""
    root, splits = _shard_splits(source)
    if splits:
        total = sum(read_manifest(root, split)["samples"] for split in splits)
        return _shard_items(root, splits), total
    if not source.is_dir():
        raise FileNotFoundError(f"--source {source}: no such folder of images or shards dir")
    found = image_folder(source, name=str(source))
    items = [Item(s, c.ref, c) for s, candidates in found.splits.items() for c in candidates]
    if not items:
        raise ValueError(f"--source {source}: no images found (suffixes .png, .jpg, ...)")
    return iter(items), len(items)


# --- inference --------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    """'auto' takes the GPU when there is one; asking for a missing GPU is an error, not a
    silent fallback to a 100x slower run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is visible here; use --device cpu")
    return device


def _load(params: Params, model: str, device: torch.device) -> tuple[nn.Module, EncoderSpec, int]:
    """The encoder on `device`, its spec and its embedding size. MLflow URIs resolve through
    the configured store (MLFLOW_TRACKING_URI or tracking.uri), as every other stage does."""
    mlflow.set_tracking_uri(tracking_uri(params))
    try:
        encoder, spec = load_encoder(model)
    except MlflowException as error:
        raise StageError(f"--model {model}: {error.message}") from None
    encoder.to(device)
    with torch.inference_mode():
        dim = encoder(spec.example_input(batch=2).to(device)).shape[1]
    return encoder, spec, int(dim)


def _valid(
    items: Iterable[Item],
    mode: str,
    max_pixels: int,
    quarantine: list[dict[str, str]],
    seen: Callable[[], None],
) -> Iterator[tuple[Item, Tensor]]:
    """Decoded images; the bad ones go to `quarantine` with the shard stage's reason."""
    for item in items:
        result = examine(item.candidate, None, mode, max_pixels)
        seen()
        if result.prepared is None:
            quarantine.append({"split": item.split, "path": item.source, "reason": result.problem})
            continue
        yield item, decode_image(result.prepared.data)


def _batches(
    pairs: Iterator[tuple[Item, Tensor]], size: int
) -> Iterator[list[tuple[Item, Tensor]]]:
    while batch := list(islice(pairs, size)):
        yield batch


@torch.inference_mode()
def _forward(encoder: nn.Module, images: Tensor, device: torch.device) -> Tensor:
    return encoder(images.to(device, non_blocking=True)).float().cpu()


def _schema(dim: int, model: str, spec: EncoderSpec) -> pa.Schema:
    """Columns, plus which model produced them (file metadata), so a table explains itself."""
    columns = [
        ("split", pa.string()),
        ("key", pa.string()),
        ("source", pa.string()),
        ("embedding", pa.list_(pa.float32(), dim)),
    ]
    return pa.schema(columns, metadata={"model": model, "encoder": json.dumps(spec.to_dict())})


def _table(batch: list[tuple[Item, Tensor]], embeddings: Tensor, schema: pa.Schema) -> pa.Table:
    flat = pa.array(embeddings.numpy().reshape(-1), type=pa.float32())
    columns = {
        "split": [item.split for item, _ in batch],
        "key": [item.candidate.ref for item, _ in batch],
        "source": [item.source for item, _ in batch],
        "embedding": pa.FixedSizeListArray.from_arrays(flat, embeddings.shape[1]),
    }
    return pa.table(columns, schema=schema)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]embed"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


def _write_quarantine(path: Path, entries: list[dict[str, str]]) -> None:
    """Replace the list from any earlier run; none this time means no file."""
    path.unlink(missing_ok=True)
    if entries:
        path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))


def embed(
    params: Params,
    model: str,
    source: str | Path,
    out: str | Path,
    *,
    device: str = "auto",
    batch_size: int | None = None,
) -> EmbedSummary:
    """Embed every valid image under `source` with the encoder at `model` into `out` (Parquet)."""
    target, out = pick_device(device), Path(out)
    items, total = inputs(Path(source))
    encoder, spec, dim = _load(params, model, target)
    transform = eval_transform(spec.image_size)
    mode = "L" if spec.in_channels == 1 else "RGB"
    quarantine: list[dict[str, str]] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    partial_out, schema, rows = out.with_name(out.name + ".partial"), _schema(dim, model, spec), 0
    try:
        with pq.ParquetWriter(partial_out, schema) as writer, _progress() as progress:
            task = progress.add_task("embed", total=total)
            seen = partial(progress.advance, task)
            pairs = _valid(items, mode, params.data.max_pixels, quarantine, seen)
            for batch in _batches(pairs, batch_size or params.eval.batch_size):
                images = torch.stack([transform(image) for _, image in batch])
                writer.write_table(_table(batch, _forward(encoder, images, target), schema))
                rows += len(batch)
        os.replace(partial_out, out)
    finally:
        partial_out.unlink(missing_ok=True)
    quarantine_file = out.with_suffix(".quarantine.jsonl")
    _write_quarantine(quarantine_file, quarantine)
    return EmbedSummary(out, rows, dim, len(quarantine), quarantine_file, str(target))
