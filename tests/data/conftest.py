"""Fixtures for the data stage: generated image corpora and params pointing into tmp_path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from data_stage_helpers import write_corpus

from pipeline.config import Params, load_params


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")


@pytest.fixture
def make_params(tmp_path: Path) -> Callable[..., Params]:
    """Params with shards under tmp_path; keyword arguments override data.* keys. Folder
    corpora here are the labelled layout (class folders, no holdout) unless a test says not."""

    def make(shards: str = "shards", **data: object) -> Params:
        data = {"labels": "folders", "holdout_percent": 0} | data
        overrides = [f"data.shards_dir={tmp_path / shards}"]
        overrides += [f"data.{key}={value}" for key, value in data.items()]
        return load_params(None, overrides)

    return make
