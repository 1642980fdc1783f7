"""Corruptions and attacks against answers that can be computed: eps 0 and severity 0 are clean,
PGD <= FGSM <= clean, and on a linear classifier the exact L_inf robust accuracy."""

from __future__ import annotations

import pytest
import torch
from evaluation_helpers import TINY_SPEC
from torch import nn

from pipeline.evaluation.features import feature_net
from pipeline.evaluation.probes import fit_probe, top1
from pipeline.evaluation.robustness import attack_accuracy, corrupt, robustness_metrics


def linear_model(classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, classes)).eval()


def interior_images(n: int, seed: int) -> torch.Tensor:
    """Pixels in [0.3, 0.7]: an eps <= 0.1 ball never meets the [0, 1] box, so the unclipped
    closed form below is the exact robust accuracy."""
    g = torch.Generator().manual_seed(seed)
    return 0.3 + 0.4 * torch.rand(n, 1, 8, 8, generator=g)


def exact_linear_robust_accuracy(model: nn.Module, x: torch.Tensor, eps: float) -> float:
    """x is robust iff for every other class j: (w_y - w_j).x + b_y - b_j > eps ||w_y - w_j||_1."""
    linear = model[1]
    w, b = linear.weight.detach(), linear.bias.detach()
    flat = x.flatten(1)
    y = (flat @ w.T + b).argmax(1)  # labels = clean predictions: clean accuracy is 1
    margins = (flat @ w.T + b).gather(1, y[:, None]) - (flat @ w.T + b)  # [N, C]
    l1 = (w[y][:, None, :] - w[None, :, :]).abs().sum(-1)  # [N, C]
    others = torch.ones_like(margins, dtype=torch.bool).scatter_(1, y[:, None], False)
    robust = ((margins - eps * l1 > 0) | ~others).all(1)
    return int(robust.sum()) / len(robust)  # a count / n, as attack_accuracy computes it


def predicted_labels(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


@pytest.mark.parametrize("eps", [0.01, 0.03, 0.1])
def test_binary_linear_fgsm_and_pgd_are_exact(eps: float) -> None:
    model, x = linear_model(2, 0), interior_images(2000, 0)
    result = attack_accuracy(model, x, predicted_labels(model, x), eps, pgd_steps=5)
    exact = exact_linear_robust_accuracy(model, x, eps)
    assert result.clean == 1.0
    assert 0.0 < exact < 1.0  # the radius matters: a real test, not 1 == 1
    assert result.fgsm == pytest.approx(exact, abs=1e-9)
    assert result.pgd == pytest.approx(exact, abs=1e-9)


@pytest.mark.parametrize("eps", [0.02, 0.05])
def test_multiclass_linear_attacks_are_bounded_by_the_exact_answer(eps: float) -> None:
    model, x = linear_model(5, 1), interior_images(1000, 1)
    result = attack_accuracy(model, x, predicted_labels(model, x), eps, pgd_steps=10)
    exact = exact_linear_robust_accuracy(model, x, eps)
    # Cross-entropy attacks only upper-bound it: with several classes the loss's ascent
    # direction is not the one toward the nearest decision boundary.
    assert exact <= result.pgd <= result.fgsm <= result.clean


def test_eps_zero_is_clean_and_attacks_order_on_a_network() -> None:
    torch.manual_seed(0)
    encoder, _ = TINY_SPEC.build()
    images = torch.rand(96, 1, 16, 16)
    labels = torch.arange(96) % 3
    net = feature_net(encoder.eval())
    with torch.no_grad():
        features = net(images)
    model = nn.Sequential(net, fit_probe(features, labels, 3)).eval()
    clean = top1(model, images, labels)
    zero = attack_accuracy(model, images, labels, 0.0, pgd_steps=3)
    assert zero.clean == zero.fgsm == zero.pgd == pytest.approx(clean)
    previous = zero
    for eps in (0.01, 0.05, 0.2):
        result = attack_accuracy(model, images, labels, eps, pgd_steps=3)
        assert result.pgd <= result.fgsm <= result.clean == pytest.approx(clean)
        assert result.pgd <= previous.pgd + 1e-9  # a larger ball starts from a worse point
        previous = result


@pytest.mark.parametrize("name", ["gaussian_noise", "gaussian_blur", "contrast"])
def test_corruptions(name: str) -> None:
    images = 0.3 + 0.4 * torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    assert corrupt(images, name, 0) is images
    light, heavy = corrupt(images, name, 1, seed=0), corrupt(images, name, 5, seed=0)
    assert torch.equal(light, corrupt(images, name, 1, seed=0))  # every model sees the same
    assert light.shape == images.shape and float(heavy.min()) >= 0 and float(heavy.max()) <= 1
    assert (heavy - images).abs().mean() > (light - images).abs().mean() > 0


def test_severity_zero_equals_clean_and_mean_is_the_mean() -> None:
    model, x = linear_model(3, 2), interior_images(200, 3)
    y = torch.arange(200) % 3
    metrics = robustness_metrics(
        model,
        x,
        y,
        corruptions=["gaussian_noise", "contrast"],
        severities=[1, 2],
        eps=[0.02],
        pgd_steps=2,
        seed=0,
    )
    clean = top1(model, x, y)
    assert metrics["robust_clean_top1"] == clean
    zero = robustness_metrics(
        model, x, y, corruptions=["contrast"], severities=[], eps=[], pgd_steps=1, seed=0
    )
    assert zero == {"robust_clean_top1": clean}
    levels = [
        metrics[f"corruption_{n}_s{s}_top1"] for n in ("gaussian_noise", "contrast") for s in (1, 2)
    ]
    assert metrics["corruption_mean_top1"] == pytest.approx(sum(levels) / 4)
    assert metrics["pgd_eps0.02_top1"] <= metrics["fgsm_eps0.02_top1"] <= clean
