"""EfficientChannelAttention: kernel rule, reference formula, timm parity, counts, errors."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.modules.eca import EfficientChannelAttention, eca_kernel_size, eca_param_count
from conftest import randomize_


def eca_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Plain ECA: channel means, a zero-padded 1-D correlation across channels, sigmoid, scale."""
    b, c, h, wd = x.shape
    k = w.numel()
    p = (k - 1) // 2
    z = x.sum(dim=(2, 3)) / (h * wd)
    logits = []
    for ch in range(c):
        acc = torch.zeros(b, dtype=x.dtype)
        for j in range(k):
            src = ch + j - p
            if 0 <= src < c:
                acc = acc + w[j] * z[:, src]
        logits.append(acc)
    s = torch.sigmoid(torch.stack(logits, dim=1))
    return x * s[:, :, None, None]


def _hvp(fn, x, params, seed=9):
    """Gradients of ``<d<fn(x), g>/dx, v>`` w.r.t. ``x`` and ``params`` (double backward)."""
    gen = torch.Generator().manual_seed(seed)
    g, v = (torch.randn(x.shape, generator=gen, dtype=x.dtype) for _ in range(2))
    (gx,) = torch.autograd.grad((fn(x) * g).sum(), x, create_graph=True)
    return torch.autograd.grad((gx * v).sum(), [x, *params], allow_unused=True)


def test_kernel_table() -> None:
    # The table documented in eca_kernel_size (gamma=2, b=1).
    table = {1: 1, 4: 1, 7: 1, 8: 3, 16: 3, 32: 3, 64: 3, 128: 5, 256: 5, 512: 5, 1024: 5, 2048: 7}
    for c, k in table.items():
        assert eca_kernel_size(c) == k, c
        assert EfficientChannelAttention(c).kernel_size == k


def test_kernel_rule_by_hand() -> None:
    for c in range(1, 5000):
        t = int(abs((math.log2(c) + 1) / 2))
        assert eca_kernel_size(c) == (t if t % 2 else t + 1)
        assert eca_kernel_size(c) % 2 == 1


@pytest.mark.parametrize("k", [1, 3, 5, 9])
def test_explicit_kernel_is_honoured(k) -> None:
    m = EfficientChannelAttention(2048, kernel_size=k)
    assert m.kernel_size == k and m.conv.weight.shape == (1, 1, k)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"kernel_size": 5}, {"kernel_size": 1}, {"gamma": 1.5, "b": 2}, {"min_kernel_size": 3}],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_reference_forward_and_gradients(kwargs, channels_last) -> None:
    m = randomize_(EfficientChannelAttention(24, **kwargs)).double()
    x = torch.randn(3, 24, 5, 6, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = m.conv.weight
    y = m(x1)
    ref = eca_reference(x2, w.view(-1))
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x1, w], g)
    want = torch.autograd.grad(ref, [x2, w], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_second_order_gradients_match_reference(kernel_size) -> None:
    m = randomize_(EfficientChannelAttention(10, kernel_size=kernel_size)).double()
    x = torch.randn(2, 10, 3, 4, dtype=torch.float64, requires_grad=True)
    w = m.conv.weight
    got = _hvp(m, x, [w])
    want = _hvp(lambda t: eca_reference(t, w.view(-1)), x, [w])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_yolov4_tiny_preset_is_the_adaptive_rule() -> None:
    # bubbliiiing/yolov4-tiny-pytorch (eca_block): int(abs((log(C, 2) + b) / gamma)), +1 if even.
    for c in [128, 256, 512, 1000, 3]:
        t = int(abs((math.log(c, 2) + 1) / 2))
        assert attnzoo.create("eca", c, preset="yolov4-tiny").kernel_size == (t if t % 2 else t + 1)


# ---- timm parity -------------------------------------------------------------------------
timm_layers = pytest.importorskip("timm.layers")


def test_timm_preset_reproduces_timm_kernel_choice() -> None:
    for c in list(range(1, 600)) + [1024, 2047, 2048, 4096, 8192]:
        assert (
            attnzoo.create("eca", c, preset="timm").kernel_size
            == timm_layers.EcaModule(c).conv.kernel_size[0]
        ), c


@pytest.mark.parametrize("channels_last", [False, True])
def test_timm_parity_with_copied_weights(channels_last) -> None:
    ours = randomize_(attnzoo.create("eca", 256, preset="timm"))
    ref = timm_layers.EcaModule(256)
    with torch.no_grad():
        ref.conv.weight.copy_(ours.conv.weight)
    x = torch.randn(4, 256, 7, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, yr = ours(x1), ref(x2)
    torch.testing.assert_close(y, yr, rtol=0, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.conv.weight.grad, ref.conv.weight.grad, rtol=1e-4, atol=1e-5)


# ---- counts and errors -------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{}, {"kernel_size": 9}, {"min_kernel_size": 3}])
@pytest.mark.parametrize("channels", [2, 64, 256, 2048])
def test_param_count_closed_form(channels, kwargs) -> None:
    m = EfficientChannelAttention(channels, **kwargs)
    assert eca_param_count(channels, **kwargs) == m.kernel_size
    assert sum(p.numel() for p in m.parameters()) == m.kernel_size


def test_official_resnet50_kernels_total_80_parameters() -> None:
    # The released ECA-ResNet-50 uses k = 3, 5, 5, 7 for its 3, 4, 6, 3 blocks.
    total = sum(
        n * eca_param_count(c, kernel_size=k)
        for c, n, k in [(256, 3, 3), (512, 4, 5), (1024, 6, 5), (2048, 3, 7)]
    )
    assert total == 80


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        (
            {"kernel_size": 4},
            ValueError,
            r"EfficientChannelAttention: kernel_size must be a positive odd integer, got 4",
        ),
        ({"kernel_size": 0}, ValueError, r"EfficientChannelAttention: kernel_size must be"),
        ({"gamma": 0}, ValueError, r"EfficientChannelAttention: gamma must be a positive number"),
        ({"b": "1"}, TypeError, r"EfficientChannelAttention: b must be a real number"),
        ({"min_kernel_size": 2}, ValueError, r"EfficientChannelAttention: min_kernel_size must"),
    ],
)
def test_bad_arguments(kwargs, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        EfficientChannelAttention(64, **kwargs)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match=r"EfficientChannelAttention: input must have 4 dim"):
        EfficientChannelAttention(8)(torch.randn(2, 8, 5))


def test_gate_hook_and_attention_map_agree() -> None:
    m = randomize_(EfficientChannelAttention(32)).eval()
    seen = []
    m.gate.register_forward_hook(lambda mod, inp, out: seen.append(out))
    x = torch.randn(2, 32, 6, 6)
    y = m(x)
    assert seen[0].shape == (2, 32, 1, 1)
    torch.testing.assert_close(seen[0], m.attention_map(x))
    torch.testing.assert_close(y, x * seen[0])
