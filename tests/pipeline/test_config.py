"""The one config: defaults load, overrides apply, bad values are refused naming the key."""

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, Params, dump_params, load_params

ROOT = Path(__file__).resolve().parents[2]


def test_params_yaml_matches_the_typed_defaults() -> None:
    """params.yaml spells out every key, with the same values the dataclasses default to."""
    assert load_params(ROOT / "params.yaml") == Params()


def test_overrides_are_typed_by_yaml() -> None:
    params = load_params(
        ROOT / "params.yaml", ["moco.temperature=0.2", "train.epochs=3", "model.mlp=false"]
    )
    assert params.moco.temperature == 0.2
    assert params.train.epochs == 3
    assert params.model.mlp is False


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("moco.temperature=0", "moco.temperature"),
        ("moco.temperature=-1", "moco.temperature"),
        ("moco.momentum=1.0", "moco.momentum"),
        ("moco.momentum=-0.1", "moco.momentum"),
        ("moco.queue_size=0", "moco.queue_size"),
        ("moco.queue_size=100", "moco.queue_size"),  # smaller than the global batch
        ("moco.tempreature=0.2", "moco.tempreature"),  # unknown key
        ("train.epochs=many", "train.epochs"),
        ("model.in_channels=3", "model.mean"),  # needs 3 means
    ],
)
def test_bad_values_are_refused_in_one_line_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_params(ROOT / "params.yaml", [override])
    message = str(error.value)
    assert "\n" not in message
    assert f": {key}:" in message


def test_queue_must_hold_a_symmetric_step() -> None:
    with pytest.raises(ConfigError, match="symmetric"):
        load_params(None, ["moco.symmetric=true", "moco.queue_size=300"])


def test_missing_params_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "nope.yaml")


def test_dump_round_trips(tmp_path: Path) -> None:
    params = load_params(None, ["moco.queue_size=8192", "train.lr=0.03"])
    dump_params(params, tmp_path / "best.yaml")
    assert load_params(tmp_path / "best.yaml") == params
    assert set(yaml.safe_load((tmp_path / "best.yaml").read_text())) == set(Params.model_fields)


@pytest.mark.parametrize("path", sorted(ROOT.glob("params*.yaml")), ids=lambda p: p.name)
def test_every_shipped_params_file_is_valid(path: Path) -> None:
    load_params(path)
