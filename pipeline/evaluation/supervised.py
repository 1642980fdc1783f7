"""The supervised baseline: the same backbone, trained from scratch on the labels, on a budget.

What it answers: is the self-supervised encoder + a linear probe better or worse than simply
training the same network on the (possibly noisy) labels? It is the reference for the
label-noise and robustness protocols, where "pixels" and "random init" say little.
Budget: a fixed number of Adam steps (cosine-decayed) on random batches of the train split,
no augmentation; at the default 100 x 64 images that is about a ninth of an epoch of
Fashion-MNIST: a cheap floor to compare against, not a tuned supervised result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import Tensor, nn

from pipeline.encoder import EncoderSpec
from pipeline.evaluation.features import LabelledSplit, channels_last, ticker


@dataclass(frozen=True)
class SupervisedBudget:
    steps: int = 100
    batch_size: int = 64
    lr: float = 2e-3


def train_supervised(
    spec: EncoderSpec,
    split: LabelledSplit,
    labels: Tensor,
    budget: SupervisedBudget,
    *,
    seed: int,
    progress: Progress | None = None,
    what: str = "supervised baseline",
) -> nn.Module:
    """Backbone of `spec` + linear head trained on (images of `split`, `labels`); eval mode.

    `labels` is passed separately from the split so noisy labels train on the same images."""
    torch.manual_seed(seed)
    encoder, feat_dim = spec.build()
    model = nn.Sequential(encoder, nn.Flatten(), nn.Linear(feat_dim, split.num_classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=budget.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=budget.steps)
    generator = torch.Generator().manual_seed(seed)
    advance = ticker(progress, what, budget.steps)
    model.train()
    for _ in range(budget.steps):
        index = torch.randint(0, len(split), (budget.batch_size,), generator=generator)
        loss = F.cross_entropy(model(split.floats(index)), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        advance()
    # Trained in the default layout: channels-last weight gradients are not reproducible here
    # (oneDNN's reductions vary run to run); evaluated channels-last, which is (and 1.5x faster).
    return channels_last(model).eval()
