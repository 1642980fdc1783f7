"""LARS (You, Gitman, Ginsburg 2017) as MoCo v3 trains ResNets with it (moco-v3's optimizer.py).

Large batches need large learning rates, which blow up layers whose gradients are large relative to
their weights. LARS rescales each weight tensor's step by the trust ratio
eta * ||w|| / ||g + wd * w||, so every layer moves by about the same fraction of its norm.
Biases and normalisation parameters (1-D tensors) get neither the rescaling nor weight decay:
they are few, and shrinking a BN scale towards 0 only hurts.
"""

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn


def lars_param_groups(params: Iterable[nn.Parameter]) -> list[dict[str, Any]]:
    """Split into weights (ndim > 1: adapted, decayed) and biases/norm parameters (ndim <= 1:
    plain SGD-momentum, no weight decay), moco-v3's rule; empty groups are left out."""
    params = list(params)
    groups = [
        {"params": [p for p in params if p.ndim > 1]},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars": False},
    ]
    return [g for g in groups if g["params"]]


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose per-tensor update is d = g + wd * w, scaled by the trust ratio
    eta * ||w|| / ||d|| in groups with lars=True (1 when either norm is 0); then
    mu <- momentum * mu + d and w <- w - lr * mu. Use lars_param_groups(...) for the paper's
    exclusion of biases and norm parameters."""

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "trust_coefficient": trust_coefficient,
            "lars": True,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=group["weight_decay"])
                if group["lars"]:
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = group["trust_coefficient"] * w_norm / d_norm
                    d = d.mul(torch.where((w_norm > 0) & (d_norm > 0), trust, 1.0))
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(d)
                p.add_(state["mu"], alpha=-group["lr"])
        return loss
