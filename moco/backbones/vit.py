"""Vision Transformer feature extractors as MoCo v3 trains them (moco-v3's vits.py).

Built from torchvision's transformer Encoder. Two choices of the paper make ViT training stable:
the patch projection stays at its random initialisation (no gradient reaches it: the
"frozen random patch projection" of Chen, Xie, He 2021, sec. 4.2), and the position embedding
is a fixed 2-D sin-cos table rather than a learned one.
"""

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.vision_transformer import Encoder

from moco.backbones.resnet import Normalize

# name -> (width, depth, heads); MLP hidden width is 4x. vit_small has 12 heads as in moco-v3
# (DeiT-S has 6); vit_tiny is DeiT-Ti's shape, for CPU runs on small images.
VIT_ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 12),
    "vit_base": (768, 12, 12),
}


def sincos_position_embedding(grid: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """[1, 1 + grid*grid, dim]: a zero row for [CLS], then for the patch at (row, col)
    sin(row*w), cos(row*w), sin(col*w), cos(col*w), where w_i = temperature^(-i / (dim/4))."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs a width divisible by 4: {dim}")
    omega = temperature ** -(torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    angles_r = rows.flatten()[:, None] * omega  # patches in row-major order, as flatten(2) yields
    angles_c = cols.flatten()[:, None] * omega
    table = torch.cat([angles_r.sin(), angles_r.cos(), angles_c.sin(), angles_c.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=table.dtype), table]).float().unsqueeze(0)


class ViT(nn.Module):
    """Patchify -> prepend [CLS] -> transformer encoder -> the [CLS] feature (after the final
    LayerNorm; no head). `feat_dim` is the feature width."""

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        in_channels: int,
        width: int,
        depth: int,
        heads: int,
    ) -> None:
        super().__init__()
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(
                f"image_size {image_size} is not a multiple of patch_size {patch_size}; "
                "pick one that divides it (e.g. 4 or 7 for 28 px, 16 for 224 px)"
            )
        grid = image_size // patch_size
        self.feat_dim = width
        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.encoder = Encoder(
            grid * grid + 1, depth, heads, width, 4 * width, dropout=0.0, attention_dropout=0.0
        )
        # Swap the encoder's learned position embedding for the fixed table: a buffer, so it is
        # saved and moved with the model but never optimised.
        del self.encoder.pos_embedding
        self.encoder.register_buffer("pos_embedding", sincos_position_embedding(grid, width))
        self._init_weights(in_channels * patch_size * patch_size)
        self.patch_embed.requires_grad_(False)  # the frozen random patch projection

    @torch.no_grad()
    def _init_weights(self, patch_fan_in: int) -> None:
        """moco-v3's init: Xavier-uniform Linear weights with zero biases, Q, K and V each as
        its own square layer, Xavier-uniform patch projection, [CLS] ~ N(0, 1e-6)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.MultiheadAttention):  # in_proj_weight stacks Q, K, V: [3D, D]
                bound = math.sqrt(6.0 / (2 * m.embed_dim))
                nn.init.uniform_(m.in_proj_weight, -bound, bound)
                nn.init.zeros_(m.in_proj_bias)
        bound = math.sqrt(6.0 / (patch_fan_in + self.feat_dim))
        nn.init.uniform_(self.patch_embed.weight, -bound, bound)
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [N, patches, D], row-major
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.encoder(x)[:, 0]


def build_vit(
    name: str,
    *,
    image_size: int,
    patch_size: int,
    in_channels: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> tuple[nn.Module, int]:
    """Return (Normalize -> ViT, feat_dim): like the ResNet builder, with mean/std it takes raw
    [0, 1] images; without (None), already-normalised input."""
    if name not in VIT_ARCHS:
        raise ValueError(f"unknown ViT {name!r}; choose from {sorted(VIT_ARCHS)}")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    width, depth, heads = VIT_ARCHS[name]
    vit = ViT(
        image_size=image_size,
        patch_size=patch_size,
        in_channels=in_channels,
        width=width,
        depth=depth,
        heads=heads,
    )
    if mean is None or std is None:
        return vit, vit.feat_dim
    if len(mean) != in_channels:
        raise ValueError(f"mean/std have {len(mean)} channels but in_channels is {in_channels}")
    return nn.Sequential(Normalize(mean, std), vit), vit.feat_dim
