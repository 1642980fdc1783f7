"""The one config: defaults load, overrides apply, bad values are refused naming the key."""

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, Params, dump_params, load_params, with_overrides

ROOT = Path(__file__).resolve().parents[2]


# params.yaml's recipe for short CPU schedules (bench/RESULTS.md, 2026-12-02); the typed
# defaults keep the general ones, which params-gpu.yaml and the tests build on.
CPU_RECIPE = {
    "model.backbone": "resnet10",
    "model.stem_stride": 2,
    "moco.symmetric": True,
    "moco.queue_size": 1024,
    "train.epochs": 10,
}


def test_params_yaml_is_the_typed_defaults_plus_the_cpu_recipe() -> None:
    assert load_params(ROOT / "params.yaml") == with_overrides(
        Params(), CPU_RECIPE, keep_space=True
    )


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


# --- the sweep's search space ------------------------------------------------------------------


def test_sweep_keys_keep_their_dots_in_overrides() -> None:
    params = load_params(None, ["tune.space.train.lr={type: loguniform, low: 0.001, high: 0.1}"])
    assert params.tune.space["train.lr"].low == 0.001


@pytest.mark.parametrize(
    ("assignment", "needle"),
    [
        ("tune.space.moco.nope={type: choice, values: [1]}", "names no setting"),
        ("tune.space.moco.temperature={type: uniform, low: -1, high: 1}", "the bound -1.0"),
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
                "tune.space.moco.queue_size={type: choice, values: [256]}",
            ],
        )


def test_with_overrides_sets_dotted_keys_and_validates() -> None:
    params = with_overrides(Params(), {"moco.temperature": 0.3, "train.num_workers": 1})
    assert params.moco.temperature == 0.3 and params.train.num_workers == 1
    assert params.tune.space == {}  # a trial is not itself a sweep
    assert with_overrides(Params(), {}, keep_space=True).tune.space == Params().tune.space
    with pytest.raises(ConfigError, match="greater than 0"):
        with_overrides(Params(), {"moco.temperature": 0.0})


def test_asha_grace_longer_than_a_trial_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"grace_period: 3 epochs is more than a trial"):
        load_params(None, ["tune.epochs=2", "tune.grace_period=3"])
