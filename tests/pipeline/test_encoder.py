"""The exported encoder reloads with its stem, and encoder.json files from before stem_stride."""

import json
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, ModelParams, load_params
from pipeline.encoder import SPEC_FILE, EncoderSpec, load_encoder, save_encoder


def spec(stem_stride: int) -> EncoderSpec:
    return EncoderSpec.from_params(ModelParams(width=8, stem_stride=stem_stride))


def test_stride_two_encoder_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    encoder, _ = spec(2).build()
    save_encoder(encoder.eval(), spec(2), tmp_path)
    loaded, loaded_spec = load_encoder(tmp_path)
    assert loaded_spec == spec(2)
    assert loaded[1].conv1.stride == (2, 2)
    x = spec(2).example_input()
    torch.testing.assert_close(loaded(x), encoder(x))


def test_spec_without_stem_stride_loads_the_stride_one_stem(tmp_path: Path) -> None:
    encoder, _ = spec(1).build()
    save_encoder(encoder.eval(), spec(1), tmp_path)
    old = json.loads((tmp_path / SPEC_FILE).read_text())
    del old["stem_stride"]  # written before the setting existed
    (tmp_path / SPEC_FILE).write_text(json.dumps(old))
    loaded, loaded_spec = load_encoder(tmp_path)
    assert loaded_spec.stem_stride == 1 and loaded[1].conv1.stride == (1, 1)


def test_stride_two_without_small_stem_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model\.stem_stride"):
        load_params(None, ["model.stem_stride=2", "model.small_stem=false"])
