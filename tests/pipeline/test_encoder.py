"""The exported encoder reloads with its stem and method, and encoder.json files from before
stem_stride and before the method seam (flat, no method) still load."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, ModelParams, Params, load_params
from pipeline.encoder import SPEC_FILE, EncoderSpec, check_warm_start, load_encoder, save_encoder


def spec(stem_stride: int) -> EncoderSpec:
    return EncoderSpec.from_params(Params(model=ModelParams(width=8, stem_stride=stem_stride)))


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
    # as written before the method seam and before stem_stride: flat, "backbone" the name
    old = {"backbone": "resnet18", "width": 8, "small_stem": True, "in_channels": 1}
    old |= {"image_size": 28, "mean": [0.286], "std": [0.353]}
    (tmp_path / SPEC_FILE).write_text(json.dumps(old))
    loaded, loaded_spec = load_encoder(tmp_path)
    assert loaded_spec == spec(1)  # MoCo v2 (the only method then), the same backbone
    assert loaded_spec.backbone.stem_stride == 1 and loaded[1].conv1.stride == (1, 1)


def test_encoder_json_records_the_method_and_the_whole_spec(tmp_path: Path) -> None:
    encoder, _ = spec(2).build()
    save_encoder(encoder, spec(2), tmp_path)
    written = json.loads((tmp_path / SPEC_FILE).read_text())
    assert written["method"] == "mocov2"
    assert written["backbone"] == {
        "name": "resnet18",
        "in_channels": 1,
        "image_size": 28,
        "mean": [0.286],
        "std": [0.353],
        "width": 8,
        "small_stem": True,
        "stem_stride": 2,
        "patch_size": 16,
    }


def test_stride_two_without_small_stem_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model\.stem_stride"):
        load_params(None, ["model.stem_stride=2", "model.small_stem=false"])


def test_a_warm_start_from_another_method_or_backbone_is_refused_naming_both() -> None:
    v2 = spec(2)
    check_warm_start(v2, spec(2), "models/encoder")  # the same method and spec: allowed
    v3 = EncoderSpec.from_params(load_params(None, ["method.name=mocov3", "model.width=8"]))
    for found in (replace(v2, method="mocov3"), spec(1), v3):
        with pytest.raises(ValueError) as error:
            check_warm_start(v2, found, "models/encoder")
        message = str(error.value)
        assert "\n" not in message and message.startswith("train.init_from: models/encoder")
        assert found.describe() in message and v2.describe() in message
