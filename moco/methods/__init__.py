"""Self-supervised methods behind one interface (methods/base.py), one module each.

`build_method(name, spec, settings, world_size=...)` is the one way in: the pipeline passes the
method's name and its settings as a mapping, and never names a method class itself."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moco.backbones import BackboneSpec
from moco.methods.base import Method, StepOutput
from moco.methods.mocov2 import MoCoV2, MoCoV2Config
from moco.methods.mocov3 import MoCoV3, MoCoV3Config

# name -> (the Method, its config dataclass)
METHODS: dict[str, tuple[type[Method], type]] = {
    "mocov2": (MoCoV2, MoCoV2Config),
    "mocov3": (MoCoV3, MoCoV3Config),
}


def build_method(
    name: str, spec: BackboneSpec, settings: Mapping[str, Any], *, world_size: int = 1
) -> Method:
    """A freshly initialised method `name` on a backbone of `spec`, configured by `settings`
    (the fields of its config dataclass)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    method, config = METHODS[name]
    return method(spec, config(**settings), world_size=world_size)


__all__ = [
    "METHODS",
    "Method",
    "MoCoV2",
    "MoCoV2Config",
    "MoCoV3",
    "MoCoV3Config",
    "StepOutput",
    "build_method",
]
