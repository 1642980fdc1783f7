"""BatchMoCoAugment against torchvision: shapes, resampling, crop statistics, jitter ranges."""

from dataclasses import replace

import pytest
import torch
from torchvision.transforms import RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as TF

from moco.augment import (
    AugmentRecipe,
    BatchMoCoAugment,
    BatchTwoCrops,
    _gaussian_blur,
    _shift_hue,
    random_resized_crop_boxes,
)

# Every random op off: the crop is the whole (square) image, nothing else changes.
FIXED = AugmentRecipe(scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0, flip_p=0)


def _images(b: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, size, size), dtype=torch.uint8, generator=g)


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("recipe", ["v1", "v2"])
@pytest.mark.parametrize(("channels", "source", "size"), [(1, 28, 28), (1, 28, 20), (3, 32, 40)])
def test_shape_dtype_and_range(recipe: str, channels: int, source: int, size: int) -> None:
    out = BatchMoCoAugment(size, recipe)(_images(16, channels, source), _seeded())
    assert out.shape == (16, channels, size, size) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("size", [28, 41])
def test_without_randomness_it_is_a_bilinear_resize(size: int) -> None:
    images = _images(4, 3, 28)
    out = BatchMoCoAugment(size, FIXED)(images, _seeded())
    expected = TF.resize(images.float(), [size, size], antialias=False) / 255
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_downscaling_is_antialiased() -> None:
    """roi_align's adaptive sampling averages taps: close to antialias=True on a fine pattern
    that plain bilinear sampling aliases (away from the borders, which they treat differently)."""
    stripes = (torch.arange(96) % 3 == 0).to(torch.uint8).mul(255).expand(2, 3, 96, 96)
    out = BatchMoCoAugment(32, FIXED)(stripes.contiguous(), _seeded())
    smooth = TF.resize(stripes.float(), [32, 32], antialias=True) / 255
    aliased = TF.resize(stripes.float(), [32, 32], antialias=False) / 255
    inner = (..., slice(1, -1))
    assert (out - smooth)[inner].abs().max() < 0.02 < (aliased - smooth)[inner].abs().max()


def test_flip_flips() -> None:
    images = _images(4, 1, 28)
    out = BatchMoCoAugment(28, replace(FIXED, flip_p=1.0))(images, _seeded())
    torch.testing.assert_close(out, images.flip(-1).float() / 255, atol=1e-6, rtol=0)


def test_crop_boxes_follow_torchvision_get_params() -> None:
    height, width, n = 28, 36, 4000
    boxes = random_resized_crop_boxes(n, height, width, generator=_seeded())
    x1, y1, x2, y2 = boxes.unbind(1)
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= width).all() and (y2 <= height).all()
    assert (x2 > x1).all() and (y2 > y1).all()
    torch.manual_seed(0)
    image = torch.zeros(1, height, width)
    reference = torch.tensor(
        [RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    ).double()  # rows i, j, h, w
    area = ((x2 - x1) * (y2 - y1)).mean() / (height * width)
    expected = (reference[:, 2] * reference[:, 3]).mean() / (height * width)
    assert abs(area - expected) < 0.015  # ~4 standard errors; the mean is about 0.58
    log_ratio = ((x2 - x1) / (y2 - y1)).log().mean()
    assert abs(log_ratio - (reference[:, 3] / reference[:, 2]).log().mean()) < 0.02


def test_crop_boxes_fall_back_to_the_central_crop_like_torchvision() -> None:
    boxes = random_resized_crop_boxes(3, 28, 28, scale=(1, 1), ratio=(2, 2), generator=_seeded())
    i, j, h, w = RandomResizedCrop.get_params(torch.zeros(1, 28, 28), [1, 1], [2, 2])
    assert boxes.tolist() == [[j, i, j + w, i + h]] * 3


def _jitter_only(brightness: float, contrast: float) -> BatchMoCoAugment:
    return BatchMoCoAugment(8, replace(FIXED, jitter=(brightness, contrast, 0, 0), jitter_p=1))


def test_brightness_factors_stay_in_range_on_a_constant_image() -> None:
    constant = torch.full((512, 1, 8, 8), 100, dtype=torch.uint8)
    out = _jitter_only(0.4, 0)(constant, _seeded())
    assert torch.allclose(out, out[:, :, :1, :1].expand_as(out))  # still constant per image
    factors = out[:, 0, 0, 0] * 255 / 100
    assert factors.min() >= 0.6 - 1e-5 and factors.max() <= 1.4 + 1e-5
    assert factors.min() < 0.65 and factors.max() > 1.35  # and spread over it


def test_contrast_is_the_identity_on_a_constant_image_and_scales_around_the_mean() -> None:
    constant = torch.full((64, 1, 8, 8), 100, dtype=torch.uint8)
    torch.testing.assert_close(_jitter_only(0, 0.4)(constant, _seeded()), constant / 255)
    halves = torch.full((512, 1, 8, 8), 50, dtype=torch.uint8)
    halves[..., 4:] = 150
    out = _jitter_only(0, 0.4)(halves, _seeded()) * 255
    factors = (out[:, 0, 0, -1] - out[:, 0, 0, 0]) / 100
    assert factors.min() >= 0.6 - 1e-4 and factors.max() <= 1.4 + 1e-4
    assert factors.min() < 0.65 and factors.max() > 1.35
    torch.testing.assert_close(out.mean((1, 2, 3)), torch.full((512,), 100.0))


def test_grayscale_and_jitter_off_for_one_channel_and_greys_three() -> None:
    grey = BatchMoCoAugment(16, replace(FIXED, grayscale_p=1.0))
    out = grey(_images(4, 3, 16), _seeded())
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    colourless = BatchMoCoAugment(16, replace(FIXED, jitter=(0, 0, 0.4, 0.5), jitter_p=1.0))
    images = _images(4, 1, 16)
    torch.testing.assert_close(colourless(images, _seeded()), images / 255)


def test_hue_shift_matches_adjust_hue_per_image() -> None:
    images = _images(5, 3, 12).float() / 255
    shifts = torch.tensor([-0.5, -0.1, 0.0, 0.07, 0.4])
    expected = torch.stack(
        [TF.adjust_hue(im, float(s)) for im, s in zip(images, shifts, strict=True)]
    )
    torch.testing.assert_close(_shift_hue(images, shifts), expected, atol=1e-5, rtol=0)


def test_blur_matches_gaussian_blur_per_image_and_sigma_zero_is_identity() -> None:
    images = _images(3, 3, 20).float() / 255
    sigmas = torch.tensor([0.3, 1.7, 0.0])
    out = _gaussian_blur(images, sigmas, 5)
    for image, result, sigma in zip(images[:2], out[:2], sigmas[:2], strict=True):
        expected = TF.gaussian_blur(image, [5, 5], [float(sigma)] * 2)
        torch.testing.assert_close(result, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[2], images[2])


def test_recipes_match_the_per_sample_ones() -> None:
    assert BatchMoCoAugment(32).recipe.blur_kernel == 0
    assert BatchMoCoAugment(96).recipe.blur_kernel == 9
    assert BatchMoCoAugment(32, blur=True).recipe.blur_kernel == 3
    v1 = BatchMoCoAugment(32, "v1").recipe
    assert v1.jitter == (0.4,) * 4 and v1.jitter_p == 1 and v1.grayscale_first
    with pytest.raises(ValueError, match="v3"):
        BatchMoCoAugment(32, "v3")  # type: ignore[arg-type]
    out = BatchMoCoAugment(96)(_images(4, 3, 100), _seeded())  # the blurred path runs
    assert out.shape == (4, 3, 96, 96)


def test_seeded_generator_is_deterministic_and_views_differ() -> None:
    images = _images(32, 3, 32)
    two = BatchTwoCrops(BatchMoCoAugment(32))
    q1, k1 = two(images, _seeded(7))
    q2, k2 = two(images, _seeded(7))
    assert torch.equal(q1, q2) and torch.equal(k1, k2)
    assert not torch.equal(q1, k1)
    assert not torch.equal(q1, two(images, _seeded(8))[0])
    torch.manual_seed(3)  # without a generator: the global CPU generator
    first = two.base(images)
    torch.manual_seed(3)
    assert torch.equal(first, two.base(images))


def test_rejects_float_or_unbatched_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        BatchMoCoAugment(8)(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="uint8"):
        BatchMoCoAugment(8)(torch.zeros(1, 8, 8, dtype=torch.uint8))


def test_v2_compose_is_unchanged_by_the_shared_recipe() -> None:
    from moco.augment import moco_v1_transform, moco_v2_transform

    v2_ops = [type(t).__name__ for t in moco_v2_transform(96).transforms]
    assert v2_ops == [
        "RandomResizedCrop",
        "RandomApply",
        "RandomGrayscale",
        "RandomApply",
        "RandomHorizontalFlip",
        "ToDtype",
    ]
    v1_ops = [type(t) for t in moco_v1_transform(32).transforms]
    assert v1_ops[1:3] == [v2.RandomGrayscale, v2.ColorJitter]
