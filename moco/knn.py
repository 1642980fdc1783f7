"""Weighted cosine kNN (Wu et al. 2018 InstDisc; the MoCo CIFAR-10 demo): the per-epoch monitor
and the evaluate stage's kNN protocol, one implementation.

Needs no training of its own, so it tracks representation quality epoch by epoch. Features are
L2-normalised, so a dot product is the cosine similarity. The neighbour search is the cost (a 60k
bank of raw pixels: seconds per pass), so several k share one search for the largest k: every
smaller k votes with the leading columns of the same sorted neighbour list.
"""

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def knn_predict_many(
    features: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    ks: list[int],
    t: float = 0.1,
    chunk_size: int = 1024,
) -> dict[int, Tensor]:
    """Predicted labels [N] per k for features [N, D] from bank [M, D]: the k nearest neighbours
    vote with weight exp(cos / t). Queries go in chunks so the similarity matrix stays chunk x M."""
    k_max = min(max(ks), bank.shape[0])
    preds: dict[int, list[Tensor]] = {k: [] for k in ks}
    for chunk in features.split(chunk_size):
        sim, idx = (chunk @ bank.T).topk(k_max, dim=1)  # sorted, most similar first
        weights, neighbour_labels = (sim.float() / t).exp(), bank_labels[idx]
        for k in ks:
            k_used = min(k, k_max)
            scores = torch.zeros(chunk.shape[0], num_classes, device=chunk.device)
            scores.scatter_add_(1, neighbour_labels[:, :k_used], weights[:, :k_used])
            preds[k].append(scores.argmax(dim=1))
    return {k: torch.cat(p) for k, p in preds.items()}


def knn_predict(
    features: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk_size: int = 1024,
) -> Tensor:
    """knn_predict_many for one k."""
    return knn_predict_many(features, bank, bank_labels, num_classes, [k], t, chunk_size)[k]


def knn_top1(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    labels: Tensor,
    num_classes: int,
    ks: list[int],
    t: float,
    chunk_size: int = 1024,
) -> dict[int, float]:
    """Top-1 accuracy per k of the queries, with `bank` as the neighbours."""
    preds = knn_predict_many(queries, bank, bank_labels, num_classes, ks, t, chunk_size)
    return {k: (p == labels.to(p.device)).float().mean().item() for k, p in preds.items()}


def knn_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
) -> float:
    """Top-1 accuracy of one k on the test set, with the training set as the bank."""
    return knn_top1(train_feats, train_labels, test_feats, test_labels, num_classes, [k], t)[k]


@torch.no_grad()
def extract_features(
    encoder: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]
) -> tuple[Tensor, Tensor]:
    """L2-normalised float32 features and labels of every batch, with the encoder in eval mode
    (its previous mode is restored, so it can be called on a live training encoder)."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    feats, labels = [], []
    try:
        for images, targets in batches:
            feats.append(F.normalize(encoder(images.to(device)).float(), dim=1))
            labels.append(targets.to(device))
    finally:
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)
