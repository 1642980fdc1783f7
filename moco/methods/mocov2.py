"""MoCo v1/v2 (He et al. 2020; Chen et al. 2020), following the official moco/builder.py:
contrast queries against a momentum-encoded key and a queue of past keys."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moco.backbones import BackboneSpec
from moco.distributed import (
    SplitBatchNorm,
    batch_shuffle_ddp,
    batch_shuffle_single,
    batch_unshuffle_ddp,
    batch_unshuffle_single,
    is_distributed,
    unwrap,
)
from moco.heads import projection_head
from moco.loss import info_nce
from moco.methods.base import Method
from moco.momentum import cosine_momentum, momentum_update
from moco.queue import KeyQueue


@dataclass(frozen=True)
class MoCoV2Config:
    """MoCo v2's own settings (defaults: the official CIFAR demo's, queue sized for CPUs)."""

    queue_size: int = 4096
    momentum: float = 0.99
    momentum_schedule: Literal["constant", "cosine"] = "constant"  # cosine: toward 1 (BYOL)
    temperature: float = 0.1
    symmetric: bool = False  # both views as queries
    bn_splits: int = 1  # > 1: SplitBatchNorm emulates shuffle BN on one process
    dim: int = 128
    mlp: bool = True  # v2's MLP head (False: v1's linear head)


class MoCoV2Output(NamedTuple):
    """A StepOutput (same first three fields) plus the keys this step enqueued."""

    loss: Tensor
    logits: Tensor  # [N, 1 + K] (symmetric: [2N, 1 + K]); the positive is column 0
    labels: Tensor  # zeros: column 0
    keys: Tensor  # float32 local keys this step enqueued (before all-gather)


class MoCoV2(Method):
    """The query encoder is `backbone -> head`; the key encoder is its copy, updated only by
    EMA. Only the query encoder is wrapped in DDP: the key encoder gets no gradients, and all
    ranks keep it (and the queue) identical without DDP."""

    name: ClassVar[str] = "mocov2"

    def __init__(self, spec: BackboneSpec, cfg: MoCoV2Config, *, world_size: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        # Across ranks, real shuffle BN; on one process, the split-batch emulation.
        splits = cfg.bn_splits if world_size == 1 else 1
        norm_layer = partial(SplitBatchNorm, num_splits=splits) if splits > 1 else None
        backbone, feat_dim = spec.build(norm_layer)
        head = projection_head(feat_dim, cfg.dim, cfg.mlp)
        self.encoder_q: nn.Module = nn.Sequential(OrderedDict(backbone=backbone, head=head))
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        self.queue = KeyQueue(cfg.dim, cfg.queue_size)
        self.momentum = cfg.momentum
        self.temperature = cfg.temperature
        self.symmetric = cfg.symmetric
        # shuffle BN's permutations: the same draws on every rank (seeded alike, used in step)
        self._shuffle_generator = torch.Generator().manual_seed(0)

    def on_step(self, progress: float) -> None:
        if self.cfg.momentum_schedule == "cosine":
            self.momentum = cosine_momentum(self.cfg.momentum, progress, 1.0)

    def epoch_metrics(self) -> dict[str, float]:
        return {"momentum": self.momentum}

    def ddp_wrap(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        self.encoder_q = wrap(self.encoder_q)

    def optimizer(
        self, lr: float, weight_decay: float, sgd_momentum: float
    ) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            self.encoder_q.parameters(), lr=lr, momentum=sgd_momentum, weight_decay=weight_decay
        )

    def extra_state(self) -> dict[str, Tensor]:
        """The queue and its pointer (also in state_dict(); per rank, so ranks can be compared)."""
        return dict(self.queue.state_dict())

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        self.queue.load_state_dict(state)

    def momentum_update(self) -> None:
        """Key encoder <- EMA of the query encoder (DDP's .parameters() are the inner module's)."""
        momentum_update(
            list(self.encoder_k.parameters()), list(self.encoder_q.parameters()), self.momentum
        )

    @torch.no_grad()
    def keys(self, *views: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised float32 keys (the queue's dtype) of each view, [V, B, D], each view's
        computed on a batch shuffled across ranks so BN statistics cannot tell the model which
        key belongs to which query; and every rank's keys, which the queue takes. Across ranks
        this is two collectives a step, whatever the number of views."""
        if not is_distributed():
            keys = []
            for im_k in views:
                shuffled, idx_unshuffle = batch_shuffle_single(im_k)
                k = F.normalize(self.encoder_k(shuffled).float(), dim=1)
                keys.append(batch_unshuffle_single(k, idx_unshuffle))
            local = torch.stack(keys)
            return local, local.flatten(0, 1)
        shares, perms = batch_shuffle_ddp(list(views), self._shuffle_generator)
        keys = [F.normalize(self.encoder_k(share).float(), dim=1) for share in shares]
        return batch_unshuffle_ddp(torch.stack(keys), perms)

    def queries(self, im_q: Tensor) -> Tensor:
        """Normalised queries; the only path gradients flow through."""
        return F.normalize(self.encoder_q(im_q), dim=1)

    def contrast(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """InfoNCE against the queue; the queue is cloned so a later enqueue cannot touch the
        tensor saved for backward."""
        return info_nce(q, k, self.queue.keys.clone().detach(), self.temperature)

    def enqueue(self, keys: Tensor) -> None:
        """Enqueue every rank's keys (from keys()), so each rank's queue stays identical."""
        self.queue.enqueue(keys)

    def forward(self, view1: Tensor, view2: Tensor) -> MoCoV2Output:  # type: ignore[override]
        """One MoCo step on two views; updates the key encoder and the queue as a side effect."""
        self.momentum_update()
        if not self.symmetric:
            k, everyone = self.keys(view2)
            loss, logits = self.contrast(self.queries(view1), k[0])
        else:  # each view is a query for the other's key
            k, everyone = self.keys(view1, view2)
            loss_12, logits_12 = self.contrast(self.queries(view1), k[1])
            loss_21, logits_21 = self.contrast(self.queries(view2), k[0])
            loss, logits = 0.5 * (loss_12 + loss_21), torch.cat([logits_12, logits_21])
        self.enqueue(everyone)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return MoCoV2Output(loss, logits, labels, k.flatten(0, 1))

    def export_encoder(self) -> nn.Module:
        """A standalone copy of the query backbone (no head, no DDP) in eval mode, for
        feature extraction or export; training is unaffected by what the caller does with it."""
        return copy.deepcopy(unwrap(self.encoder_q).backbone).eval()
