"""Plots a person would rather look at than read: training curves from the MLflow run."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: stages run on servers and in Ray workers
import csv
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

CURVE_FILE = "training_curve.csv"  # beside the exported encoder; dvc.yaml's `plots:` reads it


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


def write_training_curve(
    run_id: str, path: Path, metrics: tuple[str, ...] = ("loss", "knn_top1")
) -> Path:
    """The per-epoch metrics of the run as a CSV (epoch, then one column per metric it
    logged), the series `dvc plots show` draws."""
    client = MlflowClient()
    by_epoch: dict[int, dict[str, float]] = {}
    histories = {name: client.get_metric_history(run_id, name) for name in metrics}
    found = [name for name, history in histories.items() if history]
    for name in found:
        for m in histories[name]:
            by_epoch.setdefault(m.step + 1, {})[name] = m.value
    with path.open("w", newline="") as sink:
        writer = csv.DictWriter(sink, fieldnames=["epoch", *found])
        writer.writeheader()
        writer.writerows({"epoch": epoch, **row} for epoch, row in sorted(by_epoch.items()))
    return path


def plot_parallel_coordinates(
    trials: list[dict], keys: list[str], metric: str, log_keys: list[str]
) -> Figure:
    """A sweep at a glance: one line per trial across the swept settings and the metric,
    coloured by the metric; dashed lines are trials ASHA stopped early. A None value (a key
    of another method than the trial's) leaves a gap in that trial's line."""
    import numpy as np

    axes_keys = [*keys, metric]
    columns, labels = [], []
    for key in axes_keys:
        raw = [t[key] for t in trials]
        present = [v for v in raw if v is not None]  # None: not a setting of the trial's method
        numeric = all(isinstance(v, int | float) for v in present)
        categories = sorted(set(map(str, present)))  # e.g. method.name: mocov2 | mocov3
        values = np.array(
            [
                np.nan if v is None else float(v) if numeric else categories.index(str(v))
                for v in raw
            ]
        )
        labels.append(
            (f"{max(present):.3g}", f"{min(present):.3g}")
            if numeric
            else (categories[-1], categories[0])
        )
        if numeric and key in log_keys:
            values = np.log10(values)
        low, high = np.nanmin(values), np.nanmax(values)
        columns.append((values - low) / (high - low) if high > low else np.full_like(values, 0.5))
    scores = np.array([float(t[metric]) for t in trials])
    colours = plt.cm.viridis((scores - scores.min()) / (np.ptp(scores) or 1.0))
    fig, ax = plt.subplots(figsize=(1.8 * len(axes_keys) + 2, 4))
    xs = np.arange(len(axes_keys))
    for i, trial in enumerate(trials):
        style = "--" if trial.get("stop_reason") == "early_stopped" else "-"
        ax.plot(xs, [c[i] for c in columns], style, color=colours[i], alpha=0.85, marker="o")
    for x, (top, bottom) in zip(xs, labels, strict=True):
        ax.axvline(x, color="grey", lw=0.8)
        ax.annotate(top, (x, 1.02), ha="center", fontsize=8)
        ax.annotate(bottom, (x, -0.08), ha="center", fontsize=8)
    ax.set_xticks(xs, [f"{k}{' (log)' if k in log_keys else ''}" for k in axes_keys], fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.12, 1.08)
    ax.set_title(f"{len(trials)} trials, coloured by {metric} (dashed: stopped early by ASHA)")
    fig.tight_layout()
    return fig
