"""The exported encoder: backbone weights as safetensors plus the settings that rebuild it.

Why not pickle: encoders travel between teams and buckets, and unpickling runs arbitrary code.
A safetensors file holds tensors only, and `encoder.json` holds plain settings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moco.backbones import build_backbone
from pipeline.config import ModelParams

WEIGHTS_FILE = "encoder.safetensors"
SPEC_FILE = "encoder.json"
RUN_FILE = "run.json"  # beside an exported encoder: the MLflow run and model it was logged as


@dataclass(frozen=True)
class EncoderSpec:
    """What it takes to rebuild the frozen encoder (input: float images in [0, 1])."""

    backbone: str
    width: int
    small_stem: bool
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    stem_stride: int = 1  # encoder.json files written before the setting existed are stride 1

    @classmethod
    def from_params(cls, model: ModelParams) -> EncoderSpec:
        return cls(
            backbone=model.backbone,
            width=model.width,
            small_stem=model.small_stem,
            stem_stride=model.stem_stride,
            in_channels=model.in_channels,
            image_size=model.image_size,
            mean=tuple(model.mean),
            std=tuple(model.std),
        )

    def build(self) -> tuple[nn.Module, int]:
        """A randomly initialised encoder of this shape and its feature size."""
        return build_backbone(
            self.backbone,
            width=self.width,
            small_stem=self.small_stem,
            stem_stride=self.stem_stride,
            in_channels=self.in_channels,
            mean=self.mean,
            std=self.std,
        )

    def example_input(self, batch: int = 2) -> torch.Tensor:
        return torch.rand(batch, self.in_channels, self.image_size, self.image_size)


def save_encoder(encoder: nn.Module, spec: EncoderSpec, directory: str | Path) -> Path:
    """Write encoder.safetensors + encoder.json into `directory`; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().cpu().contiguous() for name, t in encoder.state_dict().items()}
    save_file(state, directory / WEIGHTS_FILE)
    (directory / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2))
    return directory


def _local_dir(location: str) -> Path:
    """A local folder holding the encoder files, downloading MLflow URIs first."""
    if location.startswith(("runs:/", "models:/", "mlflow-artifacts:/", "s3://", "gs://")):
        import mlflow

        location = mlflow.artifacts.download_artifacts(artifact_uri=location)
    path = Path(location)
    for candidate in (path, path / "extra_files"):
        if (candidate / WEIGHTS_FILE).exists():
            return candidate
    raise FileNotFoundError(
        f"{location}: no {WEIGHTS_FILE} found; pass a folder written by pretrain, "
        "a runs:/<id>/encoder URI or models:/<name>@<alias>"
    )


def load_encoder(location: str | Path) -> tuple[nn.Module, EncoderSpec]:
    """Rebuild an encoder (eval mode) from a folder or an MLflow URI, without unpickling."""
    directory = _local_dir(str(location))
    spec_fields = json.loads((directory / SPEC_FILE).read_text())
    spec = EncoderSpec(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in spec_fields.items()}
    )
    encoder, _ = spec.build()
    encoder.load_state_dict(load_file(directory / WEIGHTS_FILE))
    return encoder.eval(), spec
