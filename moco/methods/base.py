"""The method interface: all the training loop, probe, tune, evaluate, promote and embed may use.

Minimal stand-in written against method-seam.md; the seam's version replaces it on merge.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn


class StepOutput(NamedTuple):
    loss: Tensor
    logits: Tensor  # [rows, candidates], the positive's column in `labels` (a top-1 monitor)
    labels: Tensor


class Method(nn.Module, ABC):
    """A self-supervised method: the loss from two views of a batch, plus its training hooks."""

    name: ClassVar[str]

    @abstractmethod
    def forward(self, view1: Tensor, view2: Tensor) -> StepOutput:
        """Loss from the two views; updates the key encoder / queue as side effects."""

    @abstractmethod
    def on_step(self, progress: float) -> None:
        """Set per-step schedules (momentum) from the fraction of training done, in [0, 1]."""

    @abstractmethod
    def ddp_wrap(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Wrap the parts that get gradients (e.g. in DistributedDataParallel)."""

    @abstractmethod
    def optimizer(
        self, lr: float, weight_decay: float, sgd_momentum: float
    ) -> torch.optim.Optimizer:
        """The method's optimiser over its trainable parameters; lr is already batch-scaled."""

    @abstractmethod
    def extra_state(self) -> dict[str, Tensor]:
        """What state_dict() does not hold that a resume needs."""

    @abstractmethod
    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        """Restore what extra_state() returned."""

    @abstractmethod
    def export_encoder(self) -> nn.Module:
        """A standalone backbone copy in eval mode: no head, no DDP."""
