"""The MoCo v3 ViT: output shape, fixed sin-cos position embedding, frozen patch projection."""

import math

import numpy as np
import pytest
import torch

from moco.backbones import BackboneSpec, build_vit
from moco.backbones.vit import ViT


def _tiny(in_channels: int = 1, patch_size: int = 7) -> torch.nn.Module:
    mean, std = (0.5,) * in_channels, (0.25,) * in_channels
    net, feat_dim = build_vit(
        "vit_tiny",
        image_size=28,
        patch_size=patch_size,
        in_channels=in_channels,
        mean=mean,
        std=std,
    )
    assert feat_dim == 192
    return net


@pytest.mark.parametrize(("in_channels", "patch_size"), [(1, 7), (3, 4)])
def test_cls_feature_shape_and_normalize_in_front(in_channels: int, patch_size: int) -> None:
    torch.manual_seed(0)
    net = _tiny(in_channels, patch_size).eval()
    x = torch.rand(3, in_channels, 28, 28)
    out = net(x)
    assert out.shape == (3, 192)
    # the first module normalises raw [0, 1] pixels; the ViT behind it sees (x - mean) / std
    torch.testing.assert_close(out, net[1]((x - 0.5) / 0.25))
    assert net[1].encoder.pos_embedding.shape == (1, 1 + (28 // patch_size) ** 2, 192)


def test_spec_builds_the_vit() -> None:
    spec = BackboneSpec("vit_small", 3, 32, (0.5,) * 3, (0.2,) * 3, patch_size=16)
    net, feat_dim = spec.build()
    assert feat_dim == 384 and isinstance(net[1], ViT)
    assert net[1].encoder.layers[0].self_attention.num_heads == 12  # moco-v3's ViT-S
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 384)
    assert BackboneSpec.from_dict(spec.to_dict()) == spec


def test_without_mean_and_std_the_vit_takes_normalised_input() -> None:
    net, _ = build_vit("vit_tiny", image_size=28, patch_size=7, in_channels=1, mean=None, std=None)
    assert isinstance(net, ViT)
    with pytest.raises(ValueError, match="both mean and std"):
        build_vit("vit_tiny", image_size=28, patch_size=7, in_channels=1, mean=(0.5,), std=None)


def test_patch_size_must_divide_image_size() -> None:
    with pytest.raises(ValueError, match="not a multiple of patch_size 5"):
        _tiny(patch_size=5)


def test_position_embedding_is_the_fixed_2d_sincos_table() -> None:
    vit = _tiny(patch_size=7)[1]  # 4 x 4 grid
    pe = vit.encoder.pos_embedding[0].numpy()
    dim, quarter = 192, 48
    assert np.all(pe[0] == 0)  # [CLS] has no position
    for token in (1, 6, 16):  # patch (row, col) = divmod(token - 1, 4)
        row, col = divmod(token - 1, 4)
        expected = []
        for fn, pos in ((math.sin, row), (math.cos, row), (math.sin, col), (math.cos, col)):
            expected += [fn(pos / 10000 ** (i / quarter)) for i in range(quarter)]
        np.testing.assert_allclose(pe[token], expected, atol=1e-6)
    assert len(expected) == dim
    names = [n for n, _ in vit.named_parameters()]
    assert not any("pos_embedding" in n for n in names)  # a buffer: never optimised
    assert "encoder.pos_embedding" in vit.state_dict()  # but saved with the encoder


def test_patch_projection_is_frozen_and_the_rest_trains() -> None:
    torch.manual_seed(0)
    net = _tiny(patch_size=7)
    vit = net[1]
    before = {n: p.detach().clone() for n, p in vit.named_parameters()}
    pe_before = vit.encoder.pos_embedding.clone()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    net(torch.rand(4, 1, 28, 28)).pow(2).sum().backward()
    opt.step()

    assert not vit.patch_embed.weight.requires_grad and not vit.patch_embed.bias.requires_grad
    assert vit.patch_embed.weight.grad is None and vit.patch_embed.bias.grad is None
    for n, p in vit.named_parameters():
        if n.startswith("patch_embed."):
            assert torch.equal(p, before[n]), n  # weight decay did not touch it either
        else:
            assert not torch.equal(p, before[n]), n
    assert torch.equal(vit.encoder.pos_embedding, pe_before)
