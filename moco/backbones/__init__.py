"""Backbones described by one spec, the object that travels config -> model -> encoder.json.

A `BackboneSpec` holds every setting that rebuilds a feature extractor, so no stage copies the
fields by hand; methods build their encoders from it and the exported encoder records it whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from torch import nn

from moco.backbones.resnet import RESNET_ARCHS, Normalize, WidthResNet, build_resnet
from moco.backbones.vit import VIT_ARCHS, build_vit


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that rebuilds a backbone (input: float images in [0, 1] when mean/std are set).

    ResNets read width, small_stem and stem_stride; ViTs read patch_size. Empty mean/std: the
    backbone takes already-normalised input (tests, benchmarks)."""

    name: str
    in_channels: int
    image_size: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    width: int = 64
    small_stem: bool = True
    stem_stride: int = 1
    patch_size: int = 16

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able settings (tuples as lists)."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> BackboneSpec:
        """The inverse of to_dict; unknown keys are refused so a typo cannot pass silently."""
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(settings) - known):
            raise ValueError(f"backbone spec: unknown setting(s) {unknown}; known: {sorted(known)}")
        return cls(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}  # type: ignore[arg-type]
        )

    def build(self, norm_layer: Callable[[int], nn.Module] | None = None) -> tuple[nn.Module, int]:
        """A randomly initialised backbone and its feature size; `norm_layer` replaces a
        ResNet's BatchNorm2d (e.g. SplitBatchNorm for single-process shuffle BN)."""
        return build_backbone(self, norm_layer=norm_layer)


def build_backbone(
    spec: BackboneSpec, norm_layer: Callable[[int], nn.Module] | None = None
) -> tuple[nn.Module, int]:
    """(extractor mapping [N, C, H, W] to flat [N, feat_dim] features, feat_dim) for `spec`."""
    if spec.name in RESNET_ARCHS:
        return build_resnet(
            spec.name,
            width=spec.width,
            small_stem=spec.small_stem,
            stem_stride=spec.stem_stride,
            in_channels=spec.in_channels,
            mean=spec.mean or None,
            std=spec.std or None,
            norm_layer=norm_layer,
        )
    if spec.name in VIT_ARCHS:
        return build_vit(
            spec.name,
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            in_channels=spec.in_channels,
            mean=spec.mean or None,
            std=spec.std or None,
        )
    known = sorted(RESNET_ARCHS) + sorted(VIT_ARCHS)
    raise ValueError(f"unknown backbone {spec.name!r}; choose from {known}")


__all__ = [
    "RESNET_ARCHS",
    "VIT_ARCHS",
    "BackboneSpec",
    "Normalize",
    "WidthResNet",
    "build_backbone",
    "build_resnet",
    "build_vit",
]
