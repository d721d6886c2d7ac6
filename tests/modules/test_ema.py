"""EfficientMultiScaleAttention (EMA): reference formula, gate, layout, parameter counts, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.modules.ema import EfficientMultiScaleAttention, ema_param_count
from conftest import randomize_

DOUBLE_TOL = {"rtol": 1e-10, "atol": 1e-10}


# ------------------------------------------------------------------------------------------------
# slow reference formula (float64): the official algorithm, one channel group at a time
def conv3x3_ref(x, w, b):
    """3x3 convolution, padding 1, as a sum over the nine taps."""
    h, wd = x.shape[2:]
    xp = F.pad(x, (1, 1, 1, 1))
    out = b[None, :, None, None]
    for ky in range(3):
        for kx in range(3):
            patch = xp[:, :, ky : ky + h, kx : kx + wd]
            out = out + torch.einsum("bchw,oc->bohw", patch, w[:, :, ky, kx])
    return out


def sigmoid_ref(v):
    return 1 / (1 + torch.exp(-v))


def softmax_ref(v, dim):
    e = torch.exp(v - v.amax(dim, keepdim=True))
    return e / e.sum(dim, keepdim=True)


def ema_ref(m: EfficientMultiScaleAttention, x):
    """Returns the output and the gates ``(B, G, H, W)``."""
    _b, c, h, w = x.shape
    groups, cg = m.factor, c // m.factor
    w1, b1 = m.conv1x1.weight[:, :, 0, 0], m.conv1x1.bias
    gamma, beta, eps = m.gn.weight, m.gn.bias, m.gn.eps
    outs, gates = [], []
    for g in range(groups):
        xg = x[:, g * cg : (g + 1) * cg]  # (B, c, H, W): one group, treated as a sample
        # 1x1 branch: directional pools -> shared 1x1 conv -> sigmoid gates -> GroupNorm(c, c)
        pooled = torch.cat([xg.sum(3) / w, xg.sum(2) / h], 2)  # (B, c, H + W)
        hw = torch.einsum("oc,bcl->bol", w1, pooled) + b1[None, :, None]
        y = xg * sigmoid_ref(hw[:, :, :h])[..., None] * sigmoid_ref(hw[:, :, h:])[:, :, None]
        mu = y.sum((2, 3), keepdim=True) / (h * w)
        var = ((y - mu) ** 2).sum((2, 3), keepdim=True) / (h * w)
        x1 = (y - mu) / torch.sqrt(var + eps) * gamma[:, None, None] + beta[:, None, None]
        # 3x3 branch
        x2 = conv3x3_ref(xg, m.conv3x3.weight, m.conv3x3.bias)
        # cross-spatial learning: softmax over channels of one branch's GAP x the other branch
        p1 = softmax_ref(x1.sum((2, 3)) / (h * w), 1)
        p2 = softmax_ref(x2.sum((2, 3)) / (h * w), 1)
        logits = torch.einsum("bc,bchw->bhw", p1, x2) + torch.einsum("bc,bchw->bhw", p2, x1)
        gate = sigmoid_ref(logits)
        outs.append(xg * gate[:, None])
        gates.append(gate)
    return torch.cat(outs, 1), torch.stack(gates, 1)


def _grads(out, inputs, seed=3):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * g).sum(), inputs)


@pytest.mark.parametrize(("channels", "factor"), [(64, 32), (24, 4), (32, 32), (5, 1)])
@pytest.mark.parametrize("spatial", [(1, 1), (6, 6), (5, 9)])
def test_matches_reference_formula_forward_and_backward(channels, factor, spatial):
    m = randomize_(EfficientMultiScaleAttention(channels, factor=factor), seed=1).double()
    x = torch.randn(2, channels, *spatial, dtype=torch.float64, requires_grad=True)
    params = list(m.parameters())
    out = m(x)
    ref = ema_ref(m, x)[0]
    torch.testing.assert_close(out, ref, **DOUBLE_TOL)
    for got, exp in zip(_grads(out, [x, *params]), _grads(ref, [x, *params])):
        torch.testing.assert_close(got, exp, **DOUBLE_TOL)


def test_channels_last_input_stays_channels_last():
    m = randomize_(EfficientMultiScaleAttention(64), seed=2).double()
    x = torch.randn(2, 64, 7, 9, dtype=torch.float64)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    out = m(x_cl)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ema_ref(m, x)[0], **DOUBLE_TOL)
    out.sum().backward()
    assert x_cl.grad.shape == x.shape


def test_gate_hook_and_attention_map():
    m = randomize_(EfficientMultiScaleAttention(64), seed=3).double()
    captured = []
    m.gate.register_forward_hook(lambda mod, inp, out: captured.append(out))
    x = torch.randn(2, 64, 5, 7, dtype=torch.float64)
    m(x)
    _, ref_gates = ema_ref(m, x)
    assert captured[0].shape == (2, 32, 5, 7)
    torch.testing.assert_close(captured[0], ref_gates, **DOUBLE_TOL)
    torch.testing.assert_close(m.attention_map(x), ref_gates, **DOUBLE_TOL)
    # the official layout (B * G, 1, H, W): sample-major, then group
    official = captured[0].reshape(2 * 32, 1, 5, 7)
    assert torch.equal(official[32 + 3, 0], captured[0][1, 3])


def test_train_and_eval_agree():
    """EMA has no running statistics: GroupNorm normalises each sample on its own."""
    m = randomize_(EfficientMultiScaleAttention(64), seed=4)
    x = torch.randn(3, 64, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(m.train()(x), m.eval()(x), rtol=0, atol=0)


def test_official_layer_names_and_shapes():
    m = EfficientMultiScaleAttention(256)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "gn.weight": (8,),
        "gn.bias": (8,),
        "conv1x1.weight": (8, 8, 1, 1),
        "conv1x1.bias": (8,),
        "conv3x3.weight": (8, 8, 3, 3),
        "conv3x3.bias": (8,),
    }
    assert m.gn.num_groups == 8 and m.gn.eps == 1e-5


# ------------------------------------------------------------------------------------------------
# parameter counts
@pytest.mark.parametrize(("channels", "factor"), [(64, 32), (256, 32), (96, 8), (7, 7), (12, 1)])
def test_param_count_formula(channels, factor):
    m = EfficientMultiScaleAttention(channels, factor=factor)
    c = channels // factor
    assert ema_param_count(channels, factor=factor) == 10 * c * c + 4 * c
    assert ema_param_count(channels, factor=factor) == sum(p.numel() for p in m.parameters())
    assert attnzoo.info("ema").count_params(channels, factor=factor) == 10 * c * c + 4 * c


def test_mobilenetv2_ema_parameter_count():
    """EMA in the inverted residuals with more than 144 hidden channels: 3.55 M (the paper)."""
    tv = pytest.importorskip("torchvision")
    net = tv.models.mobilenet_v2()
    hidden = [block.conv[0][0].out_channels for block in net.features[1:-1] if len(block.conv) == 4]
    total = sum(p.numel() for p in net.parameters())
    total += sum(ema_param_count(h) for h in hidden if h > 144)
    assert total == 3_549_272 and round(total / 1e6, 2) == 3.55
    with pytest.raises(ValueError, match="factor"):
        ema_param_count(144)  # 144 = 4.5 x 32: why the paper stops above 144


# ------------------------------------------------------------------------------------------------
# errors
@pytest.mark.parametrize(
    ("channels", "kwargs", "pattern"),
    [
        (
            48,
            {},
            r"EfficientMultiScaleAttention: channels \(48\) must be divisible by factor \(32\)",
        ),
        (
            16,
            {},
            r"EfficientMultiScaleAttention: channels \(16\) must be divisible by factor \(32\)",
        ),
        (64, {"factor": 0}, r"EfficientMultiScaleAttention: factor must be an integer >= 1"),
        (64, {"factor": 3}, r"EfficientMultiScaleAttention: channels \(64\) .*factor \(3\)"),
    ],
)
def test_bad_arguments(channels, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        EfficientMultiScaleAttention(channels, **kwargs)
    with pytest.raises(ValueError, match=pattern):
        ema_param_count(channels, **kwargs)


def test_wrong_input_at_forward():
    m = EfficientMultiScaleAttention(64)
    pattern = r"EfficientMultiScaleAttention: input must have channels=64"
    with pytest.raises(ValueError, match=pattern):
        m(torch.randn(1, 96, 5, 5))
