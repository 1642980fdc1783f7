"""The per-epoch kNN monitor of a training run, shared by its ranks.

Why this shape: the monitor once ran on rank 0 alone, decoding its 6,000 PNGs again every epoch
while the other ranks waited at the next collective (~2 s an epoch on 2 CPUs, ~5% of the run).
Now every rank decodes the monitor's images once per run and keeps its own share (every
world-th image, uint8), embeds only that share each epoch, and the features are gathered so
every rank scores the same kNN: the work is split, nobody waits, and the value is the one a
single process would compute on the same images.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.transforms import v2

from moco.distributed import concat_all_gather
from moco.knn import extract_features, knn_accuracy
from pipeline.config import Params
from pipeline.dataset import eval_loader


@dataclass
class KnnMonitor:
    """This rank's share of the monitor's bank (train images) and queries (test images)."""

    bank: Tensor  # uint8 [N / world, C, H, W]
    bank_labels: Tensor
    queries: Tensor
    query_labels: Tensor
    num_classes: int
    params: Params

    @classmethod
    def load(
        cls,
        bank_urls: list[str],
        query_urls: list[str],
        num_classes: int,
        params: Params,
        rank: int,
        world: int,
    ) -> KnnMonitor:
        """Decode the first eval.monitor_bank / monitor_queries images (rounded down to a
        multiple of `world`, so every rank's share has one size) and keep `rank`'s share."""
        e = params.eval
        bank, bank_labels = _first(bank_urls, e.monitor_bank, world, params)
        queries, query_labels = _first(query_urls, e.monitor_queries, world, params)
        return cls(
            bank[rank::world],
            bank_labels[rank::world],
            queries[rank::world],
            query_labels[rank::world],
            num_classes,
            params,
        )

    def knn_top1(self, backbone: nn.Module, device: torch.device, bf16: bool) -> float:
        """kNN top-1 of `backbone` over every rank's share (a collective: call on all ranks)."""
        bank, bank_labels = self._features(backbone, self.bank, self.bank_labels, device, bf16)
        queries, labels = self._features(backbone, self.queries, self.query_labels, device, bf16)
        e = self.params.eval
        return knn_accuracy(
            concat_all_gather(bank),
            concat_all_gather(bank_labels),
            concat_all_gather(queries),
            concat_all_gather(labels),
            self.num_classes,
            e.knn_k,
            e.knn_t,
        )

    def _features(
        self, backbone: nn.Module, images: Tensor, labels: Tensor, device: torch.device, bf16: bool
    ) -> tuple[Tensor, Tensor]:
        size = self.params.eval.batch_size
        batches = (
            (chunk.to(device).float().div_(255), chunk_labels)
            for chunk, chunk_labels in zip(images.split(size), labels.split(size), strict=True)
        )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return extract_features(backbone, batches)


def _first(urls: list[str], count: int, world: int, params: Params) -> tuple[Tensor, Tensor]:
    """The first `count` images of the shards (fewer if they hold fewer), rounded down to a
    multiple of `world`, as uint8 at the model's size, and their labels, in shard order."""
    size, batch = params.model.image_size, params.eval.batch_size
    square = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    batches = itertools.islice(
        eval_loader(urls, transform=square, batch_size=batch), math.ceil(count / batch)
    )
    images, labels = zip(*batches, strict=True)
    keep = min(count, sum(len(b) for b in labels)) // world * world
    return torch.cat(images)[:keep], torch.cat(labels)[:keep]
