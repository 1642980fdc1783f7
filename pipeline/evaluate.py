"""The evaluate stage: frozen-encoder metrics, each next to two references by the same protocol.

References: raw pixels and a randomly initialised encoder of the same shape. A random ResNet
already scores high kNN on Fashion-MNIST, so a number without them says little.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from pipeline.dataset import data_version, eval_loader, read_manifest, shard_urls
from rich.progress import Progress
from torch import Tensor, nn

from moco.augment import eval_transform
from moco.knn import extract_features, knn_accuracy
from pipeline.config import Params
from pipeline.encoder import EncoderSpec, load_encoder
from pipeline.tracking import run_id_of, setup_mlflow

REFERENCES = ("pixels", "random")


@dataclass
class EvalReport:
    model: str
    data_version: str
    metrics: dict[str, float] = field(default_factory=dict)

    def render(self) -> str:
        lines = [f"evaluate: {self.model} on data {self.data_version}"]
        for name, value in self.metrics.items():
            if not name.startswith(REFERENCES):
                refs = "  ".join(
                    f"{ref} {self.metrics[f'{ref}_{name}']:.4f}"
                    for ref in REFERENCES
                    if f"{ref}_{name}" in self.metrics
                )
                lines.append(f"  {name:<14} {value:.4f}   references: {refs}")
        return "\n".join(lines)


class Split:
    """A labelled split's batches, re-iterable, with a progress bar per pass."""

    def __init__(self, params: Params, name: str, spec: EncoderSpec) -> None:
        self.name = name
        self.urls = shard_urls(params.data.shards_dir, name)
        self.size = read_manifest(params.data.shards_dir, name)["samples"]
        self.transform = eval_transform(spec.image_size)
        self.batch_size = params.eval.batch_size

    def batches(self, progress: Progress, what: str):
        task = progress.add_task(f"{what}: {self.name}", total=self.size)
        for images, labels in eval_loader(
            self.urls, transform=self.transform, batch_size=self.batch_size
        ):
            yield images, labels
            progress.advance(task, len(labels))


def pixel_features(batches) -> tuple[Tensor, Tensor]:
    """Raw pixels, flattened and L2-normalised: the no-learning reference."""
    feats, labels = [], []
    for images, targets in batches:
        feats.append(F.normalize(images.flatten(1).float(), dim=1))
        labels.append(targets)
    return torch.cat(feats), torch.cat(labels)


def encoder_features(encoder: nn.Module, precision: str) -> Callable:
    def extract(batches) -> tuple[Tensor, Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return extract_features(encoder, batches)

    return extract


def evaluate(params: Params, model: str) -> EvalReport:
    """Score the encoder at `model` (folder, runs:/ or models:/ URI) on the labelled splits."""
    torch.set_num_threads(os.cpu_count() or 1)
    encoder, spec = load_encoder(model)
    torch.manual_seed(params.train.seed)
    random_encoder, _ = spec.build()
    train, test = (Split(params, name, spec) for name in ("train", "test"))
    num_classes = len(read_manifest(params.data.shards_dir, "train")["classes"])
    feature_fns = {
        "": encoder_features(encoder, params.train.precision),
        "pixels_": pixel_features,
        "random_": encoder_features(random_encoder.eval(), params.train.precision),
    }
    report = EvalReport(model=model, data_version=data_version(params.data.shards_dir))
    e = params.eval
    with Progress(transient=True) as progress:
        for prefix, features in feature_fns.items():
            what = f"features {prefix.rstrip('_') or 'encoder'}"
            bank, bank_labels = features(train.batches(progress, what))
            queries, labels = features(test.batches(progress, what))
            report.metrics[f"{prefix}knn_top1"] = knn_accuracy(
                bank, bank_labels, queries, labels, num_classes, e.knn_k, e.knn_t
            )
    _record(params, model, report)
    return report


def _record(params: Params, model: str, report: EvalReport) -> None:
    """metrics.json for DVC, and the same numbers on the model's MLflow run."""
    payload = {"data_version": report.data_version, **report.metrics}
    Path(params.eval.metrics_file).write_text(json.dumps(payload, indent=2) + "\n")
    setup_mlflow(params)
    run_id = run_id_of(model)
    if run_id is not None:
        client = MlflowClient()
        for name, value in report.metrics.items():
            client.log_metric(run_id, f"eval_{name}", value)
