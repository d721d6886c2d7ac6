"""SelectiveKernel (SKNet): reference formulas, timm parity, parameter counts, errors, gate hook."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.modules.sk import SelectiveKernel, sk_param_count
from conftest import randomize_

DOUBLE_TOL = {"rtol": 1e-10, "atol": 1e-10}


# ------------------------------------------------------------------------------------------------
# slow reference formulas (float64)
def conv2d_ref(x, w, b, *, stride, padding, dilation, groups):
    """Grouped, dilated, strided 2-D convolution as a sum over kernel taps of einsums."""
    bsz, _, h, wd = x.shape
    out_ch, cin_g, k, _ = w.shape
    xp = F.pad(x, (padding, padding, padding, padding))
    ho = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    wo = (wd + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    xg = xp.reshape(bsz, groups, cin_g, *xp.shape[2:])
    wg = w.reshape(groups, out_ch // groups, cin_g, k, k)
    out = 0
    for ky in range(k):
        for kx in range(k):
            r0, c0 = ky * dilation, kx * dilation
            rows = slice(r0, r0 + stride * (ho - 1) + 1, stride)
            cols = slice(c0, c0 + stride * (wo - 1) + 1, stride)
            patch = xg[..., rows, cols]
            out = out + torch.einsum("bgchw,goc->bgohw", patch, wg[..., ky, kx])
    out = out.reshape(bsz, out_ch, ho, wo)
    return out if b is None else out + b[None, :, None, None]


def bn_eval_ref(x, bn):
    """BatchNorm with running statistics; works for (B, C, H, W) and (B, C)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    inv = 1.0 / torch.sqrt(bn.running_var + bn.eps)
    return (x - bn.running_mean.view(shape)) * (inv * bn.weight).view(shape) + bn.bias.view(shape)


def softmax_ref(v, dim):
    e = torch.exp(v - v.amax(dim, keepdim=True))
    return e / e.sum(dim, keepdim=True)


def sk_ref(m: SelectiveKernel, x, *, keep_3x3, split_input, norm_act, stride=1):
    """SKNet Split/Fuse/Select written out; geometry from the paper and the common SKConv port,
    not the module."""
    n_br, c_out = m.num_branches, m.out_channels
    chunks = x.chunk(n_br, 1) if split_input else [x] * n_br
    feats = []
    for i, (path, xi) in enumerate(zip(m.paths, chunks)):
        conv, bn = path[0], path[1]
        k, dil, pad = (3, i + 1, i + 1) if keep_3x3 else (3 + 2 * i, 1, 1 + i)
        assert conv.weight.shape[-1] == k
        y = conv2d_ref(
            xi, conv.weight, conv.bias, stride=stride, padding=pad, dilation=dil, groups=conv.groups
        )
        feats.append(torch.clamp_min(bn_eval_ref(y, bn), 0))
    u = sum(feats)
    s = u.sum((2, 3)) / (u.shape[2] * u.shape[3])  # (B, C_out)
    z = torch.einsum("dc,bc->bd", m.fc_reduce.weight[:, :, 0, 0], s)
    if m.fc_reduce.bias is not None:
        z = z + m.fc_reduce.bias
    if norm_act:
        z = torch.clamp_min(bn_eval_ref(z, m.bn), 0)
    # one FC per branch (the common port's ``fcs``): rows [i C_out, (i + 1) C_out) of fc_select
    w_sel = m.fc_select.weight[:, :, 0, 0]
    logits = []
    for i in range(n_br):
        li = z @ w_sel[i * c_out : (i + 1) * c_out].T
        if m.fc_select.bias is not None:
            li = li + m.fc_select.bias[i * c_out : (i + 1) * c_out]
        logits.append(li)
    a = softmax_ref(torch.stack(logits, 1), 1)  # (B, M, C_out), softmax ACROSS branches
    out = sum(a[:, i, :, None, None] * feats[i] for i in range(n_br))
    return out, a


VARIANTS = [
    # (kwargs, channels, reference flags)
    ({}, 64, {"keep_3x3": True, "split_input": False, "norm_act": True}),
    ({"branches": 3, "groups": 8}, 32, {"keep_3x3": True, "split_input": False, "norm_act": True}),
    ({"branches": 1, "groups": 4}, 16, {"keep_3x3": True, "split_input": False, "norm_act": True}),
    # the common PyTorch SKConv
    (
        {"keep_3x3": False, "conv_bias": True, "fc_bias": True, "fc_norm_act": False},
        64,
        {"keep_3x3": False, "split_input": False, "norm_act": False},
    ),
    (
        {
            "keep_3x3": False,
            "conv_bias": True,
            "fc_bias": True,
            "fc_norm_act": False,
            "branches": 3,
            "groups": 16,
            "reduction": 8,
            "min_dim": 4,
        },
        32,
        {"keep_3x3": False, "split_input": False, "norm_act": False},
    ),
    # timm's class defaults
    (
        {"groups": 1, "split_input": True, "divisor": 8, "min_dim": 8},
        32,
        {"keep_3x3": True, "split_input": True, "norm_act": True},
    ),
]


def _grads(out, inputs, seed=3):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * g).sum(), inputs)


@pytest.mark.parametrize(("kwargs", "channels", "flags"), VARIANTS)
@pytest.mark.parametrize("spatial", [(1, 1), (5, 5), (6, 9)])
def test_matches_reference_formula_forward_and_backward(kwargs, channels, flags, spatial):
    m = randomize_(SelectiveKernel(channels, **kwargs), seed=1).double().eval()
    x = torch.randn(2, channels, *spatial, dtype=torch.float64, requires_grad=True)
    params = list(m.parameters())
    out = m(x)
    ref, _ = sk_ref(m, x, **flags)
    torch.testing.assert_close(out, ref, **DOUBLE_TOL)
    for got, exp in zip(_grads(out, [x, *params]), _grads(ref, [x, *params])):
        torch.testing.assert_close(got, exp, **DOUBLE_TOL)


@pytest.mark.parametrize("keep_3x3", [True, False])
def test_stride_and_out_channels_match_reference(keep_3x3):
    m = (
        randomize_(
            SelectiveKernel(32, out_channels=64, stride=2, groups=8, keep_3x3=keep_3x3), seed=2
        )
        .double()
        .eval()
    )
    x = torch.randn(2, 32, 9, 12, dtype=torch.float64, requires_grad=True)
    out = m(x)
    assert out.shape == (2, 64, 5, 6)
    ref, _ = sk_ref(m, x, keep_3x3=keep_3x3, split_input=False, norm_act=True, stride=2)
    torch.testing.assert_close(out, ref, **DOUBLE_TOL)
    for got, exp in zip(_grads(out, [x, *m.parameters()]), _grads(ref, [x, *m.parameters()])):
        torch.testing.assert_close(got, exp, **DOUBLE_TOL)


def test_official_geometry_and_defaults():
    m = SelectiveKernel(128)
    convs = [p[0] for p in m.paths]
    assert [(c.kernel_size, c.dilation, c.padding, c.groups) for c in convs] == [
        ((3, 3), (1, 1), (1, 1), 32),
        ((3, 3), (2, 2), (2, 2), 32),
    ]
    assert all(c.bias is None for c in convs)
    assert m.fc_reduce.bias is None and m.fc_select.bias is None
    assert m.attn_channels == 32  # d = max(128 / 16, 32), as conv2_x/B_fc1 in sknet50.prototxt
    assert SelectiveKernel(1024).attn_channels == 64
    assert SelectiveKernel(1016, groups=8).attn_channels == 63  # int(1016 / 16), as the common port
    docs = attnzoo.create("sk", 64, preset="skconv")
    assert [p[0].kernel_size for p in docs.paths] == [(3, 3), (5, 5)]
    assert [p[0].padding for p in docs.paths] == [(1, 1), (2, 2)]


def test_gate_hook_captures_branch_weights():
    m = randomize_(SelectiveKernel(64, branches=3), seed=4).eval()
    captured = []
    m.gate.register_forward_hook(lambda mod, inp, out: captured.append(out))
    x = torch.randn(2, 64, 7, 8)
    with torch.no_grad():
        m(x)
    (a,) = captured
    assert a.shape == (2, 3, 64, 1, 1)
    torch.testing.assert_close(a.sum(1), torch.ones(2, 64, 1, 1))
    torch.testing.assert_close(m.attention_map(x), a, rtol=0, atol=0)
    ref = sk_ref(m.double(), x.double(), keep_3x3=True, split_input=False, norm_act=True)[1]
    torch.testing.assert_close(a.double(), ref[..., None, None], rtol=1e-5, atol=1e-6)


def test_channels_last_with_stride_and_out_channels():
    m = randomize_(SelectiveKernel(64, out_channels=128, stride=2), seed=5).eval()
    x = torch.randn(2, 64, 11, 14)
    with torch.no_grad():
        y = m(x)
        y_cl = m(x.contiguous(memory_format=torch.channels_last))
    assert y.shape == (2, 128, 6, 7)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, y, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# timm parity
def _timm_key(ours: str) -> str:
    key = re.sub(r"^paths\.(\d+)\.0\.", r"paths.\1.conv.", ours)
    key = re.sub(r"^paths\.(\d+)\.1\.", r"paths.\1.bn.", key)
    return key if key.startswith("paths.") else "attn." + key


TIMM_CASES = [
    # (our kwargs, timm kwargs, channels)
    ({"preset": "timm"}, {}, 64),
    ({"preset": "timm"}, {}, 200),
    ({"preset": "timm", "keep_3x3": False}, {"keep_3x3": False}, 64),
    ({"preset": "timm-skresnext"}, {"groups": 32, "rd_divisor": 32, "split_input": False}, 64),
    ({"preset": "timm-skresnext"}, {"groups": 32, "rd_divisor": 32, "split_input": False}, 1024),
    (
        {"preset": "timm-skresnext", "out_channels": 128, "stride": 2},
        {"out_channels": 128, "stride": 2, "groups": 32, "rd_divisor": 32, "split_input": False},
        64,
    ),
]


@pytest.mark.parametrize(("ours_kw", "timm_kw", "channels"), TIMM_CASES)
@pytest.mark.parametrize("train", [False, True])
def test_matches_timm_selective_kernel(ours_kw, timm_kw, channels, train):
    timm_layers = pytest.importorskip("timm.layers")
    ours = randomize_(attnzoo.create("sk", channels, **ours_kw), seed=6).train(train)
    theirs = timm_layers.SelectiveKernel(channels, **timm_kw).train(train)
    assert theirs.attn.fc_reduce.out_channels == ours.attn_channels
    theirs.load_state_dict({_timm_key(k): v for k, v in ours.state_dict().items()})
    x = torch.randn(2, channels, 9, 10)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# parameter counts
def test_param_count_formula_over_keyword_grid():
    grid = itertools.product([1, 2, 3], [False, True], [False, True], [False, True], [None, 8])
    for branches, keep_3x3, biases, split, divisor in grid:
        channels = 48 * branches if split else 96
        kw = {
            "branches": branches,
            "groups": 16 if not split else 8,
            "keep_3x3": keep_3x3,
            "conv_bias": biases,
            "fc_bias": biases,
            "fc_norm_act": not biases,
            "split_input": split,
            "divisor": divisor,
            "out_channels": 64,
            "stride": 2,
            "reduction": 4,
            "min_dim": 4,
        }
        m = SelectiveKernel(channels, **kw)
        assert sk_param_count(channels, **kw) == sum(p.numel() for p in m.parameters()), kw


def test_sknet50_parameter_count_as_drop_in_for_resnext50():
    """SKNet-50 = ResNeXt-50 (32x4d) with every 3x3 grouped conv (+BN) replaced: 27.5 M."""
    tv = pytest.importorskip("torchvision")
    net = tv.models.resnext50_32x4d()
    for block in (b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer):
        width, stride = block.conv2.in_channels, block.conv2.stride[0]
        block.conv2 = SelectiveKernel(width, stride=stride)
        block.bn2 = torch.nn.Identity()
    total = sum(p.numel() for p in net.parameters())
    assert total == 27_479_784 and round(total / 1e6, 1) == 27.5
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


# ------------------------------------------------------------------------------------------------
# errors
@pytest.mark.parametrize(
    ("channels", "kwargs", "pattern"),
    [
        (48, {}, r"SelectiveKernel: channels \(48\) must be divisible by groups \(32\)"),
        (
            64,
            {"out_channels": 40},
            r"SelectiveKernel: out_channels \(40\) must be divisible by groups",
        ),
        (64, {"branches": 0}, r"SelectiveKernel: branches must be an integer >= 1"),
        (
            64,
            {"split_input": True, "branches": 3},
            r"SelectiveKernel: channels \(64\) .*branches \(3\)",
        ),
        (
            32,
            {"split_input": True},
            r"SelectiveKernel: channels // branches \(16\) .*groups \(32\)",
        ),
        (64, {"stride": 0}, r"SelectiveKernel: stride"),
        (64, {"reduction": 0}, r"SelectiveKernel: reduction"),
        (64, {"divisor": 0}, r"SelectiveKernel: divisor"),
    ],
)
def test_bad_arguments(channels, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SelectiveKernel(channels, **kwargs)
    with pytest.raises(ValueError, match=pattern):
        sk_param_count(channels, **kwargs)


def test_wrong_input_channels_at_forward():
    m = SelectiveKernel(64).eval()
    with pytest.raises(ValueError, match=r"SelectiveKernel: input must have channels=64"):
        m(torch.randn(1, 32, 5, 5))
