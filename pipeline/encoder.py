"""The exported encoder: backbone weights as safetensors plus the settings that rebuild it.

Why not pickle: encoders travel between teams and buckets, and unpickling runs arbitrary code.
A safetensors file holds tensors only, and `encoder.json` holds plain settings: the method that
trained the encoder and the whole backbone spec, `{"method": ..., "backbone": {...}}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moco.backbones import BackboneSpec
from pipeline.config import Params
from pipeline.method import backbone_spec

WEIGHTS_FILE = "encoder.safetensors"
SPEC_FILE = "encoder.json"
RUN_FILE = "run.json"  # beside an exported encoder: the MLflow run and model it was logged as
LEGACY_METHOD = "mocov2"  # encoder.json files without a method were all written by MoCo v2


@dataclass(frozen=True)
class EncoderSpec:
    """What trained the frozen encoder and what rebuilds it (input: float images in [0, 1])."""

    method: str
    backbone: BackboneSpec

    @classmethod
    def from_params(cls, params: Params) -> EncoderSpec:
        return cls(params.method.name, backbone_spec(params.model))

    @property
    def image_size(self) -> int:
        return self.backbone.image_size

    @property
    def in_channels(self) -> int:
        return self.backbone.in_channels

    def describe(self) -> str:
        """One line for messages: method and the backbone's settings."""
        b = self.backbone.to_dict()
        return f"{self.method} on " + ", ".join(f"{k}={v}" for k, v in b.items())

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "backbone": self.backbone.to_dict()}

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> EncoderSpec:
        """Also reads the flat pre-seam files ({"backbone": "resnet18", "width": ..., ...})."""
        if isinstance(fields.get("backbone"), dict):
            return cls(fields["method"], BackboneSpec.from_dict(fields["backbone"]))
        flat = {("name" if k == "backbone" else k): v for k, v in fields.items()}
        return cls(LEGACY_METHOD, BackboneSpec.from_dict(flat))

    def build(self) -> tuple[nn.Module, int]:
        """A randomly initialised encoder of this shape and its feature size."""
        return self.backbone.build()

    def example_input(self, batch: int = 2) -> torch.Tensor:
        return torch.rand(batch, self.in_channels, self.image_size, self.image_size)


def save_encoder(encoder: nn.Module, spec: EncoderSpec, directory: str | Path) -> Path:
    """Write encoder.safetensors + encoder.json into `directory`; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().cpu().contiguous() for name, t in encoder.state_dict().items()}
    save_file(state, directory / WEIGHTS_FILE)
    (directory / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2))
    return directory


def _local_dir(location: str, tracking: str | None = None) -> Path:
    """A local folder holding the encoder files, downloading MLflow URIs first (from
    `tracking`, default: the active tracking URI)."""
    if location.startswith(("runs:/", "models:/", "mlflow-artifacts:/", "s3://", "gs://")):
        import mlflow

        location = mlflow.artifacts.download_artifacts(
            artifact_uri=location, tracking_uri=tracking, registry_uri=tracking
        )
    path = Path(location)
    for candidate in (path, path / "extra_files"):
        if (candidate / WEIGHTS_FILE).exists():
            return candidate
    raise FileNotFoundError(
        f"{location}: no {WEIGHTS_FILE} found; pass a folder written by pretrain, "
        "a runs:/<id>/encoder URI or models:/<name>@<alias>"
    )


def read_spec(location: str | Path, tracking: str | None = None) -> EncoderSpec:
    """The encoder.json of a folder or MLflow URI, without building the encoder."""
    directory = _local_dir(str(location), tracking)
    return EncoderSpec.from_dict(json.loads((directory / SPEC_FILE).read_text()))


def check_warm_start(expected: EncoderSpec, found: EncoderSpec, location: str) -> None:
    """Refuse, in one line naming both, a warm start from an encoder that another method or
    another backbone spec trained (its weights would not fit, or would not mean the same)."""
    if found != expected:
        raise ValueError(
            f"train.init_from: {location} was trained as {found.describe()}, but this run "
            f"trains {expected.describe()}; warm-start only from the same method and backbone, "
            "or clear train.init_from"
        )


def load_encoder(location: str | Path) -> tuple[nn.Module, EncoderSpec]:
    """Rebuild an encoder (eval mode) from a folder or an MLflow URI, without unpickling."""
    directory = _local_dir(str(location))
    spec = read_spec(directory)
    encoder, _ = spec.build()
    encoder.load_state_dict(load_file(directory / WEIGHTS_FILE))
    return encoder.eval(), spec
