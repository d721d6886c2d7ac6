"""CBAM, ChannelGate, SpatialGate: reference formulas for every variant and order, timm parity,
official initialisation, parameter counts, errors."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.modules.cbam import (
    CBAM,
    ChannelGate,
    SpatialGate,
    cbam_param_count,
    channel_gate_param_count,
    spatial_gate_param_count,
)
from conftest import randomize_

EPS = 1e-5


# ---- plain, slow reference formulas ------------------------------------------------------
def _hvp(fn, x, params, seed=9):
    """Gradients of ``<d<fn(x), g>/dx, v>`` w.r.t. ``x`` and ``params`` (double backward)."""
    gen = torch.Generator().manual_seed(seed)
    g, v = (torch.randn(x.shape, generator=gen, dtype=x.dtype) for _ in range(2))
    (gx,) = torch.autograd.grad((fn(x) * g).sum(), x, create_graph=True)
    return torch.autograd.grad((gx * v).sum(), [x, *params], allow_unused=True)


def channel_map_ref(x, w1, b1, w2, b2):
    """sigmoid(MLP(avg) + MLP(max)) with one shared MLP; returns (B, C, 1, 1)."""
    b, c, h, w = x.shape
    avg = x.sum(dim=(2, 3)) / (h * w)
    mx = x.reshape(b, c, h * w).max(dim=2).values

    def mlp(z):
        hid = z @ w1.t() + (b1 if b1 is not None else 0)
        hid = torch.where(hid > 0, hid, torch.zeros_like(hid))
        return hid @ w2.t() + (b2 if b2 is not None else 0)

    return torch.sigmoid(mlp(avg) + mlp(mx))[:, :, None, None]


def conv2d_ref(inp, weight):
    """Zero-padded 'same' cross-correlation, C_in -> 1, by explicit sums over the kernel."""
    b, cin, h, w = inp.shape
    k = weight.shape[-1]
    p = k // 2
    padded = torch.zeros(b, cin, h + 2 * p, w + 2 * p, dtype=inp.dtype)
    padded[:, :, p : p + h, p : p + w] = inp
    out = torch.zeros(b, 1, h, w, dtype=inp.dtype)
    for ci in range(cin):
        for u in range(k):
            for v in range(k):
                out[:, 0] = out[:, 0] + weight[0, ci, u, v] * padded[:, ci, u : u + h, v : v + w]
    return out


def spatial_map_ref(x, conv_w, bn, pool_order, training):
    """sigmoid(BN(conv([max_c, mean_c]))) (or [mean, max]); bn = None or the BatchNorm2d."""
    mx = x.max(dim=1, keepdim=True).values
    avg = x.sum(dim=1, keepdim=True) / x.shape[1]
    maps = [mx, avg] if pool_order == "max-mean" else [avg, mx]
    logits = conv2d_ref(torch.cat(maps, dim=1), conv_w)
    if bn is not None:
        if training:
            mean = logits.mean()
            var = ((logits - mean) ** 2).mean()
        else:
            mean, var = bn.running_mean[0], bn.running_var[0]
        logits = (logits - mean) / torch.sqrt(var + EPS) * bn.weight[0] + bn.bias[0]
    return torch.sigmoid(logits)


def channel_ref(gate: ChannelGate, x):
    return x * channel_map_ref(x, gate.fc1.weight, gate.fc1.bias, gate.fc2.weight, gate.fc2.bias)


def spatial_ref(gate: SpatialGate, x, training):
    return x * spatial_map_ref(x, gate.conv.weight, gate.bn, gate.pool_order, training)


def cbam_ref(m: CBAM, x, training):
    if m.order == "channel-spatial":
        return spatial_ref(m.spatial, channel_ref(m.channel, x), training)
    if m.order == "spatial-channel":
        return channel_ref(m.channel, spatial_ref(m.spatial, x, training))
    s = channel_map_ref(
        x, m.channel.fc1.weight, m.channel.fc1.bias, m.channel.fc2.weight, m.channel.fc2.bias
    )
    a = spatial_map_ref(x, m.spatial.conv.weight, m.spatial.bn, m.spatial.pool_order, training)
    return x * s * a


VARIANTS = {
    "official": {},
    "timm": {
        "divisor": 1,
        "mlp_bias": False,
        "pool_order": "mean-max",
        "norm_momentum": 0.1,
        "norm_weight_init": 1.0,
    },
    "yolov4-tiny": {
        "reduction": 8,
        "mlp_bias": False,
        "pool_order": "mean-max",
        "spatial_norm": False,
        "kernel_size": 7,
    },
    "CBAMLayer ports": {"mlp_bias": False, "pool_order": "max-mean", "spatial_norm": False},
    "two-class ports": {"mlp_bias": False, "pool_order": "mean-max", "spatial_norm": False},
    "two-class ports, kernel 3": {
        "mlp_bias": False,
        "pool_order": "mean-max",
        "spatial_norm": False,
        "kernel_size": 3,
    },
    "spatial-channel": {"order": "spatial-channel"},
    "parallel": {"order": "parallel"},
    "parallel no bn": {"order": "parallel", "spatial_norm": False, "kernel_size": 5},
}


def _check_against(module, reference, x, training):
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    params = [p for p in module.parameters()]
    y = module(x1)
    ref = reference(x2)
    torch.testing.assert_close(y, ref, rtol=1e-11, atol=1e-12)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x1, *params], g)
    want = torch.autograd.grad(ref, [x2, *params], g, allow_unused=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    return y, got[0]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("training", [False, True])
def test_cbam_matches_reference(variant, training) -> None:
    m = randomize_(CBAM(24, **VARIANTS[variant])).double().train(training)
    x = torch.randn(2, 24, 6, 5, dtype=torch.float64)
    _check_against(m, lambda t: cbam_ref(m, t, training), x, training)


def test_cbam_channels_last_stays_channels_last_and_matches() -> None:
    m = randomize_(CBAM(16)).double().train()
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y, gx = _check_against(m, lambda t: cbam_ref(m, t, True), x, True)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert gx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kwargs", [{}, {"mlp_bias": False}, {"reduction": 4, "divisor": 1}])
def test_channel_gate_alone_matches_reference(kwargs) -> None:
    m = randomize_(ChannelGate(20, **kwargs)).double()
    x = torch.randn(3, 20, 4, 6, dtype=torch.float64)
    _check_against(m, lambda t: channel_ref(m, t), x, False)


@pytest.mark.parametrize(
    "kwargs", [{}, {"pool_order": "mean-max"}, {"spatial_norm": False}, {"kernel_size": 3}]
)
@pytest.mark.parametrize("training", [False, True])
def test_spatial_gate_alone_matches_reference(kwargs, training) -> None:
    m = randomize_(SpatialGate(12, **kwargs)).double().train(training)
    x = torch.randn(3, 12, 7, 5, dtype=torch.float64)
    _check_against(m, lambda t: spatial_ref(m, t, training), x, training)


@pytest.mark.parametrize("variant", ["official", "timm", "yolov4-tiny", "parallel"])
@pytest.mark.parametrize("training", [False, True])
def test_second_order_gradients_match_reference(variant, training) -> None:
    m = (
        randomize_(
            CBAM(
                8,
                reduction=2,
                kernel_size=3,
                **{
                    k: v
                    for k, v in VARIANTS[variant].items()
                    if k not in ("reduction", "kernel_size")
                },
            )
        )
        .double()
        .train(training)
    )
    x = torch.randn(2, 8, 4, 5, dtype=torch.float64, requires_grad=True)
    params = list(m.parameters())
    got = _hvp(m, x, params)
    want = _hvp(lambda t: cbam_ref(m, t, training), x, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("preset", [None, "timm", "yolov4-tiny"])
def test_bfloat16_autocast_training_with_bfloat16_input(preset) -> None:
    """Inside an autocast network the input is already bfloat16: the 7x7 conv must cope."""
    m = randomize_(attnzoo.create("cbam", 32, preset=preset)).train()
    ref = randomize_(attnzoo.create("cbam", 32, preset=preset)).train()
    x = torch.randn(2, 32, 9, 7)
    xb = x.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(xb)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    want = ref(xb.detach().float())  # same weights, float32, on the same rounded input
    torch.testing.assert_close(y.float(), want, rtol=0.05, atol=0.05 * want.abs().max().item())


def test_orders_differ_from_each_other() -> None:
    base = randomize_(CBAM(32, reduction=4)).double().eval()
    x = torch.randn(2, 32, 6, 6, dtype=torch.float64)
    outs = {}
    for order in ("channel-spatial", "spatial-channel", "parallel"):
        m = CBAM(32, reduction=4, order=order).double().eval()
        m.load_state_dict(base.state_dict())
        outs[order] = m(x)
    assert not torch.allclose(outs["channel-spatial"], outs["spatial-channel"])
    assert not torch.allclose(outs["channel-spatial"], outs["parallel"])
    assert not torch.allclose(outs["spatial-channel"], outs["parallel"])


# ---- official initialisation and BatchNorm details ---------------------------------------
def test_official_spatial_batchnorm() -> None:
    m = CBAM(64)
    bn = m.spatial.bn
    assert isinstance(bn, torch.nn.BatchNorm2d) and bn.num_features == 1
    assert bn.momentum == 0.01 and bn.eps == EPS
    assert torch.equal(bn.weight.detach(), torch.zeros(1))
    assert m.spatial.conv.bias is None and m.spatial.conv.weight.shape == (1, 2, 7, 7)
    assert m.channel.fc1.bias is not None and m.channel.fc1.out_features == 4
    # weight 0 -> the spatial map is sigmoid(bias) = 0.5 everywhere at init.
    x = torch.randn(2, 64, 5, 5)
    torch.testing.assert_close(m.eval().attention_map(x), torch.full((2, 1, 5, 5), 0.5))


def test_running_stats_update_with_momentum() -> None:
    m = randomize_(SpatialGate(8)).double().train()
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    rm, rv = m.bn.running_mean.clone(), m.bn.running_var.clone()
    with torch.no_grad():
        mx, avg = x.max(1, keepdim=True).values, x.mean(1, keepdim=True)
        logits = conv2d_ref(torch.cat([mx, avg], 1), m.conv.weight)
    m(x).sum().backward()
    # BatchNorm's running variance uses the unbiased batch variance.
    torch.testing.assert_close(m.bn.running_mean, 0.99 * rm + 0.01 * logits.mean())
    torch.testing.assert_close(m.bn.running_var, 0.99 * rv + 0.01 * logits.var(unbiased=True))
    assert m.bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize("channels", [1, 4, 15, 16, 33])
def test_hidden_width_never_zero(channels) -> None:
    assert ChannelGate(channels).fc1.out_features == max(1, channels // 16)


# ---- timm parity -------------------------------------------------------------------------
timm_cbam = pytest.importorskip("timm.layers.cbam")


def _copy_to_timm(ours: CBAM, ref) -> None:
    with torch.no_grad():
        ref.channel.fc1.weight.copy_(ours.channel.fc1.weight[:, :, None, None])
        ref.channel.fc2.weight.copy_(ours.channel.fc2.weight[:, :, None, None])
        ref.spatial.conv.conv.weight.copy_(ours.spatial.conv.weight)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(ref.spatial.conv.bn, name).copy_(getattr(ours.spatial.bn, name))


@pytest.mark.parametrize("channels", [1, 8, 24, 40, 64, 100, 256, 1000])
def test_timm_preset_reproduces_timm_defaults(channels) -> None:
    ref = timm_cbam.CbamModule(channels)
    ours = attnzoo.create("cbam", channels, preset="timm")
    assert ours.channel.fc1.out_features == ref.channel.fc1.out_channels
    assert ours.channel.fc1.bias is None and ref.channel.fc1.bias is None
    bn, rbn = ours.spatial.bn, ref.spatial.conv.bn
    assert (bn.momentum, bn.eps) == (rbn.momentum, rbn.eps)
    torch.testing.assert_close(bn.weight, rbn.weight)
    torch.testing.assert_close(bn.bias, rbn.bias)
    assert ref.spatial.conv.conv.padding == ours.spatial.conv.padding
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_timm_parity_with_copied_weights(training, channels_last, dtype) -> None:
    ours = randomize_(attnzoo.create("cbam", 64, preset="timm")).to(dtype).train(training)
    ref = timm_cbam.CbamModule(64).to(dtype).train(training)
    _copy_to_timm(ours, ref)
    x = torch.randn(4, 64, 9, 11, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, yr = ours(x1), ref(x2)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(y, yr, rtol=0, atol=tol)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=10 * tol, atol=tol)
    if dtype == torch.float64:  # parameter gradients sum ~10^4 terms: compare in float64
        pairs = [
            (ours.spatial.conv.weight, ref.spatial.conv.conv.weight),
            (ours.spatial.bn.weight, ref.spatial.conv.bn.weight),
            (ours.spatial.bn.bias, ref.spatial.conv.bn.bias),
        ]
        for a, b in pairs:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            ours.channel.fc1.weight.grad,
            ref.channel.fc1.weight.grad[:, :, 0, 0],
            rtol=1e-10,
            atol=1e-12,
        )
    torch.testing.assert_close(ours.spatial.bn.running_var, ref.spatial.conv.bn.running_var)
    torch.testing.assert_close(ours.spatial.bn.running_mean, ref.spatial.conv.bn.running_mean)


def test_timm_gates_alone() -> None:
    ours_c = randomize_(attnzoo.create("cbam_channel", 32, preset="timm")).eval()
    ref_c = timm_cbam.ChannelAttn(32).eval()
    with torch.no_grad():
        ref_c.fc1.weight.copy_(ours_c.fc1.weight[:, :, None, None])
        ref_c.fc2.weight.copy_(ours_c.fc2.weight[:, :, None, None])
    ours_s = randomize_(attnzoo.create("cbam_spatial", 32, preset="timm")).eval()
    ref_s = timm_cbam.SpatialAttn(7).eval()
    with torch.no_grad():
        ref_s.conv.conv.weight.copy_(ours_s.conv.weight)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(ref_s.conv.bn, name).copy_(getattr(ours_s.bn, name))
    x = torch.randn(3, 32, 8, 8)
    torch.testing.assert_close(ours_c(x), ref_c(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_s(x), ref_s(x), rtol=0, atol=1e-6)


# ---- counts and errors -------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("channels", [3, 64, 256])
def test_param_counts_closed_form(variant, channels) -> None:
    kwargs = VARIANTS[variant]
    m = CBAM(channels, **kwargs)
    h = m.channel.fc1.out_features
    k = m.spatial.conv.kernel_size[0]
    expected = (
        2 * channels * h
        + (h + channels if kwargs.get("mlp_bias", True) else 0)
        + 2 * k * k
        + (2 if kwargs.get("spatial_norm", True) else 0)
    )
    assert cbam_param_count(channels, **kwargs) == expected
    assert sum(p.numel() for p in m.parameters()) == expected
    channel_kw = {k: v for k, v in kwargs.items() if k in ("reduction", "mlp_bias", "divisor")}
    spatial_kw = {
        k: v
        for k, v in kwargs.items()
        if k in ("kernel_size", "pool_order", "spatial_norm", "norm_momentum", "norm_weight_init")
    }
    assert channel_gate_param_count(channels, **channel_kw) == sum(
        p.numel() for p in ChannelGate(channels, **channel_kw).parameters()
    )
    assert spatial_gate_param_count(channels, **spatial_kw) == sum(
        p.numel() for p in SpatialGate(channels, **spatial_kw).parameters()
    )


def test_cbam_resnet50_parameter_count() -> None:
    # 28.09 M in the paper: ResNet-50 (25,557,032) + one CBAM after each of the 16 bottlenecks.
    extra = sum(n * cbam_param_count(c) for c, n in [(256, 3), (512, 4), (1024, 6), (2048, 3)])
    assert round((25_557_032 + extra) / 1e6, 2) == 28.09


@pytest.mark.parametrize(
    ("cls", "kwargs", "exc", "pattern"),
    [
        (
            CBAM,
            {"kernel_size": 6},
            ValueError,
            r"CBAM: kernel_size must be a positive odd integer, got 6",
        ),
        (
            CBAM,
            {"order": "sideways"},
            ValueError,
            r"CBAM: order must be one of 'channel-spatial', 'spatial-channel', 'parallel'",
        ),
        (
            CBAM,
            {"pool_order": "avg-max"},
            ValueError,
            r"CBAM: pool_order must be one of 'max-mean', 'mean-max'; got 'avg-max'",
        ),
        (CBAM, {"reduction": 0}, ValueError, r"CBAM: reduction must be an integer >= 1, got 0"),
        (CBAM, {"norm_momentum": 0.0}, ValueError, r"CBAM: norm_momentum must be a positive"),
        (CBAM, {"spatial_norm": "yes"}, TypeError, r"CBAM: spatial_norm must be True or False"),
        (ChannelGate, {"mlp_bias": None}, TypeError, r"ChannelGate: mlp_bias must be True or"),
        (SpatialGate, {"kernel_size": 4}, ValueError, r"SpatialGate: kernel_size must be"),
    ],
)
def test_bad_arguments(cls, kwargs, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        cls(32, **kwargs)


@pytest.mark.parametrize("cls", [CBAM, ChannelGate, SpatialGate])
def test_bad_input(cls) -> None:
    with pytest.raises(ValueError, match=rf"{cls.__name__}: input must have channels=32"):
        cls(32)(torch.randn(1, 16, 4, 4))


def test_gate_hooks_capture_the_applied_maps() -> None:
    m = randomize_(CBAM(16)).eval()
    seen = {}
    m.channel.gate.register_forward_hook(lambda mod, i, o: seen.__setitem__("c", o))
    m.spatial.gate.register_forward_hook(lambda mod, i, o: seen.__setitem__("s", o))
    x = torch.randn(2, 16, 5, 6)
    y = m(x)
    assert seen["c"].shape == (2, 16, 1, 1) and seen["s"].shape == (2, 1, 5, 6)
    torch.testing.assert_close(y, x * seen["c"] * seen["s"])
    torch.testing.assert_close(m.attention_map(x), seen["s"])


def test_yolov4_tiny_preset_is_bubbliiiing_cbam_block() -> None:
    # cbam_block(channel, ratio=8, kernel_size=7): bias-free 1x1 convs C -> C // 8 -> C,
    # [avg, max], 7x7 conv without bias and without BatchNorm.
    m = attnzoo.create("cbam", 256, preset="yolov4-tiny")
    assert m.channel.fc1.out_features == 32 and m.channel.fc1.bias is None
    assert m.channel.fc2.bias is None
    assert m.spatial.bn is None and m.spatial.pool_order == "mean-max"
    assert m.spatial.conv.weight.shape == (1, 2, 7, 7) and m.order == "channel-spatial"
    assert sum(p.numel() for p in m.parameters()) == 2 * 256 * 32 + 2 * 49
