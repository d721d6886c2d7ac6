"""BAM: reference formula (sum and product, train and eval, forward and gradients), the official
code's differences (product, square-only pooling), parameter counts, errors, attention maps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.modules.bam import BAM, bam_param_count
from conftest import assert_matches_reference, randomize_

EPS = 1e-5


def bn_ref(z, bn, training, dims):
    """BatchNorm written out: batch statistics over ``dims`` (biased variance) or running ones."""
    shape = [1, -1] + [1] * (z.dim() - 2)
    if training:
        mean = z.mean(dims, keepdim=True)
        var = ((z - mean) ** 2).mean(dims, keepdim=True)
    else:
        mean, var = bn.running_mean.view(shape), bn.running_var.view(shape)
    return (z - mean) / torch.sqrt(var + EPS) * bn.weight.view(shape) + bn.bias.view(shape)


def bam_reference(m: BAM, x, training, combine):
    """F + F * sigmoid(M_c + M_s) (or M_c * M_s), with the layers' weights used explicitly."""
    c = m.channel_att.gate_c
    z = x.sum((2, 3)) / (x.shape[2] * x.shape[3])
    h = z @ c.gate_c_fc_0.weight.t() + c.gate_c_fc_0.bias
    h = torch.clamp(bn_ref(h, c.gate_c_bn_1, training, (0,)), min=0)
    m_c = (h @ c.gate_c_fc_final.weight.t() + c.gate_c_fc_final.bias)[:, :, None, None]
    s = m.spatial_att.gate_s
    convs = [s.gate_s_conv_reduce0] + [s.get_submodule(f"gate_s_conv_di_{i}") for i in range(2)]
    bns = [s.gate_s_bn_reduce0] + [s.get_submodule(f"gate_s_bn_di_{i}") for i in range(2)]
    t = x
    for conv, bn in zip(convs, bns):
        t = F.conv2d(t, conv.weight, conv.bias, padding=conv.padding, dilation=conv.dilation)
        t = torch.clamp(bn_ref(t, bn, training, (0, 2, 3)), min=0)
    m_s = F.conv2d(t, s.gate_s_conv_final.weight, s.gate_s_conv_final.bias)
    logits = m_c + m_s if combine == "sum" else m_c * m_s
    return x + x / (1 + torch.exp(-logits))


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("combine", ["sum", "product"])
def test_matches_reference_forward_and_gradients(combine, train) -> None:
    m = randomize_(BAM(32, combine=combine)).double().train(train)
    x = torch.randn(3, 32, 6, 11, dtype=torch.float64)  # non-square
    assert_matches_reference(m, lambda t: bam_reference(m, t, train, combine), x)


def test_official_code_differences() -> None:
    """The official forward combines by product (preset "official-code"); its squeeze
    ``avg_pool2d(x, H)`` only works on square maps."""
    m = randomize_(BAM(32)).eval()
    official = randomize_(attnzoo.create("bam", 32, preset="official-code")).eval()
    official.load_state_dict(m.state_dict())
    x = torch.randn(2, 32, 7, 7)
    with torch.no_grad():
        assert not torch.allclose(m(x), official(x))
        pooled = F.avg_pool2d(x, x.size(2), stride=x.size(2)).flatten(1)
        torch.testing.assert_close(pooled, x.mean((2, 3)))
    wide = torch.randn(2, 32, 5, 12)
    assert F.avg_pool2d(wide, 5, stride=5).flatten(1).shape[1] != 32  # official: wrong width
    assert m(wide).shape == wide.shape


def test_official_layer_names_for_state_dicts() -> None:
    keys = set(BAM(64).state_dict())
    for key in (
        "channel_att.gate_c.gate_c_fc_0.weight",
        "channel_att.gate_c.gate_c_bn_1.running_var",
        "channel_att.gate_c.gate_c_fc_final.bias",
        "spatial_att.gate_s.gate_s_conv_reduce0.weight",
        "spatial_att.gate_s.gate_s_conv_di_1.weight",
        "spatial_att.gate_s.gate_s_bn_di_1.bias",
        "spatial_att.gate_s.gate_s_conv_final.weight",
    ):
        assert key in keys, key
    conv = BAM(64).spatial_att.gate_s.gate_s_conv_di_0
    assert conv.dilation == (4, 4) and conv.padding == (4, 4) and conv.out_channels == 4


@pytest.mark.parametrize(
    "kwargs", [{}, {"reduction": 8}, {"dilation_conv_num": 0}, {"dilation_val": 2}]
)
@pytest.mark.parametrize("channels", [1, 64, 256, 1024])
def test_param_count_closed_form(channels, kwargs) -> None:
    m = BAM(channels, **kwargs)
    h = max(1, channels // kwargs.get("reduction", 16))
    n = kwargs.get("dilation_conv_num", 2)
    expected = (channels * h + h + 2 * h + h * channels + channels) + (
        channels * h + h + 2 * h + n * (9 * h * h + h + 2 * h) + h + 1
    )
    assert bam_param_count(channels, **kwargs) == expected
    assert sum(p.numel() for p in m.parameters()) == expected


def test_resnet50_bam_parameter_count() -> None:
    """The official ResNet-50 + BAM (after layer1, 2, 3: 256, 512, 1024 channels) adds 0.35 M,
    the paper's 25.56 M -> 25.92 M (Table 4)."""
    extra = sum(bam_param_count(c) for c in (256, 512, 1024))
    assert round((25_557_032 + extra) / 1e6, 2) == 25.92


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"combine": "mean"}, ValueError, r"BAM: combine must be one of 'sum', 'product'"),
        ({"dilation_val": 0}, ValueError, r"BAM: dilation_val must be an integer >= 1"),
        ({"dilation_conv_num": -1}, ValueError, r"BAM: dilation_conv_num must be an integer >= 0"),
        ({"reduction": 1.5}, TypeError, r"BAM: reduction must be an integer"),
    ],
)
def test_bad_arguments(kwargs, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        BAM(64, **kwargs)


def test_gate_hook_and_attention_maps() -> None:
    m = randomize_(BAM(32)).eval()
    seen = []
    m.gate.register_forward_hook(lambda mod, i, o: seen.append(o))
    x = torch.randn(2, 32, 5, 8)
    with torch.no_grad():
        y = m(x)
        maps = m.attention_maps(x)
    torch.testing.assert_close(y, x * (1 + seen[0]))
    assert maps["m_c"].shape == (2, 32) and maps["m_s"].shape == (2, 5, 8)
    torch.testing.assert_close(maps["spatial"], seen[0].mean(1))
    torch.testing.assert_close(maps["channel"], seen[0].mean((2, 3)))
