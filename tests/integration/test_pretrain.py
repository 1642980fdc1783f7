"""Pretraining on real Ray Train workers: checkpoints, MLflow, resume, faults, divergence."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import mlflow
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import Params, load_params
from pipeline.encoder import load_encoder
from pipeline.errors import StageError
from pipeline.pretrain import plan, pretrain
from pipeline.shard import shard
from pipeline.train_worker import EXTRA_FILE, STATE_FILE

pytestmark = pytest.mark.integration


@pytest.fixture
def params(project: Path) -> Params:
    params = load_params("params.yaml")
    shard(params)
    return params


def variant(*overrides: str) -> Params:
    """The test project's params.yaml with some keys changed."""
    return load_params("params.yaml", list(overrides))


SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it kept


def checkpoints(run_id: str) -> list[Path]:
    return sorted(
        p for p in Path("runs/ray", f"pretrain-{run_id}").glob("checkpoint_*") if p.is_dir()
    )


def test_two_workers_checkpoint_metrics_model_and_identical_queues(
    params: Params, ray_cluster: None
) -> None:
    # time-based checkpoints too (6 ms, checked every 10 steps: due at every check, however
    # fast the machine; 0.3 s was missed once the epochs stopped decoding PNGs): rank 0's
    # clock decides for both ranks, or they would hang in ray.train.report
    result = pretrain(
        variant("train.checkpoint_every_minutes=0.0001", "train.system_metrics_seconds=0.5")
    )

    kept = json.loads(Path(checkpoints(result.run_id)[-1].parent, SNAPSHOT).read_text())
    assert any("step_in_epoch" in c["metrics"] for c in kept["checkpoint_results"])
    latest = checkpoints(result.run_id)[-1]
    assert (latest / STATE_FILE).exists()
    queues = [torch.load(latest / EXTRA_FILE.format(rank=r), weights_only=True) for r in (0, 1)]
    assert torch.equal(queues[0]["keys"], queues[1]["keys"])
    assert torch.equal(queues[0]["ptr"], queues[1]["ptr"])

    client = MlflowClient()
    for name in ("loss", "lr", "images_per_s", "data_wait_fraction", "knn_top1"):
        assert [m.step for m in client.get_metric_history(result.run_id, name)] == [0, 1], name
    assert "training_curves.png" in [a.path for a in client.list_artifacts(result.run_id)]
    # the node's utilisation, sampled by its first worker while it trained, not by the driver
    cpu = client.get_metric_history(result.run_id, "system/node0/cpu_utilization_percentage")
    assert all(0 <= m.value <= 100 for m in cpu) and max(m.value for m in cpu) > 0
    assert not any(k.startswith("system/") for k in result.metrics)  # results stay results

    images = torch.rand(3, 1, 28, 28)
    encoder, _ = load_encoder(result.model_uri)
    exported = mlflow.pytorch.load_model(result.model_uri)
    with torch.no_grad():
        assert torch.allclose(exported(images), encoder(images), atol=1e-5)

    # --init-from: a warm start begins from these trained weights; with lr ~0 the next
    # encoder keeps them (a run that ignored init_from would end at the seed's random init)
    shutil.copytree(params.train.output_dir, "warm-from")
    warm = pretrain(variant("train.init_from=warm-from", "train.lr=1e-12", "train.epochs=1"))
    source = load_encoder("warm-from")[0].state_dict()
    warmed = load_encoder(warm.encoder_dir)[0].state_dict()
    convs = [k for k in source if k.endswith("conv1.weight") or k.endswith("conv2.weight")]
    assert convs and all(torch.allclose(warmed[k], source[k], atol=1e-6) for k in convs)


def test_resume_continues_the_same_run_from_its_checkpoint(
    params: Params, ray_cluster: None
) -> None:
    first = pretrain(variant("train.epochs=1"))
    held = torch.load(checkpoints(first.run_id)[-1] / STATE_FILE, weights_only=True)
    assert held["epoch"] == 0
    first_loss = MlflowClient().get_metric_history(first.run_id, "loss")[0].value

    resumed = pretrain(variant("train.epochs=2"), resume=True)

    assert resumed.run_id == first.run_id
    history = sorted(MlflowClient().get_metric_history(first.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [0, 1]
    assert history[0].value == first_loss  # epoch 0 was not trained again
    final = torch.load(checkpoints(first.run_id)[-1] / STATE_FILE, weights_only=True)
    assert final["epoch"] == 1
    # the queue went on from the held pointer by exactly one epoch of enqueued keys
    steps = plan(params).steps_per_epoch
    size = held["model"]["queue.keys"].shape[1]
    enqueued = steps * params.method.keys_per_step(params.train.global_batch)
    assert int(final["model"]["queue.ptr"]) == (int(held["model"]["queue.ptr"]) + enqueued) % size


def test_a_killed_worker_is_survived_from_the_last_checkpoint(
    params: Params, ray_cluster: None
) -> None:
    params = variant("train.epochs=4", "train.checkpoint_every_minutes=0")
    before = train_workers()
    result = pretrain_killing_a_worker(params)

    # Ray Train restarted the worker group: two workers, then two more from the checkpoint
    assert len(train_workers() - before) == 2 * params.train.num_workers
    run = MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert max(m.step for m in MlflowClient().get_metric_history(result.run_id, "loss")) == 3
    assert torch.load(checkpoints(result.run_id)[-1] / STATE_FILE, weights_only=True)["epoch"] == 3


def test_a_worker_lost_mid_epoch_costs_only_the_steps_since_the_last_checkpoint(
    params: Params, ray_cluster: None
) -> None:
    # the default run: one epoch, train.max_failures as configured (1); a checkpoint every 8 of
    # its 64 steps, and a queue size that no number of steps' keys fills exactly, so the
    # pointer tells a restored queue from a fresh one
    params = variant(
        "train.epochs=1",
        "train.batch_size=8",
        "method.queue_size=1000",
        "train.checkpoint_every_steps=8",
        "train.checkpoint_every_minutes=0",
    )
    assert params.train.max_failures == 1
    steps = plan(params).steps_per_epoch

    result = pretrain_killing_a_worker(params)

    assert MlflowClient().get_run(result.run_id).info.status == "FINISHED"
    resumed = MlflowClient().get_metric_history(result.run_id, "resumed_at_step")
    assert len(resumed) == 1 and 0 < resumed[0].value < steps and resumed[0].step == 0
    history = MlflowClient().get_metric_history(result.run_id, "loss")
    assert [m.step for m in history] == [0]  # mid-epoch checkpoints log no epoch rows
    final = torch.load(checkpoints(result.run_id)[-1] / STATE_FILE, weights_only=True)
    assert (final["epoch"], final["step"]) == (0, steps)
    # one epoch of keys in all: the queue went on from the checkpoint's pointer
    assert (
        int(final["model"]["queue.ptr"])
        == steps * params.method.keys_per_step(params.train.global_batch) % 1000
    )


def train_workers() -> set[str]:
    """The ids of every Ray Train worker actor this session's cluster has started, dead or
    alive (a restart after a lost worker starts a new group)."""
    from ray.util.state import list_actors

    return {
        actor.actor_id
        for actor in list_actors(
            address=ray.get_runtime_context().gcs_address,
            filters=[("class_name", "=", "RayTrainWorker")],
            limit=10_000,
        )
    }


def pretrain_killing_a_worker(params: Params):
    """Pretrain while SIGKILLing one Ray Train worker as soon as Ray Train has committed a
    checkpoint (its snapshot file names it; a checkpoint folder alone may be half-reported)."""
    from ray.util.state import list_actors

    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=pretrain(params)))
    runner.start()
    try:
        deadline = time.monotonic() + 300
        while not list(Path("runs/ray").glob(f"pretrain-*/{SNAPSHOT}")):
            assert time.monotonic() < deadline and runner.is_alive(), "no checkpoint appeared"
            time.sleep(0.2)
        workers = list_actors(
            address=ray.get_runtime_context().gcs_address,  # this session's cluster only
            filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        )
        os.kill(workers[-1].pid, signal.SIGKILL)
    finally:  # never leave the run going into the next test's folder
        runner.join(timeout=600)
    return outcome["result"]


def test_a_diverged_run_fails_and_logs_no_model(params: Params, ray_cluster: None) -> None:
    with pytest.raises(StageError, match="DivergedError"):
        pretrain(variant("train.lr=1e30", "train.epochs=1"))
    run_id = json.loads(Path("runs/ray/latest-pretrain.json").read_text())["run_id"]
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED"
    assert "DivergedError" in run.data.tags["failure"]
    assert not MlflowClient().search_logged_models(experiment_ids=[run.info.experiment_id])
    assert not Path(params.train.output_dir).exists()
