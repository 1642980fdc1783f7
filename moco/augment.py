"""MoCo's augmentation recipes on uint8 image tensors [C, H, W] (C = 1 or 3).

The recipes end in float32 in [0, 1] without Normalize: the backbone normalises its input.
"""

from collections.abc import Callable

import torch
from torch import Tensor
from torchvision.transforms import v2

Transform = Callable[[Tensor], Tensor]


def moco_v1_transform(image_size: int) -> Transform:
    """MoCo v1 (official main_moco.py): grayscale before an always-on, strong-hue colour jitter."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True),
            v2.RandomGrayscale(p=0.2),
            v2.ColorJitter(0.4, 0.4, 0.4, 0.4),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def moco_v2_transform(image_size: int, blur: bool | None = None) -> Transform:
    """MoCo v2 (official main_moco.py --aug-plus); blur defaults to off for images <= 64 px,
    where it mostly erases the little detail there is (the CIFAR demo has no blur)."""
    if blur is None:
        blur = image_size > 64
    # PIL's blur has no kernel size; like SimCLR, use about 10% of the image, odd, at least 3.
    kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)
    blur_ops = [v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5)] if blur else []
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            *blur_ops,
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def eval_transform(image_size: int) -> Transform:
    """Deterministic view for kNN / linear evaluation (resizing is a no-op at the native size)."""
    return v2.Compose(
        [
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


class TwoCropsTransform:
    """Two independent augmentations of one image: the query view and the key view."""

    def __init__(self, base: Transform) -> None:
        self.base = base

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.base(x), self.base(x)
