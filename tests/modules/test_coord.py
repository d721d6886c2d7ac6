"""CoordinateAttention: reference formula, timm parity, hidden width, parameter counts, errors."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.modules.coord import CoordinateAttention, ca_param_count
from conftest import forward_backward_pair, randomize_

DOUBLE_TOL = {"rtol": 1e-10, "atol": 1e-10}


# ------------------------------------------------------------------------------------------------
# slow reference formula (float64)
def h_swish_ref(v):
    return v * torch.clamp(v + 3, 0, 6) / 6


def _conv1x1(conv, v):
    """1x1 conv on (B, C, L) -> (B, O, L)."""
    out = torch.einsum("oc,bcl->bol", conv.weight[:, :, 0, 0], v)
    return out if conv.bias is None else out + conv.bias[None, :, None]


def ca_ref(m: CoordinateAttention, x, training=False, act=h_swish_ref):
    _b, _c, h, w = x.shape
    z_h = x.sum(3) / w  # (B, C, H): average over the width
    z_w = x.sum(2) / h  # (B, C, W): average over the height
    y = _conv1x1(m.conv1, torch.cat([z_h, z_w], 2))  # (B, mip, H + W)
    bn = m.bn1
    if training:  # batch statistics over B and the H + W strip positions (biased variance)
        mean = y.mean((0, 2))
        var = ((y - mean[:, None]) ** 2).mean((0, 2))
    else:
        mean, var = bn.running_mean, bn.running_var
    y = (y - mean[:, None]) / torch.sqrt(var[:, None] + bn.eps)
    y = act(y * bn.weight[:, None] + bn.bias[:, None])
    a_h = 1 / (1 + torch.exp(-_conv1x1(m.conv_h, y[:, :, :h])))  # (B, C, H)
    a_w = 1 / (1 + torch.exp(-_conv1x1(m.conv_w, y[:, :, h:])))  # (B, C, W)
    gate = torch.einsum("bch,bcw->bchw", a_h, a_w)
    return x * gate, a_h, a_w


def _grads(out, inputs, seed=3):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * g).sum(), inputs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"bias": False, "reduction": 24, "divisor": 8},
        {"mip": 5},
        {"reduction": 4, "min_mip": 2},
    ],
)
@pytest.mark.parametrize("spatial", [(1, 1), (7, 7), (4, 9)])
@pytest.mark.parametrize("train", [False, True])
def test_matches_reference_formula_forward_and_backward(kwargs, spatial, train):
    m = randomize_(CoordinateAttention(40, **kwargs), seed=1).double().train(train)
    x = torch.randn(2, 40, *spatial, dtype=torch.float64, requires_grad=True)
    params = list(m.parameters())
    ref = ca_ref(m, x, training=train)[0]
    out = m(x)
    torch.testing.assert_close(out, ref, **DOUBLE_TOL)
    for got, exp in zip(_grads(out, [x, *params]), _grads(ref, [x, *params])):
        torch.testing.assert_close(got, exp, **DOUBLE_TOL)


@pytest.mark.parametrize("train", [False, True])
def test_second_order_gradients_match_reference(train):
    """Hessian-vector products w.r.t. the input equal the reference formula's (x enters the
    output both directly and through the two gates)."""
    m = randomize_(CoordinateAttention(12, mip=4), seed=5).double().train(train)
    x = torch.randn(2, 12, 4, 5, dtype=torch.float64, requires_grad=True)
    gen = torch.Generator().manual_seed(9)
    g, v = (torch.randn(x.shape, generator=gen, dtype=torch.float64) for _ in range(2))

    def hvp(fn):
        (gx,) = torch.autograd.grad((fn(x) * g).sum(), x, create_graph=True)
        return torch.autograd.grad((gx * v).sum(), [x, *m.parameters()])

    got = hvp(m)
    want = hvp(lambda t: ca_ref(m, t, training=train)[0])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **DOUBLE_TOL)


def test_hardswish_is_the_official_h_swish():
    v = torch.cat(
        [
            torch.linspace(-8, 8, 4001, dtype=torch.float64),
            torch.tensor([-3.0, 3.0, 0.0], dtype=torch.float64),
        ]
    )
    torch.testing.assert_close(F.hardswish(v), h_swish_ref(v), rtol=0, atol=1e-15)
    assert isinstance(CoordinateAttention(64).act, torch.nn.Hardswish)


def test_act_relu_matches_reference_formula():
    m = randomize_(CoordinateAttention(24, mip=6, act="relu"), seed=6).double().train()
    x = torch.randn(2, 24, 5, 3, dtype=torch.float64)
    assert isinstance(m.act, torch.nn.ReLU)
    torch.testing.assert_close(m(x), ca_ref(m, x, training=True, act=torch.relu)[0], **DOUBLE_TOL)
    assert not torch.allclose(m(x), ca_ref(m, x, training=True)[0])  # h_swish differs


# ------------------------------------------------------------------------------------------------
# preset "yolov4-tiny": the CA_Block of bubbliiiing/yolov4-tiny-pytorch (nets/attention.py)
def ca_block_ref(m: CoordinateAttention, x):
    """The reference's CA_Block in eval mode, in its own layout: the H and W strips are laid
    along the last axis, ``cat([mean_W(x)^T, mean_H(x)], 3)`` (B, C, 1, H + W); conv_1x1 (no
    bias) -> BN -> ReLU; F_h, F_w (no bias) -> sigmoid; ``x * s_h * s_w``."""
    _b, _c, h, w = x.shape
    strip = torch.cat([x.mean(3, keepdim=True).permute(0, 1, 3, 2), x.mean(2, keepdim=True)], 3)
    y = torch.relu(m.bn1(F.conv2d(strip, m.conv1.weight)))
    y_h, y_w = y.split([h, w], 3)
    s_h = torch.sigmoid(F.conv2d(y_h.permute(0, 1, 3, 2), m.conv_h.weight))
    s_w = torch.sigmoid(F.conv2d(y_w, m.conv_w.weight))
    return x * s_h * s_w


def ca_block_params(channels: int) -> int:
    """CA_Block(channel, reduction=16): conv_1x1 C -> C // 16 (no bias), BN(C // 16), F_h and
    F_w C // 16 -> C (no bias)."""
    mip = channels // 16
    return channels * mip + 2 * mip + 2 * mip * channels


def test_yolov4_tiny_preset_is_the_reference_ca_block():
    assert attnzoo.info("ca").presets["yolov4-tiny"] == {
        "reduction": 16,
        "min_mip": 1,
        "bias": False,
        "act": "relu",
    }
    for channels in (16, 100, 128, 256, 512):
        m = attnzoo.create("ca", channels, preset="yolov4-tiny")
        assert m.mip == channels // 16  # no floor of 8 (128 // 16 = 8, 100 // 16 = 6, 16 -> 1)
        assert m.conv1.bias is None and m.conv_h.bias is None and m.conv_w.bias is None
        assert isinstance(m.act, torch.nn.ReLU) and isinstance(m.bn1, torch.nn.BatchNorm2d)
        n = sum(p.numel() for p in m.parameters())
        preset = attnzoo.info("ca").presets["yolov4-tiny"]
        assert n == ca_block_params(channels) == attnzoo.info("ca").count_params(channels, **preset)
    # the three neck positions of YOLOv4-tiny (feat1 256, feat2 512, upsampled P5 128)
    assert sum(ca_block_params(c) for c in (256, 512, 128)) == 64_624
    m = randomize_(attnzoo.create("ca", 48, preset="yolov4-tiny"), seed=8).double().eval()
    x = torch.randn(2, 48, 6, 4, dtype=torch.float64)
    torch.testing.assert_close(m(x), ca_block_ref(m, x), **DOUBLE_TOL)


def test_gate_hooks_and_attention_map():
    m = randomize_(CoordinateAttention(32), seed=2).double().eval()
    got = {}
    m.gate_h.register_forward_hook(lambda mod, inp, out: got.__setitem__("h", out))
    m.gate_w.register_forward_hook(lambda mod, inp, out: got.__setitem__("w", out))
    x = torch.randn(2, 32, 5, 6, dtype=torch.float64)
    amap = m.attention_map(x)
    _, a_h, a_w = ca_ref(m, x)
    assert got["h"].shape == (2, 32, 5, 1) and got["w"].shape == (2, 32, 1, 6)
    torch.testing.assert_close(got["h"][..., 0], a_h, **DOUBLE_TOL)
    torch.testing.assert_close(got["w"][:, :, 0], a_w, **DOUBLE_TOL)
    torch.testing.assert_close(amap, a_h[..., None] * a_w[:, :, None], **DOUBLE_TOL)


def test_official_defaults():
    m = CoordinateAttention(256)
    assert m.mip == 8 and m.conv1.bias is not None and m.conv_h.bias is not None
    assert CoordinateAttention(960).mip == 30 and CoordinateAttention(16).mip == 8
    assert [CoordinateAttention(c).mip for c in (255, 256, 257, 288, 319, 320)] == [
        max(8, c // 32) for c in (255, 256, 257, 288, 319, 320)
    ]


# ------------------------------------------------------------------------------------------------
# timm parity
def _timm_coord_attn():
    # CoordAttn lives in timm.layers.coord_attn (recent timm; not re-exported by timm.layers).
    return pytest.importorskip("timm.layers.coord_attn").CoordAttn


@pytest.mark.parametrize("channels", [64, 96, 288, 200])
@pytest.mark.parametrize("train", [False, True])
def test_matches_timm_coord_attn(channels, train):
    coord_attn = _timm_coord_attn()
    ours = randomize_(attnzoo.create("ca", channels, preset="timm"), seed=4).train(train)
    theirs = coord_attn(channels).train(train)
    theirs.load_state_dict(ours.state_dict())
    forward_backward_pair(ours, theirs, torch.randn(2, channels, 7, 10))
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_timm_preset_hidden_width_matches_timm():
    coord_attn = _timm_coord_attn()
    for channels in range(1, 1100, 7):
        theirs = coord_attn(channels).conv1.out_channels
        assert attnzoo.create("ca", channels, preset="timm").mip == theirs, channels


# ------------------------------------------------------------------------------------------------
# parameter counts
def test_param_count_formula_over_keyword_grid():
    grid = itertools.product(
        [1, 8, 96, 1000], [32, 24, 3.5], [1, 8], [None, 8], [None, 3], [True, False]
    )
    for channels, reduction, min_mip, divisor, mip, bias in grid:
        kw = {
            "reduction": reduction,
            "min_mip": min_mip,
            "divisor": divisor,
            "mip": mip,
            "bias": bias,
        }
        m = CoordinateAttention(channels, **kw)
        assert ca_param_count(channels, **kw) == sum(p.numel() for p in m.parameters()), kw


def test_mobilenetv2_ca_parameter_count():
    """CA on the expanded channels of every inverted residual with t = 6: 3.95 M (the paper)."""
    tv = pytest.importorskip("torchvision")
    net = tv.models.mobilenet_v2()
    hidden = [block.conv[0][0].out_channels for block in net.features[1:-1] if len(block.conv) == 4]
    assert len(hidden) == 16 and hidden[0] == 96 and hidden[-1] == 960
    total = sum(p.numel() for p in net.parameters()) + sum(ca_param_count(h) for h in hidden)
    assert total == 3_950_648 and round(total / 1e6, 2) == 3.95


# ------------------------------------------------------------------------------------------------
# errors
@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"reduction": 0}, r"CoordinateAttention: reduction must be a positive number"),
        ({"min_mip": 0}, r"CoordinateAttention: min_mip must be an integer >= 1"),
        ({"mip": 0}, r"CoordinateAttention: mip must be an integer >= 1"),
        ({"divisor": -8}, r"CoordinateAttention: divisor must be an integer >= 1"),
        ({"act": "gelu"}, r"CoordinateAttention: act must be one of 'hardswish', 'relu'"),
    ],
)
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        CoordinateAttention(64, **kwargs)
    with pytest.raises(ValueError, match=pattern):
        ca_param_count(64, **kwargs)


def test_wrong_input_at_forward():
    m = CoordinateAttention(64).eval()
    with pytest.raises(ValueError, match=r"CoordinateAttention: input must have channels=64"):
        m(torch.randn(1, 16, 5, 5))
