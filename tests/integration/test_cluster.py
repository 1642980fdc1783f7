"""`mocopipe` on a real two-node Ray cluster (one CPU per node, so a 2-worker run spans both),
with shards and checkpoints on S3 (moto): through RAY_ADDRESS, as a Ray Job, surviving the loss
of a node mid-epoch, and a 2-trial sweep."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
import torch
from mlflow.tracking import MlflowClient
from ray_nodes import RAY, TwoNodeCluster

from pipeline.config import load_params
from pipeline.pretrain import plan
from pipeline.shard import shard
from pipeline.train_worker import STATE_FILE

pytestmark = pytest.mark.integration

MOCOPIPE = str(Path(sys.executable).with_name("mocopipe"))
RUN_TIMEOUT_S = 900
SNAPSHOT = "checkpoint_manager_snapshot.json"
AGENT_TRIES = 12
# one epoch of 32 steps on 2 workers, a checkpoint every 8 steps, a queue no number of steps'
# keys fills exactly (the pointer tells a restored queue from a fresh one); a full-width model,
# so the epoch outlasts the node kill (at width 16 a fast CPU ran all 32 steps in ~2 s, before
# the kill after the first checkpoint took effect)
RUN = [
    "train.epochs=1",
    "train.batch_size=16",
    "model.width=64",
    "method.queue_size=1000",
    "train.checkpoint_every_steps=8",
    "train.checkpoint_every_minutes=0",
]


@pytest.fixture
def on_s3(project: Path, s3_bucket: str) -> list[str]:
    """The project's shards written to S3 (timed); the settings that point a stage there."""
    settings = [f"data.shards_dir={s3_bucket}/shards", f"train.storage_path={s3_bucket}/ray"]
    started = time.perf_counter()
    shard(load_params("params.yaml", settings))
    print(f"sharded to S3 in {time.perf_counter() - started:.1f} s")
    return settings


def _env(cluster: TwoNodeCluster, project: Path) -> dict[str, str]:
    tracking = f"sqlite:///{project / 'mlflow.db'}"
    driver = {"RAY_ADDRESS": cluster.address, "MLFLOW_TRACKING_URI": tracking}
    return os.environ | cluster.env | driver


def _sets(settings: list[str]) -> list[str]:
    return [arg for setting in settings for arg in ("--set", setting)]


def test_pretrain_survives_losing_a_node_mid_epoch(
    two_nodes: TwoNodeCluster, project: Path, on_s3: list[str]
) -> None:
    settings = [*on_s3, *RUN]
    storage = load_params("params.yaml", settings).train.storage_path
    fs = fsspec.filesystem("s3")
    with open(project / "pretrain.log", "w") as log:
        started = time.monotonic()
        run = subprocess.Popen(
            [MOCOPIPE, "pretrain", *_sets(settings)],
            env=_env(two_nodes, project),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            while not fs.glob(f"{storage}/pretrain-*/{SNAPSHOT}"):
                assert run.poll() is None, (project / "pretrain.log").read_text()[-3000:]
                assert time.monotonic() - started < RUN_TIMEOUT_S, "no checkpoint on S3"
                time.sleep(0.5)
                fs.invalidate_cache()
            first_checkpoint = time.monotonic() - started
            two_nodes.kill_worker()
            killed = time.monotonic() - started
            two_nodes.start_worker()
            restarted = time.monotonic() - started
            assert run.wait(RUN_TIMEOUT_S) == 0, (project / "pretrain.log").read_text()[-3000:]
        finally:
            if run.poll() is None:
                run.kill()
                run.wait(30)
    finished = time.monotonic() - started
    print(
        f"node-kill timeline: first S3 checkpoint {first_checkpoint:.1f} s, node killed "
        f"{killed:.1f} s, node back {restarted:.1f} s, run finished {finished:.1f} s"
    )

    run_id = json.loads(fs.cat(f"{storage}/latest-pretrain.json"))["run_id"]
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"
    resumed = client.get_metric_history(run_id, "resumed_at_step")
    params = load_params("params.yaml", settings)
    steps = plan(params).steps_per_epoch
    assert len(resumed) == 1 and 0 < resumed[0].value < steps
    speed = client.get_metric_history(run_id, "images_per_s")
    print(f"2-node run: {speed[-1].value:.0f} images/s, resumed at step {resumed[0].value:g}")
    fs.invalidate_cache()
    kept = sorted(fs.glob(f"{storage}/pretrain-{run_id}/checkpoint_*/{STATE_FILE}"))[-2:]
    states = []
    for path in kept:  # the last two checkpoints, 8 steps apart, both after the resume
        with fs.open(path, "rb") as stream:
            states.append(torch.load(stream, weights_only=True))
    assert [(s["epoch"], s["step"]) for s in states] == [(0, steps - 8), (0, steps)]
    # keys enqueued per step (from the last 8 steps): a queue restored from the checkpoint has
    # taken every step's keys of the epoch; a fresh one only those since the resume
    ptrs = [int(s["model"]["queue.ptr"]) for s in states]
    per_step = (ptrs[1] - ptrs[0]) % 1000 // 8
    assert ptrs[1] == steps * per_step % 1000


def _train_workers(cluster: TwoNodeCluster, env: dict[str, str]) -> list[dict]:
    """Every Ray Train worker actor the cluster has held (dead ones too), from its state API."""
    listed = subprocess.run(
        [
            *(RAY, "list", "actors", f"--address={cluster.dashboard}", "--format=json"),
            *("--detail", "--filter=class_name=RayTrainWorker", "--limit=1000"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    # with none, the CLI prints a sentence, not an empty list
    return [] if listed.stdout.startswith("No resource") else json.loads(listed.stdout)


def test_pretrain_as_a_ray_job(two_nodes: TwoNodeCluster, project: Path, on_s3: list[str]) -> None:
    settings = [*on_s3, "train.epochs=1"]
    env = _env(two_nodes, project)
    before = {actor["actor_id"] for actor in _train_workers(two_nodes, env)}
    tracking = env["MLFLOW_TRACKING_URI"]
    command = f"cd {project} && MLFLOW_TRACKING_URI={tracking} {MOCOPIPE} pretrain " + " ".join(
        _sets(settings)
    )
    started = time.monotonic()
    for _ in range(AGENT_TRIES):  # a node's job agent may still be starting (a restarted node)
        job = subprocess.run(
            [RAY, "job", "submit", f"--address={two_nodes.dashboard}", "--", "bash", "-c", command],
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            check=False,
        )
        if "No available agent" not in job.stderr:
            break
        time.sleep(5)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-2000:]
    assert "succeeded" in job.stdout
    storage = load_params("params.yaml", settings).train.storage_path
    run_id = json.loads(fsspec.filesystem("s3").cat(f"{storage}/latest-pretrain.json"))["run_id"]
    client = MlflowClient(tracking)
    speed = client.get_metric_history(run_id, "images_per_s")[-1].value
    print(f"Ray Job on 2 nodes: {time.monotonic() - started:.0f} s, {speed:.0f} images/s")
    # Ray's own record of where the job's training workers ran: one on each node
    workers = {a["actor_id"]: a["node_id"] for a in _train_workers(two_nodes, env)}
    placed = [node for actor, node in workers.items() if actor not in before]
    assert len(placed) == 2 and len(set(placed)) == 2, placed
    token = Path(two_nodes.env["RAY_AUTH_TOKEN_PATH"]).read_text()
    assert token not in job.stdout + job.stderr


def test_a_two_trial_sweep_with_its_storage_on_s3(
    two_nodes: TwoNodeCluster, project: Path, on_s3: list[str], s3_bucket: str
) -> None:
    tune_storage = f"{s3_bucket}/tune"
    settings = [
        on_s3[0],
        f"tune.storage_path={tune_storage}",
        "tune.name=tiny",
        "tune.num_samples=2",
        "tune.epochs=1",
        # two DDP workers per trial on 1-CPU nodes: each trial spans both nodes
        "tune.workers_per_trial=2",
        "tune.space.method.queue_size={type: choice, values: [256, 512]}",
    ]
    env = _env(two_nodes, project)
    before = {actor["actor_id"] for actor in _train_workers(two_nodes, env)}
    fs = fsspec.filesystem("s3")
    started = time.monotonic()
    passes = []
    for extra in ([], ["--resume"]):  # the resume finds the finished sweep in the bucket
        sweep = subprocess.run(
            [MOCOPIPE, "tune", *_sets(settings), *extra],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            check=False,
        )
        assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
        fs.invalidate_cache()
        parent = re.search(r"MLflow parent run (\w+)", sweep.stdout)
        assert parent, sweep.stdout[-3000:]
        trials = fs.cat(f"{tune_storage}/tiny/trials.csv").decode()
        passes.append((parent.group(1), list(csv.DictReader(io.StringIO(trials)))))
    print(f"2-trial sweep on 2 nodes + resume: {time.monotonic() - started:.0f} s")

    (parent, rows), (resumed_parent, resumed_rows) = passes
    # Ray's record of the trials' workers: each trial's placement group held two workers, one
    # on each node (and the resumed pass started none)
    trials: dict[str, list[str]] = {}
    for actor in _train_workers(two_nodes, env):
        if actor["actor_id"] not in before:
            trials.setdefault(actor["placement_group_id"], []).append(actor["node_id"])
    assert len(trials) == 2, trials
    assert all(len(nodes) == 2 and len(set(nodes)) == 2 for nodes in trials.values()), trials
    assert len(rows) == 2 and all(row["stop_reason"] for row in rows)
    # restored, not run again: the same parent run and the same trials (a new sweep would have
    # new trial ids) and no third child run
    assert resumed_parent == parent
    assert sorted(r["trial_id"] for r in resumed_rows) == sorted(r["trial_id"] for r in rows)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_run(parent).info.experiment_id
    children = client.search_runs(
        [experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert len(children) == 2
    assert fs.glob(f"{tune_storage}/tiny/train/trial-*/checkpoint_*")
    assert json.loads(fs.cat(f"{tune_storage}/latest-sweep.json"))["name"] == "tiny"
    assert (project / "tune" / "best.yaml").exists()
