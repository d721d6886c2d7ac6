"""attnzoo.ops.gates: the custom-autograd fast paths against plain autograd (values, gradients,
ties, memory format), float64 gradcheck, and that compile/ONNX-style tracing takes the plain
path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.ops import gates
from attnzoo.ops import gates as gates_mod
from attnzoo.ops.gates import (
    conv1d_same,
    conv2d_same,
    disable_fast_path,
    fast_path_enabled,
    pool_gate_scale,
    scale_channels,
    scale_spatial,
    scale_twice,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """gradcheck makes hundreds of tiny calls; one intra-op thread keeps them fast on a busy box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class _TinyGate(torch.nn.Module):
    """A small gate network on pooled descriptors, generic in the reduced dims."""

    def __init__(self, n_pools: int, width: int) -> None:
        super().__init__()
        self.mix = torch.nn.Parameter(torch.randn(n_pools, dtype=torch.float64))
        self.scale = torch.nn.Parameter(torch.randn(width, dtype=torch.float64))
        self.gate = torch.nn.Sigmoid()

    def forward(self, *pooled: torch.Tensor) -> torch.Tensor:
        z = sum(w * p for w, p in zip(self.mix, pooled))
        shape = [1] * z.dim()
        shape[1 if z.shape[1] == self.scale.numel() else -1] = self.scale.numel()
        return self.gate(z * self.scale.view(shape))


def _plain(x, gate, dims, pools):
    """The same computation with plain autograd ops (what torch.compile / ONNX see)."""
    pooled = [x.mean(dims, keepdim=True) if k == "mean" else x.amax(dims, keepdim=True)
              for k in pools]
    return x * gate(*pooled)


CASES = [
    ((2, 3), ("mean",), 6),            # SE / ECA: channel gate
    ((2, 3), ("mean", "max"), 6),      # CBAM channel gate
    ((1,), ("mean", "max"), 5),        # CBAM spatial gate (width = W)
    ((1,), ("max",), 5),
]


@pytest.mark.parametrize(("dims", "pools", "width"), CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_path_equals_plain_autograd(dims, pools, width, channels_last) -> None:
    torch.manual_seed(0)
    gate = _TinyGate(len(pools), width)
    x = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert fast_path_enabled(x1)
    y1 = pool_gate_scale(x1, gate, dims, pools)
    expected = "_ScaleDeferredBackward" if pools == ("mean",) else "_ScaleByBackward"
    assert type(y1.grad_fn).__name__ == expected
    y2 = _plain(x2, gate, dims, pools)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    g = torch.randn_like(y1)
    got = torch.autograd.grad(y1, [x1, *gate.parameters()], g)
    want = torch.autograd.grad(y2, [x2, *gate.parameters()], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    if channels_last:
        assert y1.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(("dims", "pools", "width"), CASES)
def test_gradcheck_fast_path(dims, pools, width) -> None:
    torch.manual_seed(1)
    gate = _TinyGate(len(pools), width)
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64, requires_grad=True)
    params = list(gate.parameters())

    def f(x, *ps):
        return pool_gate_scale(x, gate, dims, pools)

    assert torch.autograd.gradcheck(f, (x, *params))


def test_max_gradient_is_split_among_ties_like_amax() -> None:
    # ReLU-like inputs: whole channels of zeros tie at their maximum.
    gate = _TinyGate(2, 4)
    x = torch.relu(torch.randn(2, 4, 3, 3, dtype=torch.float64))
    x[0, 1] = 0.0
    x[1, 2, :2] = 7.0  # two tied maxima
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    y1 = pool_gate_scale(x1, gate, (2, 3), ("mean", "max"))
    y2 = _plain(x2, gate, (2, 3), ("mean", "max"))
    (gx1,) = torch.autograd.grad(y1, [x1], g)
    (gx2,) = torch.autograd.grad(y2, [x2], g)
    torch.testing.assert_close(gx1, gx2, rtol=1e-12, atol=1e-13)


def test_frozen_parameters_and_param_only_gradients() -> None:
    gate = _TinyGate(1, 6)
    gate.scale.requires_grad_(False)
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    y = pool_gate_scale(x, gate, (2, 3), ("mean",))
    y.sum().backward()
    assert gate.scale.grad is None and gate.mix.grad is not None and x.grad is not None
    # x without grad: plain path, the parameters still get theirs.
    gate.mix.grad = None
    x0 = x.detach()
    assert not fast_path_enabled(x0)
    pool_gate_scale(x0, gate, (2, 3), ("mean",)).sum().backward()
    assert gate.mix.grad is not None


def test_outer_graph_can_be_run_twice() -> None:
    gate = _TinyGate(2, 6)
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    y = pool_gate_scale(x, gate, (2, 3), ("mean", "max")).square().sum()
    (a,) = torch.autograd.grad(y, [x], retain_graph=True)
    (b,) = torch.autograd.grad(y, [x])
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_inplace_only_without_graph() -> None:
    gate = _TinyGate(1, 6)
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        ref = x * gate(x.mean((2, 3), keepdim=True))
        buf = x.clone()
        out = pool_gate_scale(buf, gate, (2, 3), ("mean",), inplace=True)
    assert out.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # Gradients enabled and the gate has parameters: never in place.
    buf = x.clone()
    out = pool_gate_scale(buf, gate, (2, 3), ("mean",), inplace=True)
    assert out.data_ptr() != buf.data_ptr()
    torch.testing.assert_close(buf, x, rtol=0, atol=0)


def test_bad_pool_name() -> None:
    with pytest.raises(ValueError, match=r"pool_gate_scale: pools must be among \('mean', 'max'\)"):
        pool_gate_scale(torch.randn(1, 2, 3, 3), lambda p: p, (2, 3), ("median",))


def test_compile_takes_the_plain_path_without_graph_breaks() -> None:
    torch._dynamo.reset()
    gate = _TinyGate(2, 6)

    def f(x):
        return pool_gate_scale(x, gate, (2, 3), ("mean", "max"))

    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y1, y2 = compiled(x1), f(x2)
    torch.testing.assert_close(y1, y2)
    y1.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_scale_helpers() -> None:
    x = torch.randn(2, 3, 4, 5)
    s = torch.rand(2, 3, 1, 1)
    a = torch.rand(2, 1, 4, 5)
    torch.testing.assert_close(scale_channels(x, s), x * s, rtol=0, atol=0)
    torch.testing.assert_close(scale_spatial(x, a), x * a, rtol=0, atol=0)


# ---- the convolution helpers -------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("size", [(1, 1), (3, 4)])
def test_conv2d_same_matches_conv2d_and_gradcheck(k, size) -> None:
    x = torch.randn(2, 2, *size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 2, k, k, dtype=torch.float64, requires_grad=True)
    y = conv2d_same(x, w)
    assert type(y.grad_fn).__name__ == "_Conv2dSameBackward"
    ref = F.conv2d(x, w, padding=k // 2)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, [x, w], g), torch.autograd.grad(ref, [x, w], g)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    assert torch.autograd.gradcheck(conv2d_same, (x, w))


@pytest.mark.parametrize("dense", [True, False])
def test_conv2d_same_both_forward_kernels(dense, monkeypatch) -> None:
    """Small maps take oneDNN's dense kernel, large ones the depthwise form: same values."""
    monkeypatch.setattr(gates_mod, "_DENSE_MAX_PIXELS", 10**9 if dense else 0)
    x = torch.randn(3, 2, 9, 11, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 2, 7, 7, dtype=torch.float64, requires_grad=True)
    y = conv2d_same(x, w)
    torch.testing.assert_close(y, F.conv2d(x, w, padding=3), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(conv2d_same, (x, w))


def test_conv2d_same_channels_last_input() -> None:
    x = torch.randn(2, 2, 6, 6).contiguous(memory_format=torch.channels_last)
    w = torch.randn(1, 2, 7, 7)
    torch.testing.assert_close(conv2d_same(x, w), F.conv2d(x, w, padding=3), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 5, 9])
@pytest.mark.parametrize("length", [1, 4, 64])
def test_conv1d_same_matches_conv1d_and_gradcheck(k, length) -> None:
    z = torch.randn(3, 1, length, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 1, k, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(conv1d_same(z, w), F.conv1d(z, w, padding=k // 2), rtol=1e-12,
                               atol=1e-12)
    assert torch.autograd.gradcheck(conv1d_same, (z, w))


def test_helpers_use_plain_ops_when_not_eager(monkeypatch) -> None:
    monkeypatch.setattr(gates, "_eager", lambda: False)
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    w = torch.randn(1, 2, 3, 3)
    assert type(conv2d_same(x, w).grad_fn).__name__ == "ConvolutionBackward0"
    assert not fast_path_enabled(x)
    z = torch.randn(2, 1, 8, requires_grad=True)
    assert type(conv1d_same(z, torch.randn(1, 1, 3)).grad_fn).__name__ == "ConvolutionBackward0"


def test_disable_fast_path_allows_double_backward() -> None:
    gate = _TinyGate(2, 3)
    x = torch.randn(1, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 3, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(x):
        y = pool_gate_scale(x, gate, (2, 3), ("mean", "max"))
        return conv2d_same(y, w).square().sum()

    with pytest.raises(RuntimeError, match="once_differentiable"):
        (g,) = torch.autograd.grad(f(x), [x], create_graph=True)
        g.sum().backward()
    with disable_fast_path():
        assert not fast_path_enabled(x)
        assert torch.autograd.gradgradcheck(f, (x,))
    assert fast_path_enabled(x)


FAST_PATH_CASES = [(name, preset) for name in ("se", "eca", "cbam")
                   for preset in sorted(attnzoo.info(name).presets)]


@pytest.mark.parametrize(("name", "preset"), FAST_PATH_CASES)
def test_fast_path_equals_plain_ops(name: str, preset: str) -> None:
    """The custom-autograd path (eager, grad) and plain ops (what compile/ONNX trace) agree."""
    from conftest import randomize_

    from attnzoo.ops.gates import disable_fast_path

    torch.manual_seed(0)
    m = randomize_(attnzoo.create(name, 32, preset=preset)).double().train()
    x = torch.randn(2, 32, 5, 6, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    params = list(m.parameters())
    y1 = m(x1)
    with disable_fast_path():
        y2 = m(x2)
    assert y1.grad_fn is not None and y2.grad_fn is not None
    assert type(y1.grad_fn).__name__ != type(y2.grad_fn).__name__  # really two paths
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-13)
    g = torch.randn_like(y1)
    got = torch.autograd.grad(y1, [x1, *params], g)
    want = torch.autograd.grad(y2, [x2, *params], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_scale_twice_values_and_custom_backward() -> None:
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    a = torch.rand(2, 3, 1, 5, dtype=torch.float64)
    b = torch.rand(2, 3, 4, 1, dtype=torch.float64)
    x_before = x.clone()
    with torch.no_grad():
        torch.testing.assert_close(scale_twice(x, a, b), x * a * b, rtol=0, atol=0)
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)  # in place on the product only
    xr, ar, br = (t.clone().requires_grad_() for t in (x, a, b))
    out = scale_twice(xr, ar, br)
    assert type(out.grad_fn).__name__ == "_ScaleTwiceBackward"
    g = torch.randn_like(x)
    got = torch.autograd.grad(out, [xr, ar, br], g)
    x2, a2, b2 = (t.clone().requires_grad_() for t in (x, a, b))
    want = torch.autograd.grad(x2 * a2 * b2, [x2, a2, b2], g)
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-13)
    assert torch.autograd.gradcheck(scale_twice, (xr, ar, br))
    # only some inputs needing a gradient
    (ga,) = torch.autograd.grad(scale_twice(x, ar, b), [ar], g)
    torch.testing.assert_close(ga, (g * x * b).sum(2, keepdim=True), rtol=1e-12, atol=1e-13)
