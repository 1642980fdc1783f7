"""MoCo's augmentation recipes on uint8 image tensors [C, H, W] (C = 1 or 3).

The recipes end in float32 in [0, 1] without Normalize: the backbone normalises its input.

Two implementations share one `AugmentRecipe`: the per-sample torchvision v2 pipelines (for a
DataLoader `transform`) and `BatchMoCoAugment`, which draws the same random ops for a whole
uint8 batch [B, C, H, W] at once on the batch's device. Per sample, the ops on 28 px images
cost ~0.65 ms of Python overhead per crop; batched, a few microseconds per image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align
from torchvision.transforms import v2

Transform = Callable[[Tensor], Tensor]

_ATTEMPTS = 10  # RandomResizedCrop.get_params tries this many boxes before the central crop
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
_JITTER_IDENTITY = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation factors; hue shift


@dataclass(frozen=True)
class AugmentRecipe:
    """A MoCo recipe's random ops and ranges, read by both implementations so they cannot drift.

    `jitter` is ColorJitter's (brightness, contrast, saturation, hue); `blur_kernel` 0 is no blur.
    """

    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    grayscale_first: bool = False  # v1 greys before jittering, v2 after
    blur_kernel: int = 0
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_p: float = 0.5

    @classmethod
    def v1(cls) -> AugmentRecipe:
        """MoCo v1 (official main_moco.py): grayscale before an always-on, strong-hue jitter."""
        return cls(jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, grayscale_first=True)

    @classmethod
    def v2(cls, image_size: int, blur: bool | None = None) -> AugmentRecipe:
        """MoCo v2 (--aug-plus); blur defaults to off for images <= 64 px, where it mostly erases
        the little detail there is (the CIFAR demo has no blur). PIL's blur has no kernel size:
        like SimCLR, use about 10% of the image, odd, at least 3."""
        if blur is None:
            blur = image_size > 64
        return cls(blur_kernel=max(3, int(0.1 * image_size) // 2 * 2 + 1) if blur else 0)

    @classmethod
    def named(cls, name: str, image_size: int, blur: bool | None = None) -> AugmentRecipe:
        if name == "v1":
            return cls.v1()
        if name == "v2":
            return cls.v2(image_size, blur)
        raise ValueError(f"unknown MoCo augmentation recipe {name!r}: expected 'v1' or 'v2'")


def _per_sample(recipe: AugmentRecipe, image_size: int) -> Transform:
    r = recipe
    jitter: v2.Transform = v2.ColorJitter(*r.jitter)
    if r.jitter_p < 1:
        jitter = v2.RandomApply([jitter], p=r.jitter_p)
    gray = v2.RandomGrayscale(p=r.grayscale_p)
    blur = v2.GaussianBlur(r.blur_kernel, sigma=r.blur_sigma) if r.blur_kernel else None
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=r.scale, ratio=r.ratio, antialias=True),
            *([gray, jitter] if r.grayscale_first else [jitter, gray]),
            *([v2.RandomApply([blur], p=r.blur_p)] if blur else []),
            v2.RandomHorizontalFlip(r.flip_p),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def moco_v1_transform(image_size: int) -> Transform:
    """MoCo v1 (official main_moco.py): grayscale before an always-on, strong-hue colour jitter."""
    return _per_sample(AugmentRecipe.v1(), image_size)


def moco_v2_transform(image_size: int, blur: bool | None = None) -> Transform:
    """MoCo v2 (official main_moco.py --aug-plus); see `AugmentRecipe.v2` for the blur default."""
    return _per_sample(AugmentRecipe.v2(image_size, blur), image_size)


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


# --- batched --------------------------------------------------------------------------------


class _Draws(NamedTuple):
    """One batch's random parameters, one row per image (identity values where an op is off)."""

    boxes: Tensor  # [B, 4] crop x1, y1, x2, y2 in pixels (edges)
    jitter: Tensor  # [B, 4] brightness, contrast, saturation factors and hue shift
    gray: Tensor  # [B] saturation factor of RandomGrayscale: 0 greys, 1 keeps
    sigma: Tensor  # [B] blur sigma, 0 for no blur
    flip: Tensor  # [B] 1 flips

    def to(self, device: torch.device) -> _Draws:
        """One host-to-device copy for all of them."""
        packed = torch.cat([self.boxes, self.jitter, torch.stack(self[2:], 1)], 1)
        packed = packed.to(device=device, dtype=torch.float32, non_blocking=True)
        boxes, jitter, rest = packed.split([4, 4, 3], 1)
        return _Draws(boxes, jitter, *rest.unbind(1))


class BatchMoCoAugment:
    """A MoCo recipe on a whole uint8 batch [B, C, H, W] (C = 1 or 3) -> float32 [B, C, S, S].

    Every image gets its own random crop, jitter factors, grayscale, blur and flip, drawn like
    torchvision's per-sample transforms; only the order of the jitter ops is drawn once per batch.
    The parameters are drawn on `generator`'s device (the default CPU generator when None; a CPU
    generator avoids a device sync for the jitter order), then the pixels are processed on the
    batch's device. Differences from the per-sample pipeline, by design:
    - crops are resampled with `roi_align(aligned=True)` rather than `grid_sample`: it takes one
      box per image directly in pixel coordinates, and its adaptive sampling (ceil(box/size)^2
      bilinear taps averaged per output pixel) is a box-filter antialias when downscaling, while
      upsampling (the usual case at 28-32 px) is exactly bilinear `resize(antialias=False)`;
    - everything runs in float32, with no rounding to uint8 between ops;
    - hue is rotated with a vectorised RGB -> HSV -> RGB (per-image shift), same maths as
      torchvision's `adjust_hue`.
    """

    def __init__(
        self,
        image_size: int,
        recipe: Literal["v1", "v2"] | AugmentRecipe = "v2",
        blur: bool | None = None,
    ) -> None:
        if isinstance(recipe, str):
            recipe = AugmentRecipe.named(recipe, image_size, blur)
        self.size, self.recipe = image_size, recipe

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"expected a uint8 batch [B, 1 or 3, H, W], got {images.dtype} {list(images.shape)}"
            )
        r = self.recipe
        draws, order = self._draw(images.shape, generator)
        draws = draws.to(images.device)
        x = self._crop(images, draws.boxes)
        if r.grayscale_first:
            x = _grayscale(x, draws.gray)
        x = _color_jitter(x, draws.jitter, order)
        if not r.grayscale_first:
            x = _grayscale(x, draws.gray)
        if r.blur_kernel:
            x = _gaussian_blur(x, draws.sigma, r.blur_kernel)
        return torch.where(draws.flip.bool().view(-1, 1, 1, 1), x.flip(-1), x)

    def _crop(self, images: Tensor, boxes: Tensor) -> Tensor:
        index = torch.arange(len(images), device=images.device, dtype=boxes.dtype)
        rois = torch.cat([index.unsqueeze(1), boxes], 1)
        size = (self.size, self.size)
        crops = roi_align(images.float(), rois, size, sampling_ratio=-1, aligned=True)
        return crops.mul_(1 / 255).clamp_(0, 1)

    def _draw(
        self, shape: torch.Size, generator: torch.Generator | None
    ) -> tuple[_Draws, list[int]]:
        r = self.recipe
        b, _, h, w = shape
        device = generator.device if generator is not None else torch.device("cpu")
        boxes = random_resized_crop_boxes(
            b, h, w, scale=r.scale, ratio=r.ratio, generator=generator
        )
        u = torch.rand(b, 9, generator=generator, device=device)
        on, *factors, gray, blur_on, sigma, flip = u.unbind(1)
        on = on < r.jitter_p
        lows = [max(0.0, 1 - f) for f in r.jitter[:3]] + [-r.jitter[3]]
        highs = [1 + f for f in r.jitter[:3]] + [r.jitter[3]]
        jitter = torch.stack(
            [
                torch.where(on, lo + (hi - lo) * f, same)
                for lo, hi, f, same in zip(lows, highs, factors, _JITTER_IDENTITY, strict=True)
            ],
            1,
        )
        lo, hi = r.blur_sigma
        draws = _Draws(
            boxes=boxes,
            jitter=jitter,
            gray=(gray >= r.grayscale_p).float(),
            sigma=torch.where(blur_on < r.blur_p, lo + (hi - lo) * sigma, 0),
            flip=(flip < r.flip_p).float(),
        )
        order = torch.randperm(4, generator=generator, device=device).tolist()
        return draws, order


class BatchTwoCrops:
    """Two independent batched augmentations: the query views and the key views."""

    def __init__(self, base: BatchMoCoAugment) -> None:
        self.base = base

    def __call__(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        return self.base(images, generator), self.base(images, generator)


def random_resized_crop_boxes(
    batch: int,
    height: int,
    width: int,
    *,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> Tensor:
    """RandomResizedCrop.get_params for a batch, on `generator`'s device: float64 [B, 4] integer
    boxes x1, y1, x2, y2 (pixel edges). Each image takes the first of 10 candidate (area,
    log-ratio) boxes that fits, else torchvision's central fallback."""
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(batch, 2 * _ATTEMPTS + 2, generator=generator, device=device)
    areas, log_ratios, offsets = u.double().split([_ATTEMPTS, _ATTEMPTS, 2], 1)
    target = height * width * (scale[0] + (scale[1] - scale[0]) * areas)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * log_ratios)
    ws, hs = torch.sqrt(target * aspect).round(), torch.sqrt(target / aspect).round()
    fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
    first = fits.int().argmax(1, keepdim=True)  # the first fitting attempt (0 when none)
    fallback_w, fallback_h = _central_crop(height, width, ratio)
    found = fits.any(1)
    w = torch.where(found, ws.gather(1, first).squeeze(1), fallback_w)
    h = torch.where(found, hs.gather(1, first).squeeze(1), fallback_h)
    y = torch.where(found, (offsets[:, 0] * (height - h + 1)).floor(), (height - h) // 2)
    x = torch.where(found, (offsets[:, 1] * (width - w + 1)).floor(), (width - w) // 2)
    return torch.stack([x, y, x + w, y + h], 1)


def _central_crop(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """RandomResizedCrop's fallback box size (width, height) when no attempt fits."""
    if width / height < min(ratio):
        return width, round(width / min(ratio))
    if width / height > max(ratio):
        return round(height * max(ratio)), height
    return width, height


def _gray(x: Tensor) -> Tensor:
    """Luma [B, 1, H, W] with torchvision's weights (a 1-channel image is its own)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor | float, factor: Tensor) -> Tensor:
    """torchvision's _blend for float images, with a per-image factor [B]."""
    factor = factor.view(-1, 1, 1, 1)
    return (factor * x + (1 - factor) * other).clamp_(0, 1)


def _grayscale(x: Tensor, keep: Tensor) -> Tensor:
    """RandomGrayscale: images with keep == 0 become their luma on every channel."""
    return x if x.shape[1] == 1 else _blend(x, _gray(x), keep)


def _color_jitter(x: Tensor, factors: Tensor, order: list[int]) -> Tensor:
    """ColorJitter with per-image factors [B, 4] (identity rows for images it skips), in `order`.
    Saturation and hue are identities for 1-channel images, as in torchvision."""
    colour = x.shape[1] == 3
    for index in order:
        f = factors[:, index]
        if index == 0:
            x = _blend(x, 0.0, f)
        elif index == 1:
            x = _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), f)
        elif index == 2 and colour:
            x = _blend(x, _gray(x), f)
        elif index == 3 and colour:
            x = _shift_hue(x, f)
    return x


def _shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    """adjust_hue with a per-image shift [B] (in turns): RGB -> hue, rotate, back to RGB keeping
    value and chroma (the closed form f(n) = V - C * clamp(min(k, 4 - k), 0, 1))."""
    maxc, minc = x.amax(1), x.amin(1)
    chroma = maxc - minc
    rc, gc, bc = ((maxc.unsqueeze(1) - x) / chroma.clamp_min(1e-12).unsqueeze(1)).unbind(1)
    r, g, _ = x.unbind(1)
    hue6 = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2 + rc - bc, 4 + gc - rc))
    hue6 = (hue6 + 6 * shift.view(-1, 1, 1)).remainder(6).unsqueeze(1)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)
    k = (n + hue6).remainder(6)
    return maxc.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def _gaussian_blur(x: Tensor, sigma: Tensor, kernel: int) -> Tensor:
    """GaussianBlur with a per-image sigma [B] (0: a delta kernel, the image unchanged), as a
    separable grouped convolution with torchvision's reflect padding."""
    b, c, h, w = x.shape
    d = torch.arange(kernel, device=x.device, dtype=x.dtype) - kernel // 2
    weights = torch.exp(-(d**2) / (2 * sigma.clamp_min(1e-6).unsqueeze(1) ** 2))
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B * C, k]
    pad = kernel // 2
    flat = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, weights.view(b * c, 1, kernel, 1), groups=b * c)
    flat = F.conv2d(flat, weights.view(b * c, 1, 1, kernel), groups=b * c)
    return flat.view(b, c, h, w)
