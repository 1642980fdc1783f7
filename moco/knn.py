"""Weighted cosine kNN monitor (Wu et al. 2018 InstDisc; the MoCo CIFAR-10 demo).

Cheap to run during pre-training and needs no training of its own, so it tracks representation
quality epoch by epoch. Features are L2-normalised, so a dot product is the cosine similarity.
"""

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def knn_predict(
    features: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk_size: int = 1024,
) -> Tensor:
    """Predicted labels [N] for features [N, D] from bank [M, D]: the k nearest neighbours vote
    with weight exp(cos / t). Queries go in chunks so the similarity matrix stays chunk x M."""
    k = min(k, bank.shape[0])
    preds = []
    for chunk in features.split(chunk_size):
        sim, idx = (chunk @ bank.T).topk(k, dim=1)
        scores = torch.zeros(chunk.shape[0], num_classes, device=chunk.device)
        scores.scatter_add_(1, bank_labels[idx], (sim.float() / t).exp())
        preds.append(scores.argmax(dim=1))
    return torch.cat(preds)


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


def knn_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
) -> float:
    """Top-1 accuracy of knn_predict on the test set, with the training set as the bank."""
    preds = knn_predict(test_feats, train_feats, train_labels, num_classes, k, t)
    return (preds == test_labels).float().mean().item()
