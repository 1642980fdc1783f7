"""MoCo: contrast queries against a momentum-encoded key and a queue of past keys."""

import copy
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from moco.backbones import build_backbone
from moco.distributed import (
    SplitBatchNorm,
    batch_shuffle_ddp,
    batch_shuffle_single,
    batch_unshuffle_ddp,
    batch_unshuffle_single,
    concat_all_gather,
    is_distributed,
)
from moco.heads import projection_head
from moco.loss import info_nce
from moco.momentum import momentum_update
from moco.queue import KeyQueue


class MoCoOutput(NamedTuple):
    loss: Tensor
    logits: Tensor  # [N, 1 + K] (symmetric: [2N, 1 + K]); the positive is column 0
    keys: Tensor  # float32 local keys this step enqueued (before all-gather)


def unwrap(module: nn.Module) -> nn.Module:
    """Strip a DistributedDataParallel wrapper, if any."""
    return module.module if isinstance(module, DistributedDataParallel) else module


class MoCo(nn.Module):
    """MoCo v1/v2 (He et al. 2020; Chen et al. 2020), following the official moco/builder.py.

    The query encoder is `backbone -> head`; the key encoder is its copy, updated only by EMA.
    For DDP wrap the query encoder alone: `model.encoder_q = DDP(model.encoder_q)`. The key encoder
    gets no gradients, and all ranks keep it (and the queue) identical without DDP.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        *,
        dim: int,
        queue_size: int = 4096,
        momentum: float = 0.99,
        temperature: float = 0.1,
        symmetric: bool = False,
    ) -> None:
        super().__init__()
        self.encoder_q: nn.Module = nn.Sequential(OrderedDict(backbone=backbone, head=head))
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        self.queue = KeyQueue(dim, queue_size)
        self.momentum = momentum
        self.temperature = temperature
        self.symmetric = symmetric

    @classmethod
    def from_backbone(
        cls,
        backbone_name: str = "resnet18",
        *,
        width: int = 64,
        small_stem: bool = True,
        stem_stride: int = 1,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        dim: int = 128,
        mlp: bool = True,
        queue_size: int = 4096,
        momentum: float = 0.99,
        temperature: float = 0.1,
        symmetric: bool = False,
        bn_splits: int = 1,
    ) -> "MoCo":
        """Build backbone + head; bn_splits > 1 uses SplitBatchNorm to emulate shuffle BN."""
        norm_layer = partial(SplitBatchNorm, num_splits=bn_splits) if bn_splits > 1 else None
        backbone, feat_dim = build_backbone(
            backbone_name,
            width=width,
            small_stem=small_stem,
            stem_stride=stem_stride,
            in_channels=in_channels,
            mean=mean,
            std=std,
            norm_layer=norm_layer,
        )
        return cls(
            backbone,
            projection_head(feat_dim, dim, mlp),
            dim=dim,
            queue_size=queue_size,
            momentum=momentum,
            temperature=temperature,
            symmetric=symmetric,
        )

    def momentum_update(self) -> None:
        """Key encoder <- EMA of the query encoder (DDP's .parameters() are the inner module's)."""
        momentum_update(
            list(self.encoder_k.parameters()), list(self.encoder_q.parameters()), self.momentum
        )

    @torch.no_grad()
    def keys(self, im_k: Tensor) -> Tensor:
        """Normalised float32 keys (the queue's dtype), computed on a shuffled batch so BN
        statistics cannot tell the model which key belongs to which query."""
        if is_distributed():
            shuffle, unshuffle = batch_shuffle_ddp, batch_unshuffle_ddp
        else:
            shuffle, unshuffle = batch_shuffle_single, batch_unshuffle_single
        im_k, idx_unshuffle = shuffle(im_k)
        k = F.normalize(self.encoder_k(im_k).float(), dim=1)
        return unshuffle(k, idx_unshuffle)

    def queries(self, im_q: Tensor) -> Tensor:
        """Normalised queries; the only path gradients flow through."""
        return F.normalize(self.encoder_q(im_q), dim=1)

    def contrast(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """InfoNCE against the queue; the queue is cloned so a later enqueue cannot touch the
        tensor saved for backward."""
        return info_nce(q, k, self.queue.keys.clone().detach(), self.temperature)

    def enqueue(self, k: Tensor) -> None:
        """Enqueue every rank's keys, so each rank's queue stays identical."""
        self.queue.enqueue(concat_all_gather(k))

    def forward(self, im_q: Tensor, im_k: Tensor) -> MoCoOutput:
        """One MoCo step on two views; updates the key encoder and the queue as a side effect."""
        self.momentum_update()
        if not self.symmetric:
            k = self.keys(im_k)
            loss, logits = self.contrast(self.queries(im_q), k)
        else:  # each view is a query for the other's key
            k1, k2 = self.keys(im_q), self.keys(im_k)
            loss_12, logits_12 = self.contrast(self.queries(im_q), k2)
            loss_21, logits_21 = self.contrast(self.queries(im_k), k1)
            loss, logits = 0.5 * (loss_12 + loss_21), torch.cat([logits_12, logits_21])
            k = torch.cat([k1, k2])
        self.enqueue(k)
        return MoCoOutput(loss, logits, k)

    def export_encoder(self) -> nn.Module:
        """A standalone copy of the query backbone (no head, no DDP) in eval mode, for
        feature extraction or export; training is unaffected by what the caller does with it."""
        return copy.deepcopy(unwrap(self.encoder_q).backbone).eval()
