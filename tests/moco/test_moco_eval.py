"""Augmentation recipes and the weighted kNN monitor."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from moco import (
    TwoCropsTransform,
    eval_transform,
    extract_features,
    knn_accuracy,
    knn_predict,
    knn_top1,
    moco_v1_transform,
    moco_v2_transform,
)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    "make",
    [moco_v1_transform, moco_v2_transform, lambda s: moco_v2_transform(s, blur=True)],
    ids=["v1", "v2", "v2-blur"],
)
def test_augment_shapes_and_dtypes(channels: int, make) -> None:
    torch.manual_seed(0)
    image = torch.randint(0, 256, (channels, 28, 28), dtype=torch.uint8)
    q, k = TwoCropsTransform(make(16))(image)
    for view in (q, k):
        assert view.shape == (channels, 16, 16) and view.dtype == torch.float32
        assert view.min() >= 0.0 and view.max() <= 1.0
    assert not torch.equal(q, k)


def test_v2_blur_defaults_to_image_size() -> None:
    def has_blur(t: v2.Compose) -> bool:
        return any(
            isinstance(op, v2.RandomApply) and isinstance(op.transforms[0], v2.GaussianBlur)
            for op in t.transforms
        )

    assert not has_blur(moco_v2_transform(32))
    assert has_blur(moco_v2_transform(96))
    assert has_blur(moco_v2_transform(32, blur=True))


@pytest.mark.parametrize("channels", [1, 3])
def test_eval_transform_is_deterministic(channels: int) -> None:
    image = torch.randint(0, 256, (channels, 28, 28), dtype=torch.uint8)
    out = eval_transform(28)(image)
    torch.testing.assert_close(out, image.float() / 255)
    assert eval_transform(16)(image).shape == (channels, 16, 16)


def _colab_knn_predict(feature, bank, labels, classes, k, t):
    """The MoCo CIFAR-10 demo's formulation (bank as [D, N], one-hot weighted votes)."""
    sim_weight, sim_indices = (feature @ bank).topk(k=k, dim=-1)
    sim_labels = torch.gather(labels.expand(feature.size(0), -1), dim=-1, index=sim_indices)
    one_hot = torch.zeros(feature.size(0) * k, classes).scatter(-1, sim_labels.view(-1, 1), 1.0)
    weighted = one_hot.view(feature.size(0), -1, classes) * (sim_weight / t).exp().unsqueeze(-1)
    return weighted.sum(dim=1).argmax(dim=-1)


def test_knn_predict_matches_demo_formulation() -> None:
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(300, 16), dim=1)
    labels = torch.randint(0, 5, (300,))
    queries = F.normalize(torch.randn(50, 16), dim=1)
    got = knn_predict(queries, bank, labels, 5, k=20, t=0.1, chunk_size=7)
    torch.testing.assert_close(got, _colab_knn_predict(queries, bank.T, labels, 5, 20, 0.1))


def test_multi_k_knn_matches_the_demo_formulation_per_k() -> None:
    """One shared neighbour search for several k (evaluate's kNN) gives each k's own answer."""
    torch.manual_seed(1)
    bank = F.normalize(torch.randn(400, 16), dim=1)
    labels = torch.randint(0, 5, (400,))
    queries = F.normalize(torch.randn(120, 16), dim=1)
    truth = torch.randint(0, 5, (120,))
    got = knn_top1(bank, labels, queries, truth, 5, [50, 7, 1, 1000], 0.1, chunk_size=32)
    for k, acc in got.items():
        ref = _colab_knn_predict(queries, bank.T, labels, 5, min(k, 400), 0.1)
        assert acc == pytest.approx((ref == truth).float().mean().item())


def test_knn_is_perfect_on_separable_clusters() -> None:
    torch.manual_seed(0)
    classes, dim = 4, 32
    centers = F.normalize(torch.randn(classes, dim), dim=1)

    def sample(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(classes).repeat_interleave(per_class)
        return F.normalize(centers[labels] + 0.05 * torch.randn(len(labels), dim), dim=1), labels

    bank, bank_labels = sample(50)
    test, test_labels = sample(10)
    assert knn_accuracy(bank, bank_labels, test, test_labels, classes, k=200, t=0.1) == 1.0


def test_extract_features_normalises_and_restores_mode() -> None:
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Dropout(0.5))
    batches = [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 3])) for _ in range(3)]
    feats, labels = extract_features(encoder, batches)
    assert encoder.training
    assert feats.shape == (12, 6) and labels.tolist() == [0, 1, 2, 3] * 3
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(12))
    encoder.eval()
    torch.testing.assert_close(feats[:4], F.normalize(encoder(batches[0][0]), dim=1))
