"""Accuracy of a whole classifier (feature network + probe, or the supervised baseline) under
common corruptions and L_inf attacks, on a fixed subset of the test split.

Corruptions follow CIFAR-10-C's five severities (Hendrycks & Dietterich 2019; 32 px, the closest
published scale to 28 px images), blur sigma scaled by image size / 32. Severity 0 is the clean
image. Gaussian noise is drawn from a seeded generator, so every model sees the same noise.

Attacks run in [0, 1] pixel space through the classifier end-to-end with autograd: FGSM
(Goodfellow et al. 2015), and PGD (Madry et al. 2018) started from the FGSM point, step
2.5 x eps / steps, projected onto the eps-ball and [0, 1]. Accuracy is worst case per image:
an image counts only if it is right clean, at the FGSM point and (for PGD) at every PGD iterate.
So adversarial accuracy <= clean by construction and PGD <= FGSM, and eps = 0 gives clean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from pipeline.evaluation import keys
from pipeline.evaluation.features import ticker
from pipeline.evaluation.probes import top1

# CIFAR-10-C, severities 1..5
GAUSSIAN_NOISE_STD = (0.04, 0.06, 0.08, 0.09, 0.10)
GAUSSIAN_BLUR_SIGMA_32PX = (0.4, 0.6, 0.7, 0.8, 1.0)
CONTRAST_FACTOR = (0.75, 0.5, 0.4, 0.3, 0.15)
CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "contrast")
PGD_STEP_SCALE = 2.5
BATCH = 250  # images per forward/backward: bounds activation memory of the attacks


def corrupt(images: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """A corrupted copy of float images [N, C, H, W] in [0, 1]; severity 0 returns them as is."""
    if severity == 0:
        return images
    level = severity - 1
    if name == "gaussian_noise":
        generator = torch.Generator().manual_seed(seed * 100 + severity)
        noise = torch.randn(images.shape, generator=generator) * GAUSSIAN_NOISE_STD[level]
        return (images + noise).clamp(0, 1)
    if name == "gaussian_blur":
        sigma = GAUSSIAN_BLUR_SIGMA_32PX[level] * images.shape[-1] / 32
        kernel = 2 * math.ceil(3 * sigma) + 1
        return TF.gaussian_blur(images, [kernel, kernel], [sigma, sigma])
    if name == "contrast":
        means = images.mean(dim=(1, 2, 3), keepdim=True)
        return ((images - means) * CONTRAST_FACTOR[level] + means).clamp(0, 1)
    raise ValueError(f"unknown corruption {name!r}; choose from {CORRUPTIONS}")


@dataclass(frozen=True)
class AttackAccuracy:
    clean: float
    fgsm: float
    pgd: float


def attack_accuracy(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    eps: float,
    pgd_steps: int,
    batch_size: int = BATCH,
) -> AttackAccuracy:
    """Clean, FGSM and PGD worst-case accuracy at L_inf radius `eps` (model in eval mode)."""
    model.eval()
    clean = fgsm = pgd = 0
    for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True):
        ok_clean, ok_fgsm, ok_pgd = _attack_batch(model, x, y, eps, pgd_steps)
        clean, fgsm, pgd = clean + ok_clean, fgsm + ok_fgsm, pgd + ok_pgd
    n = len(labels)
    return AttackAccuracy(clean / n, fgsm / n, pgd / n)


def _attack_batch(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int
) -> tuple[int, int, int]:
    logits, grad = _loss_gradient(model, x, y)
    right = logits.argmax(dim=1) == y
    clean = int(right.sum())
    point = (x + eps * grad.sign()).clamp(0, 1)  # FGSM
    step = PGD_STEP_SCALE * eps / steps
    fgsm = 0
    for iterate in range(steps + 1):
        if iterate < steps:
            logits, grad = _loss_gradient(model, point, y)
        else:
            with torch.no_grad():
                logits = model(point)
        right &= logits.argmax(dim=1) == y
        if iterate == 0:
            fgsm = int(right.sum())
        if iterate < steps:
            point = x + (point + step * grad.sign() - x).clamp(-eps, eps)
            point = point.clamp(0, 1)
    return clean, fgsm, int(right.sum())


def _loss_gradient(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Logits and d(cross-entropy)/d(input); parameter gradients are never computed."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x)
    return logits.detach(), grad


def robustness_metrics(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    corruptions: list[str],
    severities: list[int],
    eps: list[float],
    pgd_steps: int,
    seed: int,
    progress: Progress | None = None,
    what: str = "robustness",
) -> dict[str, float]:
    """Flat metrics: robust_clean_top1, corruption_<name>_s<k>_top1, corruption_mean_top1,
    fgsm_eps<e>_top1 and pgd_eps<e>_top1 on these (float, [0, 1]) images."""
    advance = ticker(progress, what, len(corruptions) * len(severities) + len(eps))
    metrics = {"robust_clean_top1": top1(model, images, labels, BATCH)}
    corrupted = []
    for name in corruptions:
        for severity in severities:
            key = keys.corruption(name, severity)
            metrics[key] = top1(model, corrupt(images, name, severity, seed), labels, BATCH)
            corrupted.append(metrics[key])
            advance()
    if corrupted:
        metrics["corruption_mean_top1"] = sum(corrupted) / len(corrupted)
    for radius in eps:
        result = attack_accuracy(model, images, labels, radius, pgd_steps)
        metrics[keys.attack("fgsm", radius)] = result.fgsm
        metrics[keys.attack("pgd", radius)] = result.pgd
        advance()
    return metrics
