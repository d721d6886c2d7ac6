"""GlobalContext (GCNet): reference formulas, timm parity, init, parameter counts, errors."""

from __future__ import annotations

import itertools

import pytest
import torch

import attnzoo
from attnzoo.modules.gc import GlobalContext, gc_param_count
from conftest import forward_backward_pair, randomize_

DOUBLE_TOL = {"rtol": 1e-10, "atol": 1e-10}
FUSIONS = [("channel_add",), ("channel_mul",), ("channel_add", "channel_mul")]


# ------------------------------------------------------------------------------------------------
# slow reference formula (float64)
def _fc(conv, v):
    """A 1x1 conv on a (B, C) vector."""
    return v @ conv.weight[:, :, 0, 0].T + conv.bias


def _transform_ref(seq, ctx):
    """conv -> LayerNorm over the p values -> ReLU -> conv, on the (B, C) context."""
    conv1, ln, conv2 = seq[0], seq[1], seq[3]
    t = _fc(conv1, ctx)
    mu = t.mean(1, keepdim=True)
    var = ((t - mu) ** 2).mean(1, keepdim=True)
    t = (t - mu) / torch.sqrt(var + ln.eps) * ln.weight.flatten() + ln.bias.flatten()
    return _fc(conv2, torch.clamp_min(t, 0))


def gc_ref(m: GlobalContext, x, *, pooling, fusion):
    b, _c, h, w = x.shape
    if pooling == "att":
        logits = torch.einsum("c,bchw->bhw", m.conv_mask.weight[0, :, 0, 0], x) + m.conv_mask.bias
        flat = logits.reshape(b, h * w)
        e = torch.exp(flat - flat.amax(1, keepdim=True))
        weights = (e / e.sum(1, keepdim=True)).reshape(b, h, w)  # softmax over all H*W positions
        ctx = torch.einsum("bchw,bhw->bc", x, weights)
    else:
        ctx = x.sum((2, 3)) / (h * w)
        weights = torch.full((b, h, w), 1.0 / (h * w), dtype=x.dtype)
    out = x
    if "channel_mul" in fusion:
        t = _transform_ref(m.channel_mul_conv, ctx)
        out = out * (1 / (1 + torch.exp(-t)))[:, :, None, None]
    if "channel_add" in fusion:
        out = out + _transform_ref(m.channel_add_conv, ctx)[:, :, None, None]
    return out, weights


def _grads(out, inputs, seed=3):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * g).sum(), inputs)


@pytest.mark.parametrize("pooling", ["att", "avg"])
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("spatial", [(1, 1), (7, 7), (5, 11)])
def test_matches_reference_formula_forward_and_backward(pooling, fusion, spatial):
    m = randomize_(GlobalContext(48, pooling=pooling, fusion=fusion), seed=1).double()
    x = torch.randn(2, 48, *spatial, dtype=torch.float64, requires_grad=True)
    params = list(m.parameters())
    out = m(x)
    ref, _ = gc_ref(m, x, pooling=pooling, fusion=fusion)
    torch.testing.assert_close(out, ref, **DOUBLE_TOL)
    for got, exp in zip(_grads(out, [x, *params]), _grads(ref, [x, *params])):
        torch.testing.assert_close(got, exp, **DOUBLE_TOL)


@pytest.mark.parametrize("preset", ["official", "timm", "r4"])
def test_presets_match_reference_formula(preset):
    m = randomize_(attnzoo.create("gc", 40, preset=preset), seed=2).double()
    x = torch.randn(3, 40, 6, 5, dtype=torch.float64)
    ref, _ = gc_ref(m, x, pooling=m.pooling, fusion=m.fusion)
    torch.testing.assert_close(m(x), ref, **DOUBLE_TOL)


def test_attention_map_and_softmax_hook():
    m = randomize_(GlobalContext(32), seed=3).double()
    captured = []
    m.context_softmax.register_forward_hook(lambda mod, inp, out: captured.append(out))
    x = torch.randn(2, 32, 5, 7, dtype=torch.float64)
    amap = m.attention_map(x)
    _, ref_weights = gc_ref(m, x, pooling="att", fusion=m.fusion)
    assert amap.shape == (2, 1, 5, 7)
    torch.testing.assert_close(amap[:, 0], ref_weights, **DOUBLE_TOL)
    torch.testing.assert_close(captured[0].reshape(2, 1, 5, 7), amap, rtol=0, atol=0)
    avg = GlobalContext(32, pooling="avg").attention_map(x)
    torch.testing.assert_close(avg, torch.full((2, 1, 5, 7), 1 / 35, dtype=torch.float64))


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted"])
def test_gradients_match_reference_for_every_input_layout(fusion, layout):
    """The (B, C, HW) reshape of the pooling is a view or a copy depending on the layout."""
    m = randomize_(GlobalContext(24, fusion=fusion), seed=6).double()
    x = torch.randn(2, 24, 5, 7, dtype=torch.float64)
    x = {
        "contiguous": x,
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "permuted": x.transpose(2, 3).contiguous().transpose(2, 3),
    }[layout].requires_grad_()
    params = list(m.parameters())
    out = m(x)
    ref, _ = gc_ref(m, x, pooling="att", fusion=fusion)
    torch.testing.assert_close(out, ref, **DOUBLE_TOL)
    for got, exp in zip(_grads(out, [x, *params]), _grads(ref, [x, *params])):
        torch.testing.assert_close(got, exp, **DOUBLE_TOL)


@pytest.mark.parametrize("pooling", ["att", "avg"])
def test_training_step_under_bfloat16_autocast(pooling):
    m = randomize_(GlobalContext(32, pooling=pooling, fusion=("channel_add", "channel_mul")))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 32, 6, 7, dtype=dtype, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        assert y.dtype == dtype
        y.float().square().sum().backward()
        assert torch.isfinite(x.grad).all()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
        m.zero_grad()


@pytest.mark.parametrize("pooling", ["att", "avg"])
def test_gradcheck_and_gradgradcheck(pooling):
    m = randomize_(
        GlobalContext(6, ratio=1 / 2, pooling=pooling, fusion=("channel_add", "channel_mul")),
        seed=8,
    ).double()
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), fast_mode=False)
    assert torch.autograd.gradgradcheck(m, (x,))


# ------------------------------------------------------------------------------------------------
# initialisation (official reset_parameters)
@pytest.mark.parametrize("train", [False, True])
def test_add_fusion_is_identity_at_init(train):
    m = GlobalContext(64).train(train)
    x = torch.randn(2, 64, 9, 8)
    with torch.no_grad():
        assert torch.equal(m(x), x)


@pytest.mark.parametrize("fusion", [("channel_mul",), ("channel_add", "channel_mul")])
def test_mul_fusion_starts_at_half_gate(fusion):
    """The official code zero-inits the last conv of the mul branch too: sigmoid(0) = 1/2."""
    m = GlobalContext(64, fusion=fusion)
    x = torch.randn(2, 64, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(m(x), x * 0.5, rtol=0, atol=0)


def test_official_init_of_context_mask():
    m = GlobalContext(2048)
    assert torch.equal(m.conv_mask.bias, torch.zeros(1))
    std = m.conv_mask.weight.std().item()
    assert abs(std - (2 / 2048) ** 0.5) < 0.1 * (2 / 2048) ** 0.5  # kaiming normal, fan_in
    for branch in (m.channel_add_conv,):
        assert not branch[-1].weight.any() and not branch[-1].bias.any()
        assert branch[0].weight.any()


def test_state_dict_keys_follow_official_names():
    keys = set(GlobalContext(64, fusion=("channel_add", "channel_mul")).state_dict())
    expected = {"conv_mask.weight", "conv_mask.bias"} | {
        f"channel_{f}_conv.{i}.{p}"
        for f in ("add", "mul")
        for i in (0, 1, 3)
        for p in ("weight", "bias")
    }
    assert keys == expected
    ln = GlobalContext(64).channel_add_conv[1]
    assert tuple(ln.normalized_shape) == (4, 1, 1) and ln.eps == 1e-5


def test_fusion_order_and_string_form_are_equivalent():
    a = GlobalContext(32, fusion=("channel_mul", "channel_add"))
    b = GlobalContext(32, fusion=["channel_add", "channel_mul"])
    assert a.fusion == b.fusion == ("channel_add", "channel_mul")
    assert GlobalContext(32, fusion="channel_mul").fusion == ("channel_mul",)


def test_channels_last_and_no_contiguous_copy_of_input():
    m = randomize_(GlobalContext(64, fusion=("channel_add", "channel_mul")), seed=4)
    x = torch.randn(2, 64, 7, 9).contiguous(memory_format=torch.channels_last)
    flat = x.flatten(2)
    assert flat.data_ptr() == x.data_ptr()  # the (B, C, HW) operand of the matmul is a view
    with torch.no_grad():
        y = m(x)
        ref = m(x.contiguous())
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# timm parity
def _timm_state(ours: GlobalContext) -> dict[str, torch.Tensor]:
    names = {"channel_add_conv": "mlp_add", "channel_mul_conv": "mlp_scale"}
    layer = {"0": "fc1", "1": "norm", "3": "fc2"}
    out = {}
    for key, value in ours.state_dict().items():
        if key.startswith("conv_mask."):
            out[key.replace("conv_mask", "conv_attn")] = value
            continue
        branch, idx, param = key.split(".")
        out[f"{names[branch]}.{layer[idx]}.{param}"] = value.flatten() if idx == "1" else value
    return out


TIMM_CASES = [
    # (our kwargs, timm kwargs)
    ({"preset": "timm"}, {}),
    ({"preset": "timm", "pooling": "avg"}, {"use_attn": False}),
    ({"preset": "timm", "fusion": ("channel_add",)}, {"fuse_add": True, "fuse_scale": False}),
    ({"preset": "timm", "fusion": ("channel_add", "channel_mul")}, {"fuse_add": True}),
]


@pytest.mark.parametrize(("ours_kw", "timm_kw"), TIMM_CASES)
@pytest.mark.parametrize("channels", [64, 36, 20])
def test_matches_timm_global_context(ours_kw, timm_kw, channels):
    timm_layers = pytest.importorskip("timm.layers")
    ours = randomize_(attnzoo.create("gc", channels, **ours_kw), seed=5)
    theirs = timm_layers.GlobalContext(channels, **timm_kw)
    theirs.load_state_dict(_timm_state(ours))
    forward_backward_pair(ours, theirs, torch.randn(2, channels, 9, 11), grad_atol=1e-5)
    theirs_grads = {k: p.grad for k, p in theirs.named_parameters()}
    ours_names = dict(zip(_timm_state(ours), ours.state_dict()))  # timm key -> our key
    ours_params = dict(ours.named_parameters())
    for key, grad in theirs_grads.items():
        mine = ours_params[ours_names[key]].grad
        torch.testing.assert_close(mine.reshape(grad.shape), grad, rtol=1e-4, atol=1e-4, msg=key)


def test_timm_preset_rounds_planes_like_timm():
    timm_layers = pytest.importorskip("timm.layers")
    for channels in range(1, 300):
        theirs = timm_layers.GlobalContext(channels)
        ours = attnzoo.create("gc", channels, preset="timm")
        assert ours.planes == theirs.mlp_scale.fc1.out_channels, channels


# ------------------------------------------------------------------------------------------------
# parameter counts
def test_param_count_formula_over_keyword_grid():
    grid = itertools.product(
        [1, 8, 64, 100], [1 / 16, 1 / 4, 0.3], ["att", "avg"], FUSIONS, [None, 1, 8]
    )
    for channels, ratio, pooling, fusion, divisor in grid:
        kw = {"ratio": ratio, "pooling": pooling, "fusion": fusion, "divisor": divisor}
        m = GlobalContext(channels, **kw)
        assert gc_param_count(channels, **kw) == sum(p.numel() for p in m.parameters()), kw


def test_planes_never_zero():
    assert GlobalContext(8).planes == 1  # int(8 / 16) = 0 in the official code
    assert GlobalContext(256).planes == 16 and GlobalContext(256, ratio=1 / 4).planes == 64
    assert GlobalContext(120).planes == 7 and GlobalContext(60, ratio=1 / 8).planes == 7  # int()


def test_gc_resnet50_r16_parameter_count():
    """GC r16 after the last BN of every bottleneck of stages c3-c5: 28.08 M (reference.md)."""
    per_stage = {512: 4, 1024: 6, 2048: 3}
    extra = sum(n * gc_param_count(c) for c, n in per_stage.items())
    assert [gc_param_count(c) for c in (256, 512, 1024, 2048)] == [8_753, 33_889, 133_313, 528_769]
    tv = pytest.importorskip("torchvision")
    base = sum(p.numel() for p in tv.models.resnet50().parameters())
    assert base == 25_557_032
    assert round((base + extra) / 1e6, 2) == 28.08


# ------------------------------------------------------------------------------------------------
# errors
@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"fusion": ()}, r"GlobalContext: fusion must be a non-empty subset of .*channel_add"),
        ({"fusion": ("channel_max",)}, r"GlobalContext: fusion must be a non-empty subset"),
        ({"fusion": None}, r"GlobalContext: fusion must be a non-empty subset"),
        ({"pooling": "max"}, r"GlobalContext: pooling must be one of 'att', 'avg'; got 'max'"),
        ({"ratio": 0}, r"GlobalContext: ratio must be a positive number"),
        ({"divisor": 0}, r"GlobalContext: divisor must be an integer >= 1"),
    ],
)
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        GlobalContext(64, **kwargs)
    with pytest.raises(ValueError, match=pattern):
        gc_param_count(64, **kwargs)


def test_wrong_input_at_forward():
    m = GlobalContext(64)
    with pytest.raises(ValueError, match=r"GlobalContext: input must have channels=64"):
        m(torch.randn(1, 65, 5, 5))
    with pytest.raises(ValueError, match=r"GlobalContext: input must have 4 dimensions"):
        m(torch.randn(1, 64, 5))
