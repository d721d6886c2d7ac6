"""SqueezeExcitation: reference formula (every variant), timm parity, parameter counts, errors."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.modules.se import SqueezeExcitation, se_hidden_channels, se_param_count
from conftest import randomize_


def se_reference(x: torch.Tensor, w1, b1, w2, b2) -> torch.Tensor:
    """Plain SE: mean over H, W -> FC -> ReLU -> FC -> sigmoid -> scale (loops over the batch)."""
    out = torch.empty_like(x)
    for n in range(x.shape[0]):
        z = x[n].sum(dim=(1, 2)) / (x.shape[2] * x.shape[3])
        h = w1 @ z + (b1 if b1 is not None else 0)
        h = torch.where(h > 0, h, torch.zeros_like(h))
        s = 1 / (1 + torch.exp(-(w2 @ h + (b2 if b2 is not None else 0))))
        out[n] = x[n] * s[:, None, None]
    return out


def _hvp(fn, x, params, seed=9):
    """Gradients of ``<d<fn(x), g>/dx, v>`` w.r.t. ``x`` and ``params`` (double backward)."""
    gen = torch.Generator().manual_seed(seed)
    g, v = (torch.randn(x.shape, generator=gen, dtype=x.dtype) for _ in range(2))
    (gx,) = torch.autograd.grad((fn(x) * g).sum(), x, create_graph=True)
    return torch.autograd.grad((gx * v).sum(), [x, *params], allow_unused=True)


def _weights(m: SqueezeExcitation):
    return m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias


VARIANTS = [
    ("official", {}),
    ("timm", {"divisor": 8}),
    ("yolov4-tiny", {"bias": False}),
    ("reduction 4", {"reduction": 4}),
]


@pytest.mark.parametrize(("label", "kwargs"), VARIANTS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_reference_forward_and_gradients(label, kwargs, channels_last) -> None:
    torch.manual_seed(0)
    m = randomize_(SqueezeExcitation(32, **kwargs)).double()
    x = torch.randn(3, 32, 5, 7, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    params = [p for p in _weights(m) if p is not None]
    y = m(x1)
    ref = se_reference(x2, *_weights(m))
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x1, *params], g)
    want = torch.autograd.grad(ref, [x2, *params], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert got[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(("label", "kwargs"), VARIANTS)
def test_second_order_gradients_match_reference(label, kwargs) -> None:
    m = randomize_(SqueezeExcitation(12, **{"reduction": 4, **kwargs})).double()
    x = torch.randn(2, 12, 3, 5, dtype=torch.float64, requires_grad=True)
    params = [p for p in _weights(m) if p is not None]
    got = _hvp(m, x, params)
    want = _hvp(lambda t: se_reference(t, *_weights(m)), x, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("channels", [1, 3, 8, 15, 16, 64, 100])
def test_hidden_width_official_is_never_zero(channels) -> None:
    m = SqueezeExcitation(channels)
    assert m.fc1.out_features == max(1, channels // 16) >= 1


def test_presets_resolve() -> None:
    assert attnzoo.create("se", 64, preset="timm").fc1.out_features == 8
    m = attnzoo.create("se", 64, preset="yolov4-tiny")
    assert m.fc1.bias is None and m.fc2.bias is None and m.fc1.out_features == 4


# ---- timm parity -------------------------------------------------------------------------
timm_layers = pytest.importorskip("timm.layers")


@pytest.mark.parametrize("channels", [1, 8, 24, 64, 72, 100, 200, 256, 1000, 2048])
def test_timm_preset_reproduces_timm_defaults(channels) -> None:
    ref = timm_layers.SEModule(channels)
    ours = attnzoo.create("se", channels, preset="timm")
    assert ours.fc1.out_features == ref.fc1.out_channels
    assert (ours.fc1.bias is None) == (ref.fc1.bias is None)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


def test_timm_hidden_rounding_matches_for_all_small_channel_counts() -> None:
    from timm.layers import make_divisible as timm_make_divisible

    for c in range(1, 2049):
        assert se_hidden_channels(c, 16, 8) == timm_make_divisible(c / 16, 8, round_limit=0.0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_timm_parity_with_copied_weights(channels_last) -> None:
    torch.manual_seed(0)
    ref = timm_layers.SEModule(64)
    ours = randomize_(attnzoo.create("se", 64, preset="timm"))
    with torch.no_grad():
        ref.fc1.weight.copy_(ours.fc1.weight[:, :, None, None])
        ref.fc1.bias.copy_(ours.fc1.bias)
        ref.fc2.weight.copy_(ours.fc2.weight[:, :, None, None])
        ref.fc2.bias.copy_(ours.fc2.bias)
    x = torch.randn(4, 64, 9, 11)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, yr = ours(x1), ref(x2)
    torch.testing.assert_close(y, yr, rtol=0, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        ours.fc1.weight.grad, ref.fc1.weight.grad[:, :, 0, 0], rtol=1e-5, atol=1e-5
    )


# ---- parameter counts and errors ---------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"divisor": 8}, {"reduction": 4}])
@pytest.mark.parametrize("channels", [1, 7, 64, 256, 2048])
def test_param_count_closed_form(channels, kwargs) -> None:
    m = SqueezeExcitation(channels, **kwargs)
    h = m.fc1.out_features
    expected = 2 * channels * h + (h + channels if kwargs.get("bias", True) else 0)
    assert se_param_count(channels, **kwargs) == expected
    assert sum(p.numel() for p in m.parameters()) == expected
    assert attnzoo.info("se").count_params(channels, **kwargs) == expected


def test_se_resnet50_formula() -> None:
    # Paper: each SE block adds 2C^2/r + C/r + C; C = 256, 512, 1024, 2048 over 3, 4, 6, 3 blocks.
    extra = sum(n * se_param_count(c) for c, n in [(256, 3), (512, 4), (1024, 6), (2048, 3)])
    assert extra == sum(
        n * (2 * c * c // 16 + c // 16 + c) for c, n in [(256, 3), (512, 4), (1024, 6), (2048, 3)]
    )
    assert 25_557_032 + extra == 28_088_024  # the paper's 28.09 M


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        (
            {"reduction": 0},
            ValueError,
            r"SqueezeExcitation: reduction must be an integer >= 1, got 0",
        ),
        ({"reduction": 2.5}, TypeError, r"SqueezeExcitation: reduction must be an integer"),
        ({"divisor": 0}, ValueError, r"SqueezeExcitation: divisor must be an integer >= 1"),
        ({"bias": 1}, TypeError, r"SqueezeExcitation: bias must be True or False"),
    ],
)
def test_bad_arguments(kwargs, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        SqueezeExcitation(64, **kwargs)


def test_bad_input() -> None:
    m = SqueezeExcitation(16)
    with pytest.raises(ValueError, match=r"SqueezeExcitation: input must have channels=16"):
        m(torch.randn(1, 8, 4, 4))


def test_gate_hook_and_attention_map_agree() -> None:
    m = randomize_(SqueezeExcitation(32)).eval()
    seen = []
    m.gate.register_forward_hook(lambda mod, inp, out: seen.append(out))
    x = torch.randn(2, 32, 6, 6)
    y = m(x)
    torch.testing.assert_close(seen[0], m.attention_map(x))
    torch.testing.assert_close(y, x * seen[0])
