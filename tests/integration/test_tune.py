"""A real Ray Tune sweep of distributed Ray Train trials: ASHA, nested MLflow runs, best config."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import dump_params, load_params
from pipeline.pretrain import plan
from pipeline.shard import shard
from pipeline.tune import sweep

pytestmark = pytest.mark.integration

SWEEP = [
    "tune.name=tiny",
    "tune.num_samples=4",
    "tune.epochs=2",
    "tune.grace_period=1",
    # ASHA on the loss, whose level the queue sets (~log K at this length, whatever CPU
    # numerics do): with 4 trials one at a time a trial continues past epoch 1 only if it
    # beats 3/4 of those before it, so a K=4096 trial after a K=256 one is stopped
    "tune.metric=loss",
    "tune.reduction_factor=4",
    "tune.workers_per_trial=2",
    "tune.cpus_per_worker=0.9",
    "tune.seed=1",
    "tune.space.method.queue_size={type: choice, values: [256, 4096]}",
    "tune.space.method.temperature={type: choice, values: [0.2]}",
    # checkpoints inside the trials' epochs too: ASHA and MLflow must still see epochs only
    "train.checkpoint_every_steps=4",
]


def test_sweep_stops_trials_early_records_children_and_writes_a_usable_best_config(
    project: Path, ray_cluster: None
) -> None:
    params = load_params("params.yaml", SWEEP)
    shard(params)

    result = sweep(params)

    trials = result.trials
    assert len(trials) == 4
    reasons = [t["stop_reason"] for t in trials]
    assert "early_stopped" in reasons and "failed" not in reasons
    for trial in trials:
        assert trial["epochs"] == (2 if trial["stop_reason"] == "completed" else 1)

    client = MlflowClient()
    children = client.search_runs(
        [client.get_run(result.parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'",
    )
    assert len(children) == 4
    by_run = {t["run_id"]: t for t in trials}
    for child in children:
        trial = by_run[child.info.run_id]
        assert child.info.status == "FINISHED"
        assert child.data.tags["stop_reason"] == trial["stop_reason"]
        history = client.get_metric_history(child.info.run_id, "loss")
        assert len(history) == trial["epochs"]
        assert history[-1].value == pytest.approx(trial["loss"])
        assert float(child.data.params["method.temperature"]) == pytest.approx(
            trial["method.temperature"]
        )

    parent_artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"trials.csv", "best.yaml", "parallel_coordinates.png"} <= parent_artifacts
    assert client.get_run(result.parent_run_id).data.metrics["best_loss"] == pytest.approx(
        result.best_metric
    )

    completed = [t for t in trials if t["stop_reason"] == "completed"]
    assert result.best_metric == min(t["loss"] for t in completed)
    best = load_params(result.best_params_file)
    for key, value in result.best_values.items():
        section, name = key.split(".")
        assert getattr(getattr(best, section), name) == value
    assert best.train.epochs == params.train.epochs  # the sweep's trial schedule stays out
    plan(best)  # valid input to pretrain
    with Path("runs/tune/tiny/trials.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 4

    resumed = sweep(params, resume=True)  # a finished sweep restores without rerunning
    assert resumed.parent_run_id == result.parent_run_id
    assert sorted(t["trial_id"] for t in resumed.trials) == sorted(t["trial_id"] for t in trials)


def test_a_sweep_that_cannot_fit_the_cluster_is_refused_before_any_trial(
    project: Path, ray_cluster: None
) -> None:
    params = load_params("params.yaml", [*SWEEP, "tune.cpus_per_worker=1"])
    shard(params)
    with pytest.raises(ValueError, match=r"one trial needs 2.1 CPUs"):
        sweep(params)
    assert not Path("runs/tune/tiny").exists()


def test_sweep_flow_retrains_the_best_config_outside_the_dvc_outputs(
    project: Path, ray_cluster: None
) -> None:
    from flows.sweep import sweep as sweep_flow

    overrides = [
        "tune.name=flow",
        "tune.num_samples=2",
        "tune.epochs=1",
        "tune.space.method.queue_size={type: choice, values: [256, 512]}",
        # one sweep compares methods: with this seed the two trials draw one method each
        "tune.space.method.name={type: choice, values: [mocov2, mocov3]}",
        "tune.seed=0",
    ]
    params = load_params("params.yaml", overrides)
    dump_params(params, "sweep.yaml")  # the flow takes a params file
    shard(params)

    state = sweep_flow(params_file="sweep.yaml", return_state=True)

    assert state.is_completed(), state.message
    best = Path("runs/tune/flow/best")
    decision = json.loads((best / "promotion.json").read_text())
    run_id = json.loads((best / "encoder/run.json").read_text())["run_id"]
    client = MlflowClient()
    version = client.get_model_version("moco-encoder", decision["version"])
    assert version.run_id == run_id
    run = client.get_run(run_id)
    with Path("runs/tune/flow/trials.csv").open() as handle:
        trials = list(csv.DictReader(handle))
    assert sorted(t["method.name"] for t in trials) == ["mocov2", "mocov3"]
    best = load_params(params.tune.best_params_file).method
    assert run.data.params["method.name"] == best.name
    assert float(run.data.params["method.temperature"]) == pytest.approx(best.temperature)
    assert "eval_knn_top1" in run.data.metrics
    assert not Path("models/encoder").exists() and not Path("metrics.json").exists()
