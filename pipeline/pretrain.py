"""The pretrain stage: MoCo on Ray Train, tracked in one MLflow run.

The driver checks that the run can work, starts Ray Train workers (pipeline/train_worker.py),
turns each epoch's report into MLflow metrics and a progress line, and logs the final encoder.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
    UserCallback,
)
from ray.train.torch import TorchConfig, TorchTrainer

from pipeline.config import Params, with_overrides
from pipeline.dataset import data_version, read_manifest, shard_urls, steps_per_epoch
from pipeline.encoder import (
    RUN_FILE,
    SPEC_FILE,
    WEIGHTS_FILE,
    EncoderSpec,
    check_warm_start,
    read_spec,
)
from pipeline.epoch_reports import COUNTERS, EpochReporter
from pipeline.errors import StageError
from pipeline.plots import CURVE_FILE, plot_training_curves, write_training_curve
from pipeline.preflight import check_endpoints
from pipeline.ray_cluster import check_resources, ensure_ray
from pipeline.registry import TRAIN_SAMPLES_TAG
from pipeline.storage import join, read_text, resolved, write_text
from pipeline.tracking import (
    end_run_failed,
    git_commit,
    log_dataset,
    log_encoder,
    model_version_of,
    setup_mlflow,
    tracking_uri,
)
from pipeline.train_worker import WorkerConfig, train_loop

LATEST_RUN_FILE = "latest-pretrain.json"  # under train.storage_path: what --resume continues
SYSTEM_PREFIX = "system/"  # MLflow system metrics (the nodes' utilisation), not results


@dataclass
class PretrainResult:
    run_id: str
    model_uri: str  # runs:/<run_id>/encoder, the MLflow model
    encoder_dir: str  # local copy of the final encoder (safetensors + spec)
    metrics: dict[str, float]
    data_version: str

    def render(self) -> str:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in self.metrics.items() if k not in COUNTERS)
        return f"pretrain: run {self.run_id} ({shown})\n  model: {self.model_uri}"


def plan(params: Params) -> WorkerConfig:
    """Resolve the data layout and refuse impossible configs before Ray starts."""
    shards = params.data.shards_dir
    t = params.train
    try:
        train_urls = shard_urls(shards, "train")
    except FileNotFoundError:
        raise ValueError(f"{shards}/train: no shard manifest; run `mocopipe shard` first") from None
    steps = steps_per_epoch(
        shards,
        "train",
        world_size=t.num_workers,
        loader_workers=t.loader_workers,
        batch_size=t.batch_size,
    )
    if steps < 1:
        samples = read_manifest(shards, "train")["samples"]
        raise ValueError(
            f"train.batch_size x train.num_workers = {t.global_batch} is more than each worker "
            f"can read from {samples} training images; lower train.batch_size"
        )
    labelled = _labelled_splits(shards)
    monitor = params.eval.monitor_bank > 0 and {"train", "test"} <= labelled
    init_from = _warm_start_location(t.init_from, tracking_uri(params))
    if init_from:  # refused here, before any worker starts
        found = read_spec(init_from, tracking_uri(params))
        check_warm_start(EncoderSpec.from_params(params), found, t.init_from)
    return WorkerConfig(
        params=params.model_dump() | {"train": t.model_dump() | {"init_from": init_from}},
        train_urls=train_urls,
        monitor_bank_urls=train_urls if monitor else [],
        monitor_query_urls=shard_urls(shards, "test") if monitor else [],
        num_classes=len(read_manifest(shards, "train").get("classes") or []),
        steps_per_epoch=steps,
    )


def _warm_start_location(location: str, tracking: str) -> str:
    """An absolute folder (workers run elsewhere) or an MLflow URI that resolves, checked now."""
    if not location or location.startswith("runs:/"):
        return location
    if location.startswith("models:/"):
        if _registered_version(location, tracking) is None:
            raise ValueError(
                f"train.init_from: {location} is not in the registry; promote a model first "
                "or pass an encoder folder"
            )
        return location
    folder = Path(location).resolve()
    if not (folder / WEIGHTS_FILE).exists():
        raise ValueError(
            f"train.init_from: {folder} holds no {WEIGHTS_FILE}; pass a folder written by "
            "pretrain (models/encoder) or an MLflow model URI"
        )
    return str(folder)


def _registered_version(location: str, tracking: str):
    """The registry version behind models:/..., or None when the model or alias does not
    exist; a store that cannot be reached or read still raises."""
    try:
        return model_version_of(location, MlflowClient(tracking))
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def warm_start_or_scratch(params: Params) -> tuple[Params, str]:
    """For scheduled retraining: warm-start from the configured registry model when it exists,
    else train from scratch (the first run has no production model yet). Returns the params
    to use and a line saying which."""
    location = params.train.init_from
    if not location.startswith("models:/"):
        return params, f"init: {location or 'from scratch'}"
    check_endpoints(params)  # the flow asks the registry first: an unreachable one is refused now
    version = _registered_version(location, tracking_uri(params))
    if version is None:
        return with_overrides(params, {"train.init_from": ""}, keep_space=True), (
            f"init: from scratch ({location} does not exist yet)"
        )
    return params, f"init: warm start from {location} (version {version.version})"


def _labelled_splits(shards_dir: str) -> set[str]:
    splits = set()
    for split in ("train", "test"):
        try:
            if read_manifest(shards_dir, split).get("classes"):
                splits.add(split)
        except FileNotFoundError:
            continue
    return splits


def pretrain(
    params: Params, *, resume: bool = False, address: str | None = None, run_name: str = ""
) -> PretrainResult:
    """Train MoCo on the train shards; returns the MLflow run and the exported encoder.
    `run_name` names the MLflow run (default pretrain-<data version>; a flow passes its own).

    A lost worker is survived `train.max_failures` times, from the last checkpoint."""
    check_endpoints(params)  # and ensure_ray checks the Ray address, before Ray starts
    worker_config = plan(params)
    t = params.train
    with ThreadPoolExecutor(1) as pool:  # a fresh MLflow store's set-up overlaps Ray's start
        experiment = pool.submit(setup_mlflow, params)
        check_resources(ensure_ray(address), t.num_workers, t.cpus_per_worker, t.use_gpu)
        experiment_id = experiment.result()
    storage = resolved(t.storage_path)  # a local folder or s3://... (every node reaches it)
    latest = join(storage, LATEST_RUN_FILE)

    version = data_version(params.data.shards_dir)
    if resume:
        if (record := read_text(latest)) is None:
            raise ValueError(f"{latest}: no earlier pretraining to resume; run without --resume")
        run_id = json.loads(record)["run_id"]
        mlflow.start_run(run_id=run_id)
    else:
        mlflow.start_run(experiment_id=experiment_id, run_name=run_name or f"pretrain-{version}")
        mlflow.log_params(params.to_flat_dict())
        mlflow.set_tags(
            {
                "git_commit": git_commit(),
                "data_version": version,
                TRAIN_SAMPLES_TAG: read_manifest(params.data.shards_dir, "train")["samples"],
                "ray_workers": t.num_workers,
                "stage": "pretrain",
                "method": params.method.name,
                "mlflow.note.content": f"{params.method.name} pretraining on data {version} "
                f"(init: {t.init_from or 'from scratch'})",
            }
        )
        log_dataset(params.data.shards_dir, "train-stream", version, "training")
        run_id = mlflow.active_run().info.run_id
        write_text(latest, json.dumps({"run_id": run_id}))
    worker_config.run_id = run_id
    try:
        reporter = EpochReporter(tracking_uri(params), run_id, t.epochs)
        trainer = build_trainer(
            params,
            worker_config,
            name=f"pretrain-{run_id}",
            storage=storage,
            callbacks=[reporter],
        )
        result = fit(trainer)
        encoder_dir = _export(result.checkpoint, Path(t.output_dir))
        model_uri = log_encoder(encoder_dir)
        (encoder_dir / RUN_FILE).write_text(
            json.dumps({"run_id": run_id, "model_uri": model_uri, "data_version": version})
        )
        logged = MlflowClient().get_run(run_id).data.metrics
        final_metrics = {k: v for k, v in logged.items() if not k.startswith(SYSTEM_PREFIX)}
        write_training_curve(run_id, encoder_dir / CURVE_FILE)
        mlflow.log_figure(plot_training_curves(run_id), "training_curves.png")
    except BaseException as error:
        end_run_failed(error)
        raise
    mlflow.end_run()
    return PretrainResult(run_id, model_uri, str(encoder_dir), final_metrics, version)


def _export(checkpoint, output_dir: Path) -> Path:
    """Copy the encoder out of the final checkpoint (retention may delete the checkpoint)."""
    shutil.rmtree(output_dir, ignore_errors=True)
    output_dir.mkdir(parents=True)
    with checkpoint.as_directory() as directory:
        for name in (WEIGHTS_FILE, SPEC_FILE):
            shutil.copy2(Path(directory) / name, output_dir / name)
    return output_dir


def build_trainer(
    params: Params,
    worker_config: WorkerConfig,
    *,
    name: str,
    storage: str,
    callbacks: list[UserCallback],
) -> TorchTrainer:
    """A TorchTrainer for `params.train`'s workers: gloo on CPUs, NCCL on GPUs. `storage` is
    an absolute folder or an s3:// URL (pyarrow's S3 client, configured by each node's AWS_*
    environment: the credentials never travel in the job's runtime environment)."""
    t = params.train
    return TorchTrainer(
        train_loop,
        train_loop_config=asdict(worker_config),
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker} | ({"GPU": 1} if t.use_gpu else {}),
        ),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # a worker group that cannot start (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S) fails
            # the run after one more try instead of retrying forever
            failure_config=FailureConfig(max_failures=t.max_failures, controller_failure_limit=1),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri(params)}},
        ),
    )


def fit(trainer: TorchTrainer):
    """Run the trainer; a failure becomes one StageError line naming the failing rank."""
    try:
        result = trainer.fit()
    except TrainingFailedError as error:
        raise StageError(f"pretrain failed: {_root_cause(error)}") from error
    if result.error is not None:
        raise StageError(f"pretrain failed: {_root_cause(result.error)}") from result.error
    return result


def _root_cause(error: BaseException) -> str:
    """The first failing worker's own exception, in one line (not Ray's whole report)."""
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        rank = min(failures)
        error = getattr(failures[rank], "cause", None) or failures[rank]
        return f"rank {rank}: {type(error).__name__}: {str(error).strip().splitlines()[-1]}"
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
