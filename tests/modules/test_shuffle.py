"""ShuffleAttention: the official formula (float64, forward and gradients), parameters, errors."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.modules.shuffle import ShuffleAttention, channel_shuffle, sa_param_count
from conftest import randomize_


def sa_reference(m: ShuffleAttention, x: torch.Tensor) -> torch.Tensor:
    """The official ``sa_layer.forward`` step by step, GroupNorm written out."""
    b, c, h, w = x.shape
    g = m.groups
    x = x.reshape(b * g, -1, h, w)
    x_0, x_1 = x.chunk(2, dim=1)
    xn = x_0.sum((2, 3), keepdim=True) / (h * w)
    xn = x_0 / (1 + torch.exp(-(m.cweight * xn + m.cbias)))
    mean = x_1.sum((2, 3), keepdim=True) / (h * w)
    var = (x_1 - mean).square().sum((2, 3), keepdim=True) / (h * w)
    xs = (x_1 - mean) / torch.sqrt(var + m.gn.eps)
    xs = xs * m.gn.weight.view(1, -1, 1, 1) + m.gn.bias.view(1, -1, 1, 1)
    xs = x_1 / (1 + torch.exp(-(m.sweight * xs + m.sbias)))
    out = torch.cat([xn, xs], dim=1).reshape(b, -1, h, w)
    return out.reshape(b, 2, -1, h, w).permute(0, 2, 1, 3, 4).reshape(b, -1, h, w)


@pytest.mark.parametrize(("channels", "groups"), [(128, 64), (48, 4), (16, 8), (8, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_official_forward_and_gradients(channels, groups, channels_last) -> None:
    m = randomize_(ShuffleAttention(channels, groups=groups)).double()
    for size in ((5, 7), (1, 1), (2, 3)):
        x = torch.randn(3, channels, *size, dtype=torch.float64)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, ref = m(x1), sa_reference(m, x2)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        params = list(m.parameters())
        r = torch.randn_like(y)
        got = torch.autograd.grad(y, [x1, *params], r)
        want = torch.autograd.grad(ref, [x2, *params], r)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)
        if channels_last:
            assert y.is_contiguous(memory_format=torch.channels_last)


def test_official_parameters_initialisation_and_names() -> None:
    m = ShuffleAttention(256)  # SA-ResNet-50 conv2_x: planes * 4 = 256, 64 groups
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "cweight": (1, 2, 1, 1),
        "cbias": (1, 2, 1, 1),
        "sweight": (1, 2, 1, 1),
        "sbias": (1, 2, 1, 1),
        "gn.weight": (2,),
        "gn.bias": (2,),
    }
    assert m.gn.num_groups == m.gn.num_channels == 2 and m.gn.eps == 1e-5
    assert (m.cweight == 0).all() and (m.cbias == 1).all()
    assert (m.sweight == 0).all() and (m.sbias == 1).all()
    # at initialisation every gate is sigmoid(1): a shuffle of x * sigmoid(1)
    x = torch.randn(2, 256, 4, 3)
    torch.testing.assert_close(m(x), channel_shuffle(x, 2) * torch.sigmoid(torch.tensor(1.0)))


@pytest.mark.parametrize("channels", [128, 256, 512, 1024, 2048])
def test_param_count_is_three_c_over_g(channels) -> None:
    m = ShuffleAttention(channels)
    assert sa_param_count(channels) == 3 * channels // 64 == sum(p.numel() for p in m.parameters())
    assert sa_param_count(channels, groups=8) == sum(
        p.numel() for p in ShuffleAttention(channels, groups=8).parameters()
    )


def test_sa_resnet50_adds_the_official_parameter_count() -> None:
    """SA in every Bottleneck of ResNet-50 (3, 4, 6, 3 blocks of 256, 512, 1024, 2048): 3C/64
    each, 708 parameters in total; the official README's 25.56 M is the ResNet-50's 25.557 M."""
    tv = pytest.importorskip("torchvision")
    plain = tv.models.resnet50()
    base = sum(p.numel() for p in plain.parameters())
    model = attnzoo.models.attach(plain, "sa")
    added = sum(p.numel() for p in model.parameters()) - base
    assert added == sum(n * 3 * c // 64 for n, c in ((3, 256), (4, 512), (6, 1024), (3, 2048)))
    assert round((base + added) / 1e6, 2) == 25.56


def test_channel_shuffle_permutation() -> None:
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    assert channel_shuffle(x, 3).flatten().tolist() == [0, 2, 4, 1, 3, 5]


def test_attention_maps_reproduce_forward() -> None:
    m = randomize_(ShuffleAttention(32, groups=4)).eval()
    x = torch.randn(2, 32, 5, 6)
    maps = m.attention_maps(x)
    assert maps["gate"].shape == (2, 32, 5, 6)
    assert maps["channel"].shape == (2, 32) and maps["spatial"].shape == (2, 5, 6)
    torch.testing.assert_close(channel_shuffle(x * maps["gate"], 2), m(x))
    # the channel halves (first 4 of every 8 channels) have one gate value per channel
    halves = maps["gate"].unflatten(1, (4, 2, 4))
    assert torch.equal(halves[:, :, 0], halves[:, :, 0, :, :1, :1].expand_as(halves[:, :, 0]))
    torch.testing.assert_close(maps["spatial"], halves[:, :, 1].mean((1, 2)))


@pytest.mark.parametrize(("channels", "groups"), [(64, 64), (96, 64), (30, 4)])
def test_channels_not_divisible_by_two_groups_raise(channels, groups) -> None:
    with pytest.raises(
        ValueError,
        match=rf"ShuffleAttention: channels \({channels}\) must be "
        rf"divisible by 2 \* groups \({2 * groups}\)",
    ):
        ShuffleAttention(channels, groups=groups)
    with pytest.raises(ValueError, match="ShuffleAttention"):
        sa_param_count(channels, groups=groups)


def test_bad_groups_raise() -> None:
    with pytest.raises(ValueError, match="ShuffleAttention: groups"):
        ShuffleAttention(128, groups=0)
    with pytest.raises(TypeError, match="ShuffleAttention: groups"):
        ShuffleAttention(128, groups=2.0)
