"""params.yaml's sweep distributions become the Tune domains they name."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.config import Choice, Range, TuneParams
from pipeline.plots import plot_parallel_coordinates
from pipeline.tune import check_fits, search_space


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
