"""attnzoo.ops.pairwise: the memory-efficient kernels equal the naive (N, M) formulas."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from attnzoo.ops.pairwise import (
    _count_below,
    dot_product_affinity,
    dot_product_attention,
    from_positions,
    relu_sum_affinity,
    relu_sum_attention,
    softmax_affinity,
    softmax_attention,
    to_positions,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "modules"))
from pixel_pair_helpers import LargestTensor  # noqa: E402


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed), dtype=torch.float64, requires_grad=True)


def naive_relu_sum(a, b, v):
    w = torch.relu(a[:, :, None] + b[:, None, :])  # (B, N, M)
    return torch.einsum("bnm,bmd->bnd", w, v) / b.shape[1]


def _compare(fn, ref, inputs, atol=1e-12, rtol=1e-10):
    out, out_ref = fn(*inputs), ref(*inputs)
    torch.testing.assert_close(out, out_ref, atol=atol, rtol=rtol)
    r = torch.randn(out.shape, generator=gen(9), dtype=out.dtype)
    g = torch.autograd.grad((out * r).sum(), inputs)
    g_ref = torch.autograd.grad((out_ref * r).sum(), inputs)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize(("n", "m", "d"), [(50, 13, 3), (1, 1, 1), (7, 30, 2), (64, 64, 5)])
def test_relu_sum_attention_matches_naive(n: int, m: int, d: int) -> None:
    _compare(
        relu_sum_attention,
        naive_relu_sum,
        (rand(2, n, seed=1), rand(2, m, seed=2), rand(2, m, d, seed=3)),
    )


def test_relu_sum_attention_all_or_nothing_active() -> None:
    """a_i + b_j > 0 for every pair, or < 0 for every pair: the prefix is all or empty."""
    v = rand(2, 9, 3, seed=3)
    b = rand(2, 9, seed=2)
    for shift in (100.0, -100.0):
        a = (torch.randn(2, 4, generator=gen(4), dtype=torch.float64) + shift).requires_grad_()
        _compare(relu_sum_attention, naive_relu_sum, (a, b, v))


def test_relu_sum_attention_values_with_exact_ties() -> None:
    """a_i = -b_j exactly: ReLU(0) contributes 0 whichever side the tie falls."""
    b = torch.tensor([[0.5, -1.0, 2.0, -0.25]], dtype=torch.float64)
    a = torch.tensor([[-0.5, 1.0, 0.25, 3.0, -2.0]], dtype=torch.float64)
    v = torch.randn(1, 4, 3, generator=gen(5), dtype=torch.float64)
    torch.testing.assert_close(relu_sum_attention(a, b, v), naive_relu_sum(a, b, v))


def test_relu_sum_gradcheck() -> None:
    inputs = (rand(1, 6, seed=1), rand(1, 5, seed=2), rand(1, 5, 2, seed=3))
    assert torch.autograd.gradcheck(relu_sum_attention, inputs)


@pytest.mark.parametrize(("n", "m"), [(20, 7), (3, 40), (1, 1)])
def test_count_below_equals_searchsorted(n: int, m: int) -> None:
    values = torch.randn(3, m, generator=gen(1))
    thresholds = torch.randn(3, n, generator=gen(2))
    expected = torch.searchsorted(values.sort(dim=1).values, thresholds, right=False)
    assert torch.equal(_count_below(values, thresholds), expected)


@pytest.mark.parametrize(("d", "dv"), [(4, 4), (2, 8), (8, 3)])
def test_softmax_attention_matches_naive_and_is_fused(d: int, dv: int) -> None:
    q, k, v = rand(2, 30, d, seed=1), rand(2, 11, d, seed=2), rand(2, 11, dv, seed=3)
    for scale in (1.0, d**-0.5):

        def naive(q, k, v, scale=scale):
            return torch.softmax(scale * q @ k.transpose(1, 2), -1) @ v

        _compare(lambda *t, s=scale: softmax_attention(*t, scale=s), naive, (q, k, v))
        torch.testing.assert_close(softmax_affinity(q, k, scale) @ v, naive(q, k, v))
    # unequal widths and transposed (non unit-stride) inputs must still take the fused kernel
    n = 2048
    q = torch.randn(2, d, n).transpose(1, 2)
    k = torch.randn(2, d, n).transpose(1, 2)
    v = torch.randn(2, dv, n).transpose(1, 2)
    with LargestTensor() as spy:
        softmax_attention(q, k, v)
    assert spy.numel < 2 * n * n // 64, f"{spy.op} produced {spy.numel} elements"


def test_dot_product_attention_matches_naive() -> None:
    q, k, v = rand(2, 30, 4, seed=1), rand(2, 11, 4, seed=2), rand(2, 11, 6, seed=3)

    def naive(q, k, v):
        return (q @ k.transpose(1, 2) / k.shape[1]) @ v

    _compare(dot_product_attention, naive, (q, k, v))
    torch.testing.assert_close(dot_product_affinity(q, k) @ v, naive(q, k, v))
    torch.testing.assert_close(
        relu_sum_affinity(q[..., 0], k[..., 0]) @ v, naive_relu_sum(q[..., 0], k[..., 0], v)
    )


def test_positions_round_trip_and_layout() -> None:
    x = torch.randn(2, 5, 3, 4)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    p = to_positions(x)
    assert p.shape == (2, 12, 5)
    assert to_positions(x_cl).is_contiguous()  # free for channels-last
    p = p.contiguous()
    back = from_positions(p, x)
    torch.testing.assert_close(back, x)
    assert back.is_contiguous(memory_format=torch.channels_last)
    assert back.data_ptr() == p.data_ptr()  # a view


def test_relu_sum_compiles_fullgraph_with_dynamic_sizes() -> None:
    torch._dynamo.reset()
    compiled = torch.compile(relu_sum_attention, fullgraph=True, dynamic=True, backend="aot_eager")
    for n, m in ((20, 7), (9, 31)):
        a, b, v = torch.randn(2, n), torch.randn(2, m), torch.randn(2, m, 3)
        torch.testing.assert_close(compiled(a, b, v), relu_sum_attention(a, b, v))


@pytest.mark.slow
def test_relu_sum_onnx_dynamic_two_sizes(tmp_path) -> None:
    """No ONNX op for searchsorted exists (the dynamo exporter has no translation for
    aten.searchsorted); the merged-sort count exports as TopK/CumSum/ScatterElements."""
    ort = pytest.importorskip("onnxruntime")
    import warnings

    class Wrap(torch.nn.Module):
        def forward(self, a, b, v):
            return relu_sum_attention(a, b, v)

    batch, n, m = (torch.export.Dim(s) for s in ("batch", "n", "m"))
    a, b, v = torch.randn(2, 50), torch.randn(2, 13), torch.randn(2, 13, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            Wrap(),
            (a, b, v),
            dynamo=True,
            opset_version=18,
            verbose=False,
            dynamic_shapes=({0: batch, 1: n}, {0: batch, 1: m}, {0: batch, 1: m}),
        )
    path = str(tmp_path / "relu_sum.onnx")
    program.save(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for shape in ((3, 7, 30), (1, 64, 5)):
        a, b, v = (
            torch.randn(shape[0], shape[1]),
            torch.randn(shape[0], shape[2]),
            torch.randn(shape[0], shape[2], 3),
        )
        got = session.run(None, dict(zip(names, (a.numpy(), b.numpy(), v.numpy()))))[0]
        torch.testing.assert_close(
            torch.from_numpy(got), relu_sum_attention(a, b, v), atol=1e-5, rtol=1e-5
        )


# ---------------------------------------------------------------------------------------------
# second derivatives
def test_softmax_attention_float64_is_twice_differentiable() -> None:
    """Float64 with gradients recorded: the explicit formula (the fused kernel has no derivative
    of its backward)."""
    q, k, v = rand(2, 7, 3, seed=1), rand(2, 5, 3, seed=2), rand(2, 5, 4, seed=3)
    assert torch.autograd.gradgradcheck(
        lambda *t: softmax_attention(*t, scale=0.7), (q, k, v), fast_mode=True
    )


def test_softmax_attention_float32_training_stays_fused() -> None:
    """Ordinary training (float32, forward and backward) never builds the N x M matrix."""
    n = 2048
    q, k, v = (torch.randn(2, n, 4, requires_grad=True) for _ in range(3))
    with LargestTensor() as spy:
        softmax_attention(q, k, v).square().sum().backward()
    assert spy.numel < 2 * n * n // 64, f"{spy.op} produced {spy.numel} elements"


def test_float32_double_backward_under_math_sdpa_kernel() -> None:
    """The documented route for float32 gradient penalties: PyTorch's math SDPA backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def penalty_grads(q, k, v):
        y = softmax_attention(q, k, v)
        (g,) = torch.autograd.grad(y.sin().sum(), q, create_graph=True)
        return torch.autograd.grad(g.square().sum(), (q, k, v))

    q64, k64, v64 = rand(2, 9, 3, seed=1), rand(2, 6, 3, seed=2), rand(2, 6, 5, seed=3)
    expected = penalty_grads(q64, k64, v64)
    q, k, v = (t.detach().float().requires_grad_() for t in (q64, k64, v64))
    with sdpa_kernel(SDPBackend.MATH):
        got = penalty_grads(q, k, v)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e.float(), rtol=1e-4, atol=1e-5)
