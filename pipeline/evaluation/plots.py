"""The evaluation's figures (PNG), drawn from the flat metrics plus a few arrays.

Each function returns a matplotlib Figure; `write_plots` saves the set into one folder, which
DVC declares as plots and the evaluate stage logs to the model's MLflow run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: stages run on servers and in Ray workers
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from pipeline.evaluation import keys


@dataclass(frozen=True)
class PlotInputs:
    """What the figures need beyond the metrics: the encoder's test features and probe output."""

    features: Tensor  # encoder test features [N, D]
    labels: Tensor  # test labels [N]
    predictions: Tensor | None  # linear-probe predictions on the test split [N]
    classes: list[str]
    subjects: list[str]  # encoder, references and baseline present in the metrics


def plot_tsne(features: Tensor, labels: Tensor, classes: list[str], points: int, seed: int):
    """2-D t-SNE of a seeded, class-stratified-by-chance test subsample, coloured by class."""
    from sklearn.manifold import TSNE  # imported here: scikit-learn's import costs seconds

    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(labels), generator=generator)[:points]
    perplexity = min(30.0, max(2.0, (len(index) - 1) / 3))
    embedded = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        features[index].numpy()
    )
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    for cls, name in enumerate(classes):
        mask = (labels[index] == cls).numpy()
        ax.scatter(embedded[mask, 0], embedded[mask, 1], s=4, label=name)
    ax.legend(markerscale=3, fontsize=7, loc="best")
    ax.set_title(f"t-SNE of encoder features ({len(index)} test images)")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return fig


def plot_confusion(predictions: Tensor, labels: Tensor, classes: list[str]) -> Figure:
    """Row-normalised confusion matrix of the linear probe on the test split."""
    n = len(classes)
    counts = torch.zeros(n, n).index_put_(
        (labels, predictions), torch.ones(len(labels)), accumulate=True
    )
    rates = (counts / counts.sum(1, keepdim=True).clamp_min(1)).numpy()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=ax)
    ax.set_title("linear probe: confusion (rows sum to 1)")
    fig.tight_layout()
    return fig


def plot_fewshot(metrics: dict[str, float], subjects: list[str], names: list[str]) -> Figure:
    """Mean episode accuracy per few-shot setting and model, with 95% intervals."""
    subjects = _present(metrics, subjects, names[0])
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(1, len(subjects))
    for i, subject in enumerate(subjects):
        means = [metrics.get(keys.for_subject(subject, n), np.nan) for n in names]
        errors = [metrics.get(keys.for_subject(subject, f"{n}_ci95"), 0.0) for n in names]
        x = np.arange(len(names)) + (i - (len(subjects) - 1) / 2) * width
        ax.bar(x, means, width, yerr=errors, capsize=4, label=subject)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("few-shot (nearest prototype), 95% CI")
    fig.tight_layout()
    return fig


def plot_attacks(metrics: dict[str, float], subjects: list[str], eps: list[float]) -> Figure:
    """Accuracy against L_inf radius: FGSM dashed, PGD solid; eps 0 is clean accuracy."""
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [0.0, *eps]
    for i, subject in enumerate(_present(metrics, subjects, "robust_clean_top1")):
        clean = metrics[keys.for_subject(subject, "robust_clean_top1")]
        for kind, style in (("fgsm", "--"), ("pgd", "-")):
            ys = [clean] + [metrics[keys.for_subject(subject, keys.attack(kind, e))] for e in eps]
            ax.plot(xs, ys, style, color=f"C{i}", marker="o", label=f"{subject} {kind}")
    ax.set_xlabel("epsilon (L_inf, pixels in [0, 1])")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("adversarial accuracy")
    fig.tight_layout()
    return fig


def plot_corruptions(
    metrics: dict[str, float], subjects: list[str], names: list[str], severities: list[int]
) -> Figure:
    """Accuracy against severity, one panel per corruption; severity 0 is clean accuracy."""
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.5), squeeze=False)
    xs = [0, *severities]
    for ax, name in zip(axes[0], names, strict=True):
        for subject in _present(metrics, subjects, "robust_clean_top1"):
            ys = [metrics[keys.for_subject(subject, "robust_clean_top1")]] + [
                metrics[keys.for_subject(subject, keys.corruption(name, s))] for s in severities
            ]
            ax.plot(xs, ys, marker="o", label=subject)
        ax.set_title(name)
        ax.set_xlabel("severity")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _present(metrics: dict[str, float], subjects: list[str], key: str) -> list[str]:
    return [s for s in subjects if keys.for_subject(s, key) in metrics]


def write_plots(
    folder: str | Path,
    metrics: dict[str, float],
    inputs: PlotInputs,
    *,
    fewshot_names: list[str],
    eps: list[float],
    corruptions: list[str],
    severities: list[int],
    tsne_points: int,
    seed: int,
) -> list[Path]:
    """Every figure whose data exists, as PNG files in `folder` (emptied of old PNGs first,
    so a protocol turned off leaves no stale figure behind)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    figures: dict[str, Figure] = {}
    if tsne_points > 0:
        figures["tsne"] = plot_tsne(
            inputs.features, inputs.labels, inputs.classes, tsne_points, seed
        )
    if inputs.predictions is not None:
        figures["confusion"] = plot_confusion(inputs.predictions, inputs.labels, inputs.classes)
    if fewshot_names and _present(metrics, inputs.subjects, fewshot_names[0]):
        figures["fewshot"] = plot_fewshot(metrics, inputs.subjects, fewshot_names)
    if eps and _present(metrics, inputs.subjects, "robust_clean_top1"):
        figures["adversarial"] = plot_attacks(metrics, inputs.subjects, eps)
    if corruptions and severities and _present(metrics, inputs.subjects, "robust_clean_top1"):
        figures["corruptions"] = plot_corruptions(metrics, inputs.subjects, corruptions, severities)
    paths = []
    for name, figure in figures.items():
        path = folder / f"{name}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths
