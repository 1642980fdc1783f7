"""The one config: defaults load, overrides apply, bad values are refused naming the key."""

from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    ConfigError,
    MocoV3Params,
    Params,
    dump_params,
    load_params,
    with_overrides,
)

ROOT = Path(__file__).resolve().parents[2]


# params.yaml's recipe for short CPU schedules (bench/RESULTS.md, 2026-12-02); the typed
# defaults keep the general ones, which params-gpu.yaml and the tests build on.
CPU_RECIPE = {
    "model.backbone": "resnet10",
    "model.stem_stride": 2,
    "method.symmetric": True,
    "method.queue_size": 1024,
    "train.epochs": 10,
}


def test_params_yaml_is_the_typed_defaults_plus_the_cpu_recipe() -> None:
    assert load_params(ROOT / "params.yaml") == with_overrides(
        Params(), CPU_RECIPE, keep_space=True
    )


def test_overrides_are_typed_by_yaml() -> None:
    params = load_params(
        ROOT / "params.yaml", ["method.temperature=0.2", "train.epochs=3", "method.mlp=false"]
    )
    assert params.method.temperature == 0.2
    assert params.train.epochs == 3
    assert params.method.mlp is False


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("method.temperature=0", "method.temperature"),
        ("method.temperature=-1", "method.temperature"),
        ("method.momentum=1.0", "method.momentum"),
        ("method.momentum=-0.1", "method.momentum"),
        ("method.queue_size=0", "method.queue_size"),
        ("method.queue_size=100", "method.queue_size"),  # smaller than the global batch
        ("method.tempreature=0.2", "method.tempreature"),  # unknown key
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
        load_params(None, ["method.symmetric=true", "method.queue_size=300"])


def test_the_old_moco_section_is_refused_saying_where_each_key_moved() -> None:
    with pytest.raises(ConfigError) as error:
        load_params(None, ["moco.queue_size=1024", "moco.augmentation=v1"])
    message = str(error.value)
    assert "\n" not in message
    assert "moco.queue_size -> method.queue_size" in message
    assert "moco.augmentation -> augment.recipe" in message
    assert "method.name: mocov2" in message


def test_a_method_without_a_name_is_mocov2_and_mocov3_has_its_own_keys() -> None:
    assert load_params(None, ["method.queue_size=8192"]).method.name == "mocov2"
    v3 = load_params(None, ["method.name=mocov3", "method.mlp_dim=64"]).method
    assert (v3.name, v3.temperature, v3.mlp_dim) == ("mocov3", 0.2, 64)
    with pytest.raises(ConfigError, match=r": method\.queue_size: unknown key"):
        load_params(None, ["method.name=mocov3", "method.queue_size=8192"])


def test_set_method_name_starts_that_method_from_its_own_defaults() -> None:
    """params.yaml holds MoCo v2's keys: --set method.name=mocov3 must not hand them to v3."""
    params = load_params(ROOT / "params.yaml", ["method.name=mocov3", "method.temperature=0.3"])
    assert params.method == MocoV3Params(temperature=0.3)
    assert load_params(ROOT / "params.yaml", ["method.name=mocov2"]).method.queue_size == 1024


def test_missing_params_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "nope.yaml")


def test_dump_round_trips(tmp_path: Path) -> None:
    params = load_params(None, ["method.queue_size=8192", "train.lr=0.03"])
    dump_params(params, tmp_path / "best.yaml")
    assert load_params(tmp_path / "best.yaml") == params
    assert set(yaml.safe_load((tmp_path / "best.yaml").read_text())) == set(Params.model_fields)


@pytest.mark.parametrize("path", sorted(ROOT.glob("params*.yaml")), ids=lambda p: p.name)
def test_every_shipped_params_file_is_valid(path: Path) -> None:
    load_params(path)


# --- the sweep's search space ------------------------------------------------------------------


def test_sweep_keys_keep_their_dots_in_overrides() -> None:
    params = load_params(None, ["tune.space.train.lr={type: loguniform, low: 0.001, high: 0.1}"])
    assert params.tune.space["train.lr"].low == 0.001


@pytest.mark.parametrize(
    ("assignment", "needle"),
    [
        ("tune.space.method.nope={type: choice, values: [1]}", "names no setting"),
        ("tune.space.method.temperature={type: uniform, low: -1, high: 1}", "the bound -1.0"),
        ("tune.space.train.lr={type: loguniform, low: 0, high: 1}", "needs low > 0"),
        ("tune.space.train.lr={type: uniform, low: 0.2, high: 0.1}", "must be below high"),
    ],
)
def test_a_sweep_that_would_build_an_invalid_trial_is_refused_up_front(
    assignment: str, needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle) as caught:
        load_params(None, [assignment])
    assert "\n" not in str(caught.value)


def test_trial_bounds_are_checked_with_the_trial_resources() -> None:
    # 4 workers x 128 = 512 keys per step: a 256-key queue only fails for the trial's resources
    with pytest.raises(ConfigError, match="the bound 256 makes an invalid trial"):
        load_params(
            None,
            [
                "tune.workers_per_trial=4",
                "tune.space.method.queue_size={type: choice, values: [256]}",
            ],
        )


def test_with_overrides_sets_dotted_keys_and_validates() -> None:
    params = with_overrides(Params(), {"method.temperature": 0.3, "train.num_workers": 1})
    assert params.method.temperature == 0.3 and params.train.num_workers == 1
    assert params.tune.space == {}  # a trial is not itself a sweep
    assert with_overrides(Params(), {}, keep_space=True).tune.space == Params().tune.space
    with pytest.raises(ConfigError, match="greater than 0"):
        with_overrides(Params(), {"method.temperature": 0.0})


def test_asha_grace_longer_than_a_trial_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"grace_period: 3 epochs is more than a trial"):
        load_params(None, ["tune.epochs=2", "tune.grace_period=3"])


# --- overlays (extends:) -----------------------------------------------------------------------


def test_an_overlay_key_wins_and_everything_else_comes_from_the_base(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(
        "model: {width: 8, image_size: 32}\ntrain: {epochs: 7, lr: 0.1}\n"
        "tune:\n  space:\n    train.lr: {type: loguniform, low: 0.01, high: 0.2}\n"
    )
    (tmp_path / "gpu.yaml").write_text(
        "extends: base.yaml\ntrain: {epochs: 2}\n"
        "tune:\n  space:\n    method.temperature: {type: choice, values: [0.1, 0.2]}\n"
    )
    params = load_params(tmp_path / "gpu.yaml")
    assert params.train.epochs == 2  # the overlay's
    assert (params.train.lr, params.model.width, params.model.image_size) == (0.1, 8, 32)  # base
    assert params.train.batch_size == Params().train.batch_size  # in neither: the typed default
    assert list(params.tune.space) == ["method.temperature"]  # a space is replaced, not merged


def test_an_overlay_of_another_method_does_not_inherit_the_base_methods_keys(
    tmp_path: Path,
) -> None:
    (tmp_path / "v3.yaml").write_text(
        f"extends: {ROOT / 'params.yaml'}\nmethod: {{name: mocov3}}\n"
    )
    params = load_params(tmp_path / "v3.yaml")
    assert params.method == MocoV3Params()
    assert params.model == load_params(ROOT / "params.yaml").model


def test_an_overlay_whose_base_is_missing_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "gpu.yaml").write_text("extends: nope.yaml\ntrain: {epochs: 2}\n")
    with pytest.raises(ConfigError) as error:
        load_params(tmp_path / "gpu.yaml")
    assert "\n" not in str(error.value)
    assert f"{tmp_path / 'gpu.yaml'}: extends: {tmp_path / 'nope.yaml'} does not exist" in str(
        error.value
    )


def test_the_gpu_preset_lists_only_what_differs_from_params_yaml() -> None:
    """Every key params-gpu.yaml sets differs from params.yaml's value (else it is drift-prone)."""
    overlay = yaml.safe_load((ROOT / "params-gpu.yaml").read_text())
    assert overlay.pop("extends") == "params.yaml"
    base = load_params(ROOT / "params.yaml").model_dump()
    for section, values in overlay.items():
        for key, value in values.items():
            if key != "space":
                assert base[section][key] != value, f"{section}.{key} repeats params.yaml"
