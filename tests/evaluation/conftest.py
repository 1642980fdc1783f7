"""Fixtures for the evaluation suite: scikit-learn digits shards and a tiny saved encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
from evaluation_helpers import TINY_SPEC

from pipeline.config import load_params
from pipeline.encoder import save_encoder


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.shard import shard

    root = tmp_path_factory.mktemp("digits") / "shards"
    shard(load_params(None, ["data.source=digits", f"data.shards_dir={root}", "data.min_shards=2"]))
    return root


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    torch.manual_seed(1)
    encoder, _ = TINY_SPEC.build()
    return save_encoder(encoder.eval(), TINY_SPEC, tmp_path_factory.mktemp("model") / "encoder")
