"""The logged encoder: what serving it needs is pinned, and MLflow's own loader runs it."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import mlflow
import torch
from registry_helpers import SPEC

from pipeline.encoder import load_encoder


def test_requirements_pin_the_loaders_packages_and_the_pt2_model_matches_the_encoder(
    store,
) -> None:
    mlflow.set_tracking_uri(store.uri)
    listed = mlflow.pyfunc.get_model_dependencies(store.model_uri)  # its requirements.txt
    lines = Path(listed).read_text().split()
    for package in ("torch", "torchvision", "safetensors", "numpy", "mlflow"):
        assert f"{package}=={metadata.version(package)}" in lines, lines
    served = mlflow.pytorch.load_model(store.model_uri)  # the pt2 graph, not our loader
    encoder, _ = load_encoder(store.encoder_dir)
    images = torch.rand(3, SPEC.in_channels, SPEC.image_size, SPEC.image_size)
    with torch.no_grad():
        assert torch.allclose(served(images), encoder(images), atol=1e-5)
