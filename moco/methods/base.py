"""The method interface: all that the training loop, precision probe, tune, evaluate, promote
and embed may use of a self-supervised method (they never name one)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn


class StepOutput(NamedTuple):
    loss: Tensor
    logits: Tensor  # [rows, candidates]; each row's positive is its entry of `labels`
    labels: Tensor


class Method(nn.Module, ABC):
    """A self-supervised method: `__init__(spec: BackboneSpec, cfg: <its config dataclass>, *,
    world_size: int)`, the loss from two views of a batch, and its training hooks."""

    name: ClassVar[str]  # recorded in encoder.json and MLflow

    @abstractmethod
    def forward(self, view1: Tensor, view2: Tensor) -> StepOutput:
        """Loss from the two views; updates the key encoder (EMA) / queue as side effects."""

    @abstractmethod
    def on_step(self, progress: float) -> None:
        """Set per-step schedules (momentum) for the next forward; progress in [0, 1]."""

    @abstractmethod
    def ddp_wrap(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Replace the parts that get gradients by `wrap(part)` (DDP, torch.compile)."""

    @abstractmethod
    def optimizer(
        self, lr: float, weight_decay: float, sgd_momentum: float
    ) -> torch.optim.Optimizer:
        """The method's optimiser over its trainable parameters (lr already batch-scaled)."""

    @abstractmethod
    def extra_state(self) -> dict[str, Tensor]:
        """Per-rank state a resume needs beside state_dict() (checkpointed by every rank)."""

    @abstractmethod
    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        """Restore what extra_state() returned."""

    def epoch_metrics(self) -> dict[str, float]:
        """Schedule values worth a column in the epoch's metrics row (e.g. the momentum)."""
        return {}

    @abstractmethod
    def export_encoder(self) -> nn.Module:
        """A standalone backbone copy in eval mode: no head, no DDP."""
