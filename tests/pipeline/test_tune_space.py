"""params.yaml's sweep distributions become the Tune domains they name."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.config import (
    Choice,
    ConfigError,
    Range,
    TuneParams,
    load_params,
    with_overrides,
)
from pipeline.plots import plot_parallel_coordinates
from pipeline.tune import check_fits, search_space, trial_values


def draws(distribution, n: int = 4000) -> np.ndarray:
    domain = search_space({"x": distribution})["x"]
    return np.array(domain.sample(size=n, random_state=np.random.default_rng(0)), dtype=float)


def test_loguniform_is_uniform_in_log_space() -> None:
    values = draws(Range(type="loguniform", low=0.05, high=0.5))
    assert values.min() >= 0.05 and values.max() <= 0.5
    # half the mass below the geometric mean, a quarter below the first log-quartile
    assert np.mean(values < math.sqrt(0.05 * 0.5)) == pytest.approx(0.5, abs=0.03)
    assert np.mean(values < 0.05 * 10**0.25) == pytest.approx(0.25, abs=0.03)


def test_uniform_and_integer_ranges_stay_in_bounds() -> None:
    values = draws(Range(type="uniform", low=0.1, high=0.3))
    assert np.mean(values < 0.2) == pytest.approx(0.5, abs=0.03)
    ints = draws(Range(type="randint", low=2, high=5))
    assert set(ints) == {2, 3, 4}  # high is exclusive, as in Tune
    logints = draws(Range(type="lograndint", low=1024, high=65536))
    assert logints.min() >= 1024 and logints.max() < 65536
    assert np.all(logints == np.round(logints))


def test_choice_draws_every_value_and_nothing_else() -> None:
    values = draws(Choice(type="choice", values=[0.99, 0.995, 0.999]))
    assert set(values) == {0.99, 0.995, 0.999}


def test_parallel_coordinates_draws_one_line_per_trial() -> None:
    trials = [
        {"moco.temperature": t, "train.lr": lr, "knn_top1": acc, "stop_reason": reason}
        for t, lr, acc, reason in [
            (0.07, 0.03, 0.71, "completed"),
            (0.2, 0.1, 0.65, "early_stopped"),
            (0.4, 0.01, 0.69, "completed"),
        ]
    ]
    keys = ["moco.temperature", "train.lr"]
    fig = plot_parallel_coordinates(trials, keys, "knn_top1", log_keys=["train.lr"])
    lines = [line for line in fig.axes[0].lines if line.get_marker() == "o"]
    assert len(lines) == 3
    assert [line.get_linestyle() for line in lines] == ["-", "--", "-"]
    # the best trial sits at the top of the metric axis, the worst at the bottom
    assert lines[0].get_ydata()[-1] == 1.0 and lines[1].get_ydata()[-1] == 0.0


@pytest.mark.parametrize(
    ("overrides", "cluster", "needle"),
    [
        ({"cpus_per_worker": 1.0}, {"CPU": 2}, "one trial needs 2.1 CPUs"),
        ({"max_concurrent_trials": 2}, {"CPU": 2}, "lower tune.max_concurrent_trials to 1"),
        ({"gpus_per_worker": 1}, {"CPU": 8, "GPU": 1}, "one trial needs 2 GPUs"),
    ],
)
def test_a_sweep_the_cluster_cannot_place_is_refused(overrides, cluster, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        check_fits(TuneParams(**overrides), cluster)
    check_fits(TuneParams(), {"CPU": 2})  # the default fits this 2-CPU machine


# --- a sweep over methods ----------------------------------------------------------------------

SPACE = "tune.space.method."
METHODS_SPACE = [
    "tune.space.method.name={type: choice, values: [mocov2, mocov3]}",
    "tune.space.method.queue_size={type: choice, values: [1024, 4096]}",  # MoCo v2's
    "tune.space.method.mlp_dim={type: choice, values: [64, 128]}",  # MoCo v3's
    "tune.space.method.temperature={type: choice, values: [0.1, 0.3]}",  # both have it
]


def test_a_trial_gets_only_the_keys_of_its_method() -> None:
    base = load_params(None, METHODS_SPACE)
    sampled = {
        "method.queue_size": 4096,
        "method.mlp_dim": 64,
        "method.temperature": 0.3,
        "train.lr": 0.05,
    }
    v3 = with_overrides(base, {"method.name": "mocov3", **sampled}).method
    assert (v3.name, v3.mlp_dim, v3.temperature) == ("mocov3", 64, 0.3)
    assert v3.dim == 256  # not sampled: MoCo v3's own default, not MoCo v2's 128
    v2 = with_overrides(base, {"method.name": "mocov2", **sampled}).method
    assert (v2.name, v2.queue_size, v2.temperature, v2.dim) == ("mocov2", 4096, 0.3, 128)
    # what the trials table and plot show: the method, and None for the other method's keys
    space = base.tune.space
    row = trial_values(space, {"method.name": "mocov3", **sampled}, "mocov2")
    assert row["method.name"] == "mocov3"
    assert row["method.queue_size"] is None and row["method.mlp_dim"] == 64


def test_each_method_key_is_checked_against_the_methods_that_have_it() -> None:
    # 2 workers x 128 = 256 keys per step: a 16-key queue fails for MoCo v2's trials
    with pytest.raises(ConfigError, match=r"tune\.space\.method\.queue_size: the bound 16"):
        load_params(
            None, [*METHODS_SPACE[:1], "tune.space.method.queue_size={type: choice, values: [16]}"]
        )
    with pytest.raises(ConfigError, match=r"tune\.space\.method\.mlp_dim: the bound 1"):
        load_params(
            None, [*METHODS_SPACE[:1], "tune.space.method.mlp_dim={type: choice, values: [1]}"]
        )
    with pytest.raises(ConfigError, match="names no setting of any method"):
        load_params(None, ["tune.space.method.nope={type: choice, values: [1]}"])
    with pytest.raises(ConfigError, match=r"method\.name"):
        load_params(None, ["tune.space.method.name={type: choice, values: [mocov2, simclr]}"])


def test_a_sweep_of_one_method_keeps_working_when_the_base_is_the_other() -> None:
    """params.yaml's space holds MoCo v2 keys; `--set method.name=mocov3` must still load, and
    its trials ignore them."""
    params = load_params(None, ["method.name=mocov3"])
    assert "method.queue_size" in params.tune.space
    trial = with_overrides(params, {"method.queue_size": 4096, "method.temperature": 0.3})
    assert trial.method.name == "mocov3" and trial.method.temperature == 0.3


def test_parallel_coordinates_leaves_a_gap_for_another_methods_key() -> None:
    trials = [
        {"method.name": "mocov2", "method.queue_size": 1024, "knn_top1": 0.7},
        {"method.name": "mocov3", "method.queue_size": None, "knn_top1": 0.6},
        {"method.name": "mocov2", "method.queue_size": 4096, "knn_top1": 0.65},
    ]
    fig = plot_parallel_coordinates(trials, ["method.name", "method.queue_size"], "knn_top1", [])
    lines = [line for line in fig.axes[0].lines if line.get_marker() == "o"]
    ys = [list(line.get_ydata()) for line in lines]
    assert [y[0] for y in ys] == [0.0, 1.0, 0.0]  # the method axis: mocov2 bottom, mocov3 top
    assert math.isnan(ys[1][1]) and ys[0][1] == 0.0 and ys[2][1] == 1.0
