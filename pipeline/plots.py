"""Plots a person would rather look at than read: training curves from the MLflow run."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: stages run on servers and in Ray workers
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient


def plot_training_curves(run_id: str, metrics: tuple[str, ...] = ("loss", "knn_top1")) -> Figure:
    """One panel per metric, per epoch, as logged by the pretrain stage."""
    client = MlflowClient()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5))
    for ax, name in zip(axes, metrics, strict=True):
        history = sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)
        ax.plot([m.step + 1 for m in history], [m.value for m in history], marker="o")
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
