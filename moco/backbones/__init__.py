"""Backbones: ResNets and ViTs, described by one BackboneSpec.

Minimal stand-in for the seam's package (method-seam.md); the seam's version replaces it on merge.
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from moco.backbones.resnet import build_backbone
from moco.backbones.vit import VIT_ARCHS, build_vit


@dataclass(frozen=True)
class BackboneSpec:
    """All it takes to rebuild a backbone; travels config -> model -> encoder.json -> loader."""

    name: str
    in_channels: int
    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    width: int = 64
    small_stem: bool = True
    stem_stride: int = 1
    patch_size: int = 16

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BackboneSpec":
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})

    def build(self) -> tuple[nn.Module, int]:
        """(feature extractor taking raw [0, 1] images, feature width)."""
        if self.name in VIT_ARCHS:
            return build_vit(
                self.name,
                image_size=self.image_size,
                patch_size=self.patch_size,
                in_channels=self.in_channels,
                mean=self.mean,
                std=self.std,
            )
        return build_backbone(
            self.name,
            width=self.width,
            small_stem=self.small_stem,
            stem_stride=self.stem_stride,
            in_channels=self.in_channels,
            mean=self.mean,
            std=self.std,
        )


__all__ = ["VIT_ARCHS", "BackboneSpec", "build_backbone", "build_vit"]
