"""Learning-rate multipliers for torch.optim.lr_scheduler.LambdaLR (multiply the base lr)."""

import math
from collections.abc import Sequence


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Linear warm-up to 1 over `warmup_steps`, then half-cosine decay to 0 at `total_steps`
    (MoCo v2's cosine schedule; warm-up keeps large-batch early steps stable)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def step_schedule(epoch: int, milestones: Sequence[int], gamma: float = 0.1) -> float:
    """MoCo v1's step schedule: x gamma at each milestone passed (paper: 120 and 160 of 200)."""
    return gamma ** sum(epoch >= m for m in milestones)
