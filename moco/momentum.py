"""The momentum (EMA) update that makes the key encoder a slowly moving query encoder."""

import math
from collections.abc import Sequence

import torch
from torch import Tensor


@torch.no_grad()
def momentum_update(key_params: Sequence[Tensor], query_params: Sequence[Tensor], m: float) -> None:
    """theta_k <- m * theta_k + (1 - m) * theta_q, as one fused foreach op over all parameters."""
    key, query = list(key_params), list(query_params)
    if len(key) != len(query):
        raise ValueError(f"{len(key)} key parameters but {len(query)} query parameters")
    torch._foreach_lerp_(key, query, 1.0 - m)


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """BYOL's schedule: momentum rises from `base` at step 0 to 1 at `total_steps`."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / total_steps) + 1.0) / 2.0
