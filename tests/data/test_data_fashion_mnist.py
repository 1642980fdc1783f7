"""Fashion-MNIST as shipped by the apt package: a balanced subset shards and reads back."""

from __future__ import annotations

import pytest
import torch
from data_stage_helpers import FASHION_MNIST, top_left_crop

from pipeline.dataset import eval_loader, read_manifest, shard_urls
from pipeline.shard import shard
from pipeline.sources import FASHION_MNIST_CLASSES

pytestmark = pytest.mark.skipif(
    not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST missing: apt-get install -y dataset-fashion-mnist",
)


def test_fashion_mnist_subset_is_class_balanced_and_readable(make_params):
    params = make_params(source="fashion-mnist", train_limit=2000, test_limit=500)
    summary = shard(params)
    root = params.data.shards_dir

    assert summary.splits["train"]["samples"] == 2000
    assert summary.splits["test"]["samples"] == 500
    train, test = read_manifest(root, "train"), read_manifest(root, "test")
    assert train["classes"] == list(FASHION_MNIST_CLASSES) and train["image_mode"] == "L"
    assert set(train["label_counts"].values()) == {200}
    assert set(test["label_counts"].values()) == {50}
    assert [s["samples"] for s in train["shards"]] == [250] * 8
    batches = list(eval_loader(shard_urls(root, "test"), transform=top_left_crop, batch_size=128))
    labels = torch.cat([labels for _, labels in batches])
    assert batches[0][0].shape == (128, 1, 4, 4)
    assert torch.bincount(labels).tolist() == [50] * 10
    assert shard(params).skipped
