"""Helpers for the registry tests: tiny encoders, a logged model, small image folders.

A plain module (not conftest) so test modules can import it by name."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from moco.backbones import BackboneSpec
from pipeline.config import Params
from pipeline.encoder import EncoderSpec, save_encoder
from pipeline.tracking import log_encoder, setup_mlflow

# 8x8 grayscale like scikit-learn's digits; width 4 keeps every forward pass trivial.
SPEC = EncoderSpec(
    "mocov2", BackboneSpec("resnet18", 1, 8, mean=(0.3,), std=(0.3,), width=4, small_stem=True)
)
FEATURES = SPEC.build()[1]
# A first candidate's evaluation: above random init (0.70), the gate's bar with no production.
FIRST = {"knn_top1": 0.80, "random_knn_top1": 0.70, "pixels_knn_top1": 0.79}
GOOD_IMAGES = ("a/gray.png", "a/colour.jpg", "b/deep16.png", "b/nested/wide.png")
BAD_IMAGES = {"a/empty.png": "empty", "b/text.jpg": "not an image", "b/cut.jpg": "truncated"}


@dataclass(frozen=True)
class Store:
    """A tracking store with one logged tiny encoder (`model_uri`, exported at `encoder_dir`)."""

    uri: str
    artifacts: Path
    encoder_dir: Path
    model_uri: str


def tiny_encoder(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised encoder exported the way pretrain exports one."""
    torch.manual_seed(seed)
    encoder, _ = SPEC.build()
    return save_encoder(encoder, SPEC, folder)


def log_tiny_encoder(params: Params, folder: Path) -> str:
    """Log `folder` as a model in its own run; returns the model URI to register."""
    experiment = setup_mlflow(params)
    with mlflow.start_run(experiment_id=experiment, run_name="tiny-encoder"):
        return log_encoder(folder)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_images(root: Path) -> Path:
    """GOOD_IMAGES (mixed sizes, modes and formats) and BAD_IMAGES, in class folders."""
    (root / "a").mkdir(parents=True)
    (root / "b/nested").mkdir(parents=True)
    Image.new("L", (8, 8), 90).save(root / "a/gray.png")
    Image.new("RGB", (20, 12), (200, 30, 30)).save(root / "a/colour.jpg", quality=90)
    Image.fromarray(np.full((10, 10), 200 * 257, dtype=np.uint16)).save(root / "b/deep16.png")
    Image.new("L", (32, 8), 10).save(root / "b/nested/wide.png")
    (root / "a/empty.png").write_bytes(b"")
    (root / "b/text.jpg").write_text("not a JPEG\n")
    whole = (root / "a/colour.jpg").read_bytes()
    (root / "b/cut.jpg").write_bytes(whole[: len(whole) // 2])
    return root


def read_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()
