"""What Ray Train's controller runs for us: the per-epoch callbacks (a progress line, MLflow
metrics, Tune's report). The controller is a fresh process that imports this module to unpickle
them: kept free of the training code (moco, torchvision, the data path; torch itself comes with
Ray's TorchConfig), it starts ~1.5 s sooner than when they lived in pipeline.pretrain."""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from ray.train import UserCallback
from ray.tune.integration.ray_train import TuneReportCallback

STEP_KEY = "step_in_epoch"  # only in a mid-epoch report: a checkpoint, not an epoch's metrics
COUNTERS = ("epoch", "epochs_done")  # in each report, but the MLflow step, not metrics


def is_mid_epoch(row: dict[str, Any]) -> bool:
    """A report row written for a mid-epoch checkpoint (the driver logs epochs only)."""
    return STEP_KEY in row


class EpochReporter(UserCallback):
    """One progress line and MLflow metrics per epoch."""

    def __init__(self, tracking: str, run_id: str, epochs: int, label: str = "pretrain") -> None:
        self.tracking, self.run_id, self.epochs, self.label = tracking, run_id, epochs, label

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        row = metrics[0]  # rank 0 holds the kNN monitor
        if is_mid_epoch(row):  # a checkpoint inside the epoch: no metrics yet
            return
        epoch = int(row["epoch"])
        values = {k: float(v) for k, v in row.items() if k not in COUNTERS}
        MlflowClient(self.tracking).log_batch(
            self.run_id,
            metrics=[mlflow.entities.Metric(k, v, 0, epoch) for k, v in values.items()],
        )
        shown = "  ".join(f"{k} {v:.4g}" for k, v in values.items())
        print(f"[{self.label}] epoch {epoch + 1}/{self.epochs}  {shown}", flush=True)


class EpochTuneReport(TuneReportCallback):
    """Tune hears epochs only: a mid-epoch checkpoint's row has no metric for ASHA (the trial's
    Ray Train run still resumes from that checkpoint)."""

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not is_mid_epoch(metrics[0]):
            super().after_report(run_context, metrics, checkpoint)
