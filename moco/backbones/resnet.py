"""ResNet feature extractors built from torchvision's own ResNet machinery."""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

RESNET_ARCHS: dict[str, tuple[type[BasicBlock | Bottleneck], list[int]]] = {
    "resnet10": (BasicBlock, [1, 1, 1, 1]),  # half resnet18's cost: more epochs per CPU-minute
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


class Normalize(nn.Module):
    """Per-channel (x - mean) / std, so an exported encoder takes raw [0, 1] images."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class WidthResNet(ResNet):
    """torchvision ResNet with every channel width scaled by `width / 64`.

    torchvision hard-codes 64 stem channels and planes 64/128/256/512. Scaling `planes` where
    `_make_layer` receives them keeps torchvision's blocks, weight init and state_dict names, so
    width=64 is exactly torchvision's network.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        *,
        width: int,
        small_stem: bool,
        stem_stride: int,
        in_channels: int,
        norm_layer: Callable[[int], nn.Module] | None,
    ) -> None:
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        if stem_stride not in (1, 2) or (stem_stride == 2 and not small_stem):
            raise ValueError(
                f"stem_stride must be 1 or 2, and 2 needs the small stem (got {stem_stride}, "
                f"small_stem={small_stem}); the ImageNet stem is always 7x7 stride 2"
            )
        self.width = width  # read by _make_layer during ResNet.__init__
        super().__init__(block, layers, norm_layer=norm_layer)
        # Replace the stem: ResNet built it for 3 channels and 64 widths.
        # The small stem (3x3, no max-pool) suits <= 64 px inputs: stride 1 keeps the resolution,
        # stride 2 halves it (28 -> 14 px maps), 4x cheaper per image with less lost than the
        # ImageNet stem's 4x reduction (bench/RESULTS.md).
        if small_stem:
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stem_stride, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = self._norm_layer(width)
        self.fc = nn.Identity()

    def _make_layer(
        self,
        block: type[BasicBlock | Bottleneck],
        planes: int,
        blocks: int,
        stride: int = 1,
        dilate: bool = False,
    ) -> nn.Sequential:
        if planes == 64:  # layer1: its input is the scaled stem, not ResNet's fixed 64 channels
            self.inplanes = self.width
        return super()._make_layer(block, planes * self.width // 64, blocks, stride, dilate)


def build_resnet(
    name: str = "resnet18",
    *,
    width: int = 64,
    small_stem: bool = True,
    stem_stride: int = 1,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    norm_layer: Callable[[int], nn.Module] | None = None,
) -> tuple[nn.Module, int]:
    """Return (extractor mapping [N, C, H, W] to flat [N, feat_dim] features, feat_dim).

    `stem_stride` (1 or 2) is the small stem's stride; the ImageNet stem (small_stem=False) is
    fixed at 7x7 stride 2 + max-pool. `norm_layer` is forwarded to torchvision (e.g. a
    SplitBatchNorm partial for shuffle BN).
    With mean/std the extractor normalises its own input, so it takes float images in [0, 1].
    """
    if name not in RESNET_ARCHS:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(RESNET_ARCHS)}")
    block, layers = RESNET_ARCHS[name]
    net = WidthResNet(
        block,
        layers,
        width=width,
        small_stem=small_stem,
        stem_stride=stem_stride,
        in_channels=in_channels,
        norm_layer=norm_layer,
    )
    feat_dim = 512 * width // 64 * block.expansion
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None and std is not None:
        return nn.Sequential(Normalize(mean, std), net), feat_dim
    return net, feat_dim
