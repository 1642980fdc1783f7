"""Backbone shapes, and that width=64 is exactly torchvision's ResNet."""

import pytest
import torch
import torchvision
from torch import nn

from moco import projection_head
from moco.backbones import build_resnet


@pytest.mark.parametrize(
    ("name", "width", "small_stem", "in_channels", "feat_dim"),
    [
        ("resnet18", 64, True, 3, 512),
        ("resnet18", 64, False, 1, 512),
        ("resnet18", 32, True, 1, 256),
        ("resnet18", 32, False, 3, 256),
        ("resnet18", 16, True, 3, 128),
        ("resnet10", 16, True, 1, 128),
        ("resnet50", 16, True, 1, 512),
        ("resnet50", 16, False, 3, 512),
    ],
)
def test_output_dims(
    name: str, width: int, small_stem: bool, in_channels: int, feat_dim: int
) -> None:
    net, dim = build_resnet(name, width=width, small_stem=small_stem, in_channels=in_channels)
    assert dim == feat_dim
    assert net(torch.rand(2, in_channels, 32, 32)).shape == (2, feat_dim)


def test_resnet50_full_width_dim() -> None:
    net, dim = build_resnet("resnet50", small_stem=False)
    assert dim == 2048
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 2048)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_width_64_standard_stem_is_torchvision_resnet(name: str) -> None:
    net, _ = build_resnet(name, small_stem=False)
    reference = getattr(torchvision.models, name)(weights=None)
    ref_shapes = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in net.state_dict().items()} == ref_shapes
    assert isinstance(net, torchvision.models.ResNet)


def test_small_stem_replaces_conv_and_drops_maxpool() -> None:
    net, _ = build_resnet("resnet18", width=16, small_stem=True, in_channels=1)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert net.conv1.in_channels == 1
    assert isinstance(net.maxpool, nn.Identity)
    assert isinstance(net.fc, nn.Identity)


@pytest.mark.parametrize(
    ("small_stem", "stem_stride", "layer1_size"),
    [(True, 1, 28), (True, 2, 14), (False, 1, 7)],  # small, small stride 2, ImageNet stem
)
def test_stem_sets_layer1_map_size(small_stem: bool, stem_stride: int, layer1_size: int) -> None:
    net, dim = build_resnet(
        "resnet18", width=16, small_stem=small_stem, stem_stride=stem_stride, in_channels=1
    )
    x = torch.rand(2, 1, 28, 28)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    assert net.layer1(stem(x)).shape == (2, 16, layer1_size, layer1_size)
    assert net(x).shape == (2, dim)


def test_stride_two_stem_keeps_the_small_stems_weights() -> None:
    """Only the stride differs, so the two small stems share state_dict shapes and names."""
    one, _ = build_resnet("resnet18", width=16, stem_stride=1, in_channels=1)
    two, _ = build_resnet("resnet18", width=16, stem_stride=2, in_channels=1)
    assert two.conv1.kernel_size == (3, 3) and two.conv1.stride == (2, 2)
    assert isinstance(two.maxpool, nn.Identity)
    assert {k: v.shape for k, v in one.state_dict().items()} == {
        k: v.shape for k, v in two.state_dict().items()
    }


def test_normalisation_layer_makes_extractor_take_unit_range_images() -> None:
    torch.manual_seed(0)
    mean, std = [0.2, 0.4, 0.6], [0.5, 0.25, 0.125]
    with_norm, _ = build_resnet("resnet18", width=8, mean=mean, std=std)
    plain, _ = build_resnet("resnet18", width=8)
    plain.load_state_dict(with_norm[1].state_dict())
    with_norm.eval(), plain.eval()
    x = torch.rand(2, 3, 16, 16)
    manual = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(with_norm(x), plain(manual))
    assert {"0.mean", "0.std"} <= set(with_norm.state_dict())


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        build_resnet("vgg11")
    with pytest.raises(ValueError):
        build_resnet("resnet18", mean=[0.5])
    with pytest.raises(ValueError, match="small stem"):
        build_resnet("resnet18", small_stem=False, stem_stride=2)
    with pytest.raises(ValueError, match="stem_stride"):
        build_resnet("resnet18", stem_stride=3)


def test_projection_heads() -> None:
    linear = projection_head(64, 16, mlp=False)
    assert isinstance(linear, nn.Linear) and linear.out_features == 16
    mlp = projection_head(64, 16)
    assert [type(m) for m in mlp] == [nn.Linear, nn.ReLU, nn.Linear]
    assert mlp[0].out_features == 64
    assert projection_head(64, 16, hidden_dim=32)(torch.rand(3, 64)).shape == (3, 16)


def test_resnet10_has_one_basic_block_per_stage() -> None:
    net, _ = build_resnet("resnet10", width=16, in_channels=1)
    assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    blocks = [n for n in net.state_dict() if n.endswith("conv1.weight") and n.startswith("layer")]
    assert len(blocks) == 4
