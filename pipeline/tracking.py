"""MLflow wiring: where the store is, which experiment, and how an encoder is logged.

The embedded default is SQLite in the project folder; `MLFLOW_TRACKING_URI` points every stage
(and the Ray workers) at a server instead, with no code change.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import warnings
from importlib import metadata
from pathlib import Path

import mlflow
import torch
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from pipeline.config import Params
from pipeline.encoder import RUN_FILE, load_encoder
from pipeline.errors import StageError

# What loading a logged encoder needs: the pt2 graph (torch, numpy for the signature) and the
# safetensors + spec that load_encoder reads (torchvision builds the ResNets).
MODEL_REQUIREMENTS = ("mlflow", "torch", "torchvision", "safetensors", "numpy")
EVAL_PREFIX = "eval_"  # the evaluate stage's metrics on a model's run: eval_knn_top1, ...


def tracking_uri(params: Params) -> str:
    """The environment wins; a relative sqlite path is made absolute (Ray workers run elsewhere)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri.removeprefix(prefix)).resolve())
    return uri


def setup_mlflow(params: Params) -> str:
    """Point MLflow at the store and return the experiment id, creating it with an explicit
    artifact location (else artifacts land in ./mlruns of whatever folder we run from)."""
    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    name = params.tracking.experiment
    try:
        experiment = mlflow.get_experiment_by_name(name)
    except MlflowException as error:
        first = str(error).strip().splitlines()[0][:300]
        raise StageError(
            f"MLflow tracking store {uri} is unreachable ({first}); start the server or fix "
            "MLFLOW_TRACKING_URI / tracking.uri"
        ) from error
    if experiment is not None:
        return experiment.experiment_id
    if uri.startswith(("http://", "https://", "databricks")):
        return mlflow.create_experiment(name)  # the server decides (its artifact store)
    location = params.tracking.artifact_location
    if "://" not in location:
        location = Path(location).resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def end_run_failed(error: BaseException) -> None:
    """End the active run as FAILED with the reason as a tag (a failed run is never a model)."""
    mlflow.set_tag("failure", f"{type(error).__name__}: {error}"[:5000])
    mlflow.end_run(status="FAILED")


def log_eval_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float]) -> None:
    """The evaluation's numbers on the model's run, under EVAL_PREFIX (training curves keep
    the bare names)."""
    now = int(time.time() * 1000)
    rows = [Metric(f"{EVAL_PREFIX}{k}", float(v), now, 0) for k, v in metrics.items()]
    for start in range(0, len(rows), 500):  # log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=rows[start : start + 500])


def log_dataset(location: str, name: str, digest: str, context: str) -> None:
    """Record data on the active run as an MLflow dataset input (what the UI shows under
    "Datasets"): `location` as its source (a local folder or s3://...), the data version as
    its digest, `context` training or evaluation."""
    source = location if "://" in location else str(Path(location).resolve())
    with warnings.catch_warnings():  # a folder is not a file format MLflow knows: it warns
        warnings.simplefilter("ignore")
        dataset = MetaDataset(resolve_dataset_source(source), name=name, digest=digest)
    mlflow.log_input(dataset, context=context)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def log_encoder(encoder_dir: Path, name: str = "encoder") -> str:
    """Log the encoder to the active run as an MLflow PyTorch model; returns its model URI.

    Format 'pt2' (torch.export) loads with `mlflow.pytorch.load_model` as a graph module and is
    not a pickle; the safetensors weights + spec ride along as extra files, and our own
    `load_encoder` reads only those, so loading never executes stored code. The requirements
    are the loaders' own packages at their installed versions: MLflow's inference re-imports
    the model in a subprocess, 10 of the 12 s this call took.
    """
    encoder, spec = load_encoder(encoder_dir)
    example = spec.example_input(batch=2)
    with torch.no_grad():
        signature = infer_signature(example.numpy(), encoder(example).numpy())
    info = mlflow.pytorch.log_model(
        encoder,
        name=name,
        serialization_format="pt2",
        input_example=example.numpy(),
        signature=signature,
        pip_requirements=pinned(MODEL_REQUIREMENTS),
        extra_files=[str(encoder_dir / f) for f in ("encoder.safetensors", "encoder.json")],
    )
    return info.model_uri


def pinned(packages: tuple[str, ...]) -> list[str]:
    """`name==version` of each installed package (what serving the model needs)."""
    return [f"{name}=={metadata.version(name)}" for name in packages]


def model_version_of(uri: str, client: MlflowClient | None = None):
    """The registry entry behind models:/<name>@<alias> or models:/<name>/<version>."""
    name, _, ref = uri.removeprefix("models:/").partition("@")
    client = client or MlflowClient()
    if ref:
        return client.get_model_version_by_alias(name, ref)
    name, _, version = name.partition("/")
    return client.get_model_version(name, version)


def run_id_of(location: str) -> str | None:
    """The MLflow run that produced a model location, when it has one."""
    if location.startswith("runs:/"):
        return location.removeprefix("runs:/").split("/")[0]
    if location.startswith("models:/"):
        return model_version_of(location).run_id
    return exported_run(location).get("run_id")


def exported_run(folder: str | Path) -> dict[str, str]:
    """run.json beside an encoder exported by pretrain ({} when the folder has none)."""
    path = Path(folder) / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else {}
