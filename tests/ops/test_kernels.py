"""attnzoo.ops.kernels: the fused C kernels against plain torch formulas, their NaN/inf semantics,
argument checks, ``usable``, the build cache and the fallbacks (no compiler, disabled by the
environment), and the modules that use them (CBAM and its gates, SE, ECA): the kernel path
against the plain-torch path, values and gradients. Sections 9-13: the BatchNorm and GC kernels
(``rows_mean_m2`` ... ``rows_affine2_pixels``) against their formulas, their NaN semantics and
thread invariance, the argument checks of every kernel, global hooks (CBAM's fused inference,
``gates.has_hooks``) and the CPU in the build-cache key.

Tolerances. A kernel that reduces ``n`` float32 terms is compared with the same formula
evaluated in float64 (exact for our purposes: float64 sums of float32 data carry ~1e-16 relative
error), and must be within the classic float32 bound for a sum of ``n`` terms taken in *any*
order, ``|err| <= gamma * sum_i |t_i|``. ``gamma = n * u`` (``u = 2**-24``) is the deterministic
worst case (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., Sec. 3.1/4.2);
for large ``n`` we use the probabilistic bound ``lambda * sqrt(n) * u`` with ``lambda = 8``
(Higham & Mary, SIAM J. Sci. Comput. 2019, Thm. 3.1: holds with probability at least
``1 - 2n exp(-lambda^2 / 2)``, i.e. failure odds below 1e-9 for every size used here), whichever
is smaller. Results that involve no summation (the max, the elementwise products) must be
bit-exact. Module outputs and gradients, kernel path against plain path (both float32), use
``rtol 1e-5`` and an ``atol`` of ``1e-6`` of the tensor's largest magnitude for elementwise
results, ``1e-5`` for parameter gradients, which are sums over up to ``B*H*W = 784*4`` terms of
mixed sign whose cancellation amplifies the few-ulp differences of the two paths by about
``sqrt(N)``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.ops import gates, kernels

U = 2.0**-24  # float32 unit roundoff
LAMBDA = 8.0
CC = os.environ.get("CC", "cc")
HAVE_CC = shutil.which(CC) is not None
DISABLED_BY_ENV = os.environ.get("ATTNZOO_KERNELS", "1").strip().lower() in (
    "0", "false", "no", "off")
NAN, INF = float("nan"), float("inf")
KERNEL_NAMES = ("rows_mean_max", "rows_dot", "channel_mean_max_scaled", "scale_channel_spatial",
                "conv_same")

# B*C*H*W: 32761 < 32768 (serial), 32768 (parallel from exactly the threshold), 33282 and more.
SHAPES = [
    (2, 3, 5, 7),       # row of 35: not a multiple of 16
    (1, 1, 1, 1),
    (3, 17, 13, 20),    # row of 260 = 16 * 16 + 4
    (2, 5, 1, 33),      # row of 33
    (1, 1, 181, 181),   # 32761 elements: just below the parallel threshold
    (2, 4, 64, 64),     # 32768: at the threshold; 4096 pixels = 8 blocks of 512
    (1, 2, 129, 129),   # 33282: just above
    (8, 64, 56, 56),    # 1.6M; 3136 pixels = 6 blocks of 512 + 64
]


# --------------------------------------------------------------------------------------------
# helpers


def _gamma(n: int) -> float:
    """Relative error factor of a float32 sum/dot product with ``n`` roundings, any order."""
    if n <= 0:
        return 0.0
    return min(LAMBDA * math.sqrt(n), float(n)) * U * 1.001  # 1.001: second-order terms


def _assert_within(got: torch.Tensor, ref64: torch.Tensor, bound: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.shape == ref64.shape
    err = (got.double() - ref64).abs()
    bad = ~(err <= bound)
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} values off; worst error {err[bad].max().item():.3e} "
        f"vs bound {bound.expand_as(err)[bad].min().item():.3e}")


def _assert_mean_ok(got: torch.Tensor, x64: torch.Tensor, dims, n: int) -> None:
    """``got`` is ``mean(x, dims)`` of float32 data (``x64`` the same data in float64)."""
    ref = x64.mean(dims, keepdim=True)
    bound = _gamma(n - 1) * x64.abs().mean(dims, keepdim=True) + 2 * U * ref.abs()
    _assert_within(got, ref, bound)


def _assert_same_nonfinite(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """NaN where ``expected`` is NaN, the same infinities; returns the mask of finite values."""
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    inf = torch.isinf(expected)
    assert torch.equal(torch.isinf(got), inf)
    assert torch.equal(got[inf], expected[inf])
    return torch.isfinite(expected)


def _at_one_and_two_threads(run):
    """``run()`` with 1 and then 2 torch threads; the thread count is restored afterwards."""
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        return one, run()
    finally:
        torch.set_num_threads(previous)


def _randn(shape, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * scale


@pytest.fixture
def lib() -> None:
    """The kernels must be loaded; they can be missing only without a compiler or when
    disabled by ``ATTNZOO_KERNELS`` (test_available_iff_compiler checks that it is so)."""
    if not kernels.available():
        if HAVE_CC and not DISABLED_BY_ENV:
            pytest.fail(f"kernels unavailable with a compiler: {kernels.unavailable_reason()}")
        pytest.skip(f"no fused kernels here: {kernels.unavailable_reason()}")


@pytest.fixture
def calls(monkeypatch) -> list[str]:
    """Names of the kernels called (each kernel wrapped by a recording spy)."""
    record: list[str] = []
    for name in KERNEL_NAMES:
        original = getattr(kernels, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            record.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, spy)
    return record


# --------------------------------------------------------------------------------------------
# 1. availability


def test_available_iff_compiler():
    if DISABLED_BY_ENV:
        assert kernels.available() is False
        assert "ATTNZOO_KERNELS" in kernels.unavailable_reason()
    elif HAVE_CC:
        assert kernels.available() is True, kernels.unavailable_reason()
        assert kernels.unavailable_reason() is None
    else:
        assert kernels.available() is False
        reason = kernels.unavailable_reason()
        assert isinstance(reason, str) and reason.strip()


# --------------------------------------------------------------------------------------------
# 2. each kernel against its formula


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rows_mean_max(lib, shape):
    x = _randn(shape, seed=1, scale=3.0) + 0.5
    mean, mx = kernels.rows_mean_max(x)
    assert mean.shape == mx.shape == (shape[0], shape[1], 1, 1)
    assert torch.equal(mx, x.amax((2, 3), keepdim=True))
    _assert_mean_ok(mean, x.double(), (2, 3), shape[2] * shape[3])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rows_dot(lib, shape):
    a, b = _randn(shape, seed=2), _randn(shape, seed=3, scale=0.5) - 0.2
    out = kernels.rows_dot(a, b)
    assert out.shape == (shape[0], shape[1], 1, 1)
    t = a.double() * b.double()  # exact products
    bound = _gamma(shape[2] * shape[3]) * t.abs().sum((2, 3), keepdim=True)
    _assert_within(out, t.sum((2, 3), keepdim=True), bound)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_channel_mean_max_scaled(lib, shape):
    b, c = shape[:2]
    x = _randn(shape, seed=4)
    s = torch.rand(b, c, 1, 1, generator=torch.Generator().manual_seed(5)) * 2 - 0.5  # some < 0
    mean, mx = kernels.channel_mean_max_scaled(x, s)
    assert mean.shape == mx.shape == (b, 1, shape[2], shape[3])
    assert torch.equal(mx, (x * s).amax(1, keepdim=True))
    t = x.double() * s.double()
    # the kernel sums the rounded products fl(x * s): c products and c - 1 additions
    bound = _gamma(c) * t.abs().mean(1, keepdim=True) + 2 * U * t.mean(1, keepdim=True).abs()
    _assert_within(mean, t.mean(1, keepdim=True), bound)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_scale_channel_spatial(lib, shape):
    b, c, h, w = shape
    x = _randn(shape, seed=6)
    s = torch.rand(b, c, 1, 1, generator=torch.Generator().manual_seed(7))
    a = torch.rand(b, 1, h, w, generator=torch.Generator().manual_seed(8))
    expected = (x * s) * a
    out = kernels.scale_channel_spatial(x, s, a)
    assert out.shape == shape and out.data_ptr() != x.data_ptr()
    assert torch.equal(out, expected)
    # into x itself: returns x, holding the same values
    ptr = x.data_ptr()
    result = kernels.scale_channel_spatial(x, s, a, out=x)
    assert result is x and x.data_ptr() == ptr
    assert torch.equal(x, expected)


def test_scale_channel_spatial_out_other_tensor(lib):
    x, s, a = _randn((2, 3, 4, 5), seed=9), _randn((2, 3, 1, 1), seed=10), _randn((2, 1, 4, 5))
    out = torch.full_like(x, 7.0)
    x_before = x.clone()
    assert kernels.scale_channel_spatial(x, s, a, out=out) is out
    assert torch.equal(out, (x * s) * a) and torch.equal(x, x_before)


CONV_MAPS = [
    (2, 9, 11),     # non-square
    (1, 1, 13),     # H = 1
    (2, 8, 1),      # W = 1
    (1, 1, 1),
    (3, 5, 3),      # smaller than the kernel
    (2, 40, 57),    # B*Cin*H*W*k = 4560 * Cin * k: parallel when Cin * k >= 8
]


def _check_conv(x: torch.Tensor, w: torch.Tensor) -> None:
    k = w.shape[-1]
    out = kernels.conv_same(x, w)
    assert out.shape == (x.shape[0], 1, x.shape[2], x.shape[3])
    ref = F.conv2d(x.double(), w.double(), padding=k // 2)
    bound = _gamma(w.numel()) * F.conv2d(x.double().abs(), w.double().abs(), padding=k // 2)
    _assert_within(out, ref, bound)
    # and the float32 torch op it replaces agrees within the sum of both bounds
    torch.testing.assert_close(out, F.conv2d(x, w, padding=k // 2), rtol=0,
                               atol=2 * bound.max().item() + 1e-30)


@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize("cin", [1, 2, 3])
@pytest.mark.parametrize("bhw", CONV_MAPS, ids=str)
def test_conv_same(lib, k, cin, bhw):
    b, h, w = bhw
    x = _randn((b, cin, h, w), seed=11)
    weight = _randn((1, cin, k, k), seed=12, scale=0.3)
    _check_conv(x, weight)


@pytest.mark.parametrize("w, k", [(4090, 7), (4096, 1), (4092, 5)])
def test_conv_same_widest_row(lib, w, k):
    """``W + k - 1 == MAX_CONV_ROW``: the padded row fills the kernel's buffer exactly."""
    assert w + k - 1 == kernels.MAX_CONV_ROW
    _check_conv(_randn((1, 2, 3, w), seed=13), _randn((1, 2, k, k), seed=14, scale=0.3))


# --------------------------------------------------------------------------------------------
# 3. NaN / inf semantics (as torch: amax propagates NaN, sums propagate NaN and inf)


@pytest.mark.parametrize("n_w", [7, 20, 33])  # rows of 35 (tail), 100, 165 values
def test_rows_mean_max_nonfinite(lib, n_w):
    x = _randn((3, 4, 5, n_w), seed=15)
    n = 5 * n_w
    flat = x.view(3, 4, n)
    flat[0, 0, n - 1] = NAN              # NaN in the tail -> mean NaN, max NaN
    flat[0, 1, 0] = NAN                  # NaN first
    flat[0, 2, 16] = NAN                 # NaN after one 16-wide vector
    flat[0, 2, 3] = INF                  # ... together with +inf: max still NaN
    flat[0, 3, n // 2] = INF             # +inf -> mean inf, max inf
    flat[1, 0, 1] = INF                  # +inf and -inf -> mean NaN, max inf (not NaN)
    flat[1, 0, n - 2] = -INF
    flat[1, 1, 5] = -INF                 # -inf -> mean -inf, max finite
    flat[1, 2].fill_(-INF)               # all -inf -> max -inf
    flat[1, 3].fill_(NAN)                # all NaN
    flat[2, 1, 0] = INF                  # several +inf
    flat[2, 1, n - 1] = INF
    mean, mx = kernels.rows_mean_max(x)
    expected_max = x.amax((2, 3), keepdim=True)
    expected_mean = x.mean((2, 3), keepdim=True)
    # the cases above, spelled out
    assert torch.isnan(mx[0, :3]).all() and mx[0, 3].item() == INF
    assert mx[1, 0].item() == INF and torch.isnan(mean[1, 0]).all()
    assert mx[1, 2].item() == -INF and torch.isnan(mx[1, 3]).all()
    torch.testing.assert_close(mx, expected_max, rtol=0, atol=0, equal_nan=True)
    finite = _assert_same_nonfinite(mean, expected_mean).view(12)
    assert finite.tolist() == [False] * 8 + [True, False, True, True]  # rows (2, 0), (2, 2), (2, 3)
    rows = x.double().view(12, 1, 1, n)[finite]
    _assert_mean_ok(mean.view(12, 1, 1, 1)[finite], rows, (2, 3), n)


def test_channel_mean_max_scaled_nonfinite(lib):
    b, c, h, w = 2, 5, 4, 9
    x = _randn((b, c, h, w), seed=16)
    s = torch.rand(b, c, 1, 1, generator=torch.Generator().manual_seed(17)) + 0.1
    x[0, 3, 0, 0] = NAN                          # NaN in one channel -> that pixel's max NaN
    x[0, 0, 1, 2] = INF                          # +inf -> inf
    x[1, 1, 3, 8] = INF                          # last pixel: +inf and -inf -> mean NaN, max inf
    x[1, 4, 3, 8] = -INF
    x[1, :, 2, 2] = -INF                         # all -inf -> max -inf
    x[0, 2, 3, 3] = NAN                          # NaN with +inf at the same pixel -> NaN
    x[0, 4, 3, 3] = INF
    mean, mx = kernels.channel_mean_max_scaled(x, s)
    prod = x * s
    assert torch.isnan(mx[0, 0, 0, 0]) and torch.isnan(mx[0, 0, 3, 3])
    assert mx[0, 0, 1, 2].item() == INF and mx[1, 0, 3, 8].item() == INF
    assert torch.isnan(mean[1, 0, 3, 8]) and mx[1, 0, 2, 2].item() == -INF
    torch.testing.assert_close(mx, prod.amax(1, keepdim=True), rtol=0, atol=0, equal_nan=True)
    finite = _assert_same_nonfinite(mean, prod.mean(1, keepdim=True))
    assert int(finite.sum()) == b * h * w - 5  # the five pixels set above
    t = x.double() * s.double()
    ref = t.mean(1, keepdim=True)
    bound = _gamma(c) * t.abs().mean(1, keepdim=True) + 2 * U * ref.abs()
    _assert_within(mean[finite], ref[finite], bound[finite])


def test_channel_mean_max_scaled_infinite_gate(lib):
    """A gate of +inf: ``0 * inf`` is NaN, ``x * inf`` is +-inf, as in ``(x * s).amax(1)``."""
    x = _randn((2, 3, 2, 3), seed=18)
    x[1, 2, 0, 1] = 0.0
    s = torch.rand(2, 3, 1, 1) + 0.1
    s[1, 2] = INF
    mean, mx = kernels.channel_mean_max_scaled(x, s)
    prod = x * s
    assert torch.isnan(mx[1, 0, 0, 1])
    torch.testing.assert_close(mx, prod.amax(1, keepdim=True), rtol=0, atol=0, equal_nan=True)
    _assert_same_nonfinite(mean[1], prod.mean(1, keepdim=True)[1])


def test_rows_dot_nonfinite(lib):
    a, b = _randn((2, 3, 4, 5), seed=19), _randn((2, 3, 4, 5), seed=20)
    a[0, 0, 3, 4] = NAN            # NaN -> NaN
    a[0, 1, 0, 0] = 0.0            # 0 * inf -> NaN
    b[0, 1, 0, 0] = INF
    a[1, 2, 2, 2] = 1.0            # 1 * inf -> inf
    b[1, 2, 2, 2] = INF
    out = kernels.rows_dot(a, b)
    expected = (a * b).sum((2, 3), keepdim=True)
    assert torch.isnan(out[0, :2]).all() and out[1, 2].item() == INF
    finite = _assert_same_nonfinite(out, expected)
    t = a.double() * b.double()
    bound = _gamma(20) * t.abs().sum((2, 3), keepdim=True)
    _assert_within(out[finite], t.sum((2, 3), keepdim=True)[finite], bound[finite])


def test_scale_channel_spatial_nonfinite_exact(lib):
    x, s, a = _randn((2, 3, 4, 5), seed=21), torch.rand(2, 3, 1, 1), torch.rand(2, 1, 4, 5)
    x[0, 0, 0, 0], x[1, 2, 3, 4], s[1, 0], a[0, 0, 1, 1] = NAN, INF, INF, 0.0
    expected = (x * s) * a
    torch.testing.assert_close(kernels.scale_channel_spatial(x, s, a), expected, rtol=0, atol=0,
                               equal_nan=True)


# --------------------------------------------------------------------------------------------
# 4. conv_same's argument checks, and conv2d_same's fallback for maps wider than the buffer


@pytest.mark.parametrize("x_shape, w_shape", [
    ((1, 2, 5, 5), (1, 2, 4, 4)),                              # even k
    ((1, 2, 5, 5), (1, 2, 2, 2)),
    ((1, 2, 5, 5), (1, 3, 3, 3)),                              # Cin mismatch
    ((1, 2, 5, 5), (2, 2, 3, 3)),                              # two output channels
    ((1, 2, 5, 5), (1, 2, 3, 5)),                              # not square
    ((1, 2, 5, 5), (1, 2, 5, 3)),
    ((1, 2, 2, kernels.MAX_CONV_ROW - 5), (1, 2, 7, 7)),       # W + k - 1 = MAX + 1
    ((1, 1, 1, kernels.MAX_CONV_ROW + 1), (1, 1, 1, 1)),
], ids=str)
def test_conv_same_rejects(lib, x_shape, w_shape):
    with pytest.raises(ValueError, match="conv_same"):
        kernels.conv_same(torch.randn(x_shape), torch.randn(w_shape))


@pytest.mark.parametrize("h", [1, 2])  # B*H*W below / above gates' dense-kernel threshold
@pytest.mark.parametrize("grad", [False, True])
def test_conv2d_same_falls_back_for_wide_maps(lib, calls, h, grad):
    w_map = 4100
    assert w_map + 7 - 1 > kernels.MAX_CONV_ROW
    x = _randn((1, 2, h, w_map), seed=22)
    weight = _randn((1, 2, 7, 7), seed=23, scale=0.3)
    with torch.set_grad_enabled(grad):
        out = gates.conv2d_same(x.requires_grad_(grad), weight)
    assert "conv_same" not in calls
    ref = F.conv2d(x.detach().double(), weight.double(), padding=3)
    bound = 4 * _gamma(98) * F.conv2d(x.detach().double().abs(), weight.double().abs(), padding=3)
    _assert_within(out.detach(), ref, bound)  # 4x: oneDNN / depthwise sums, then a sum over Cin
    # a map that fits takes the kernel
    gates.conv2d_same(_randn((1, 2, h, 64)), weight)
    assert calls == ["conv_same"]


# --------------------------------------------------------------------------------------------
# 5. usable


def test_usable():
    x = torch.randn(2, 3, 4, 5)
    assert kernels.usable(x) is kernels.available()
    assert kernels.usable(x, torch.randn(2, 3, 1, 1)) is kernels.available()
    assert not kernels.usable(x.double())
    assert not kernels.usable(x.half())
    assert not kernels.usable(x.to(memory_format=torch.channels_last))
    assert not kernels.usable(x.transpose(2, 3))
    assert not kernels.usable(x[:, :, :, ::2])
    assert not kernels.usable(torch.randn(0, 3, 4, 5))
    assert not kernels.usable(torch.randn(2, 3, 0, 5))
    assert not kernels.usable(x, x.double())  # every tensor must qualify
    assert not kernels.usable(x.transpose(2, 3), x)


# --------------------------------------------------------------------------------------------
# 6. modules: kernel path against the plain-torch path

MODULE_CASES = [
    ("cbam", None, {}),
    ("cbam", "timm", {}),
    ("cbam", "yolov4-tiny", {}),
    ("cbam", None, {"order": "spatial-channel"}),
    ("cbam", None, {"order": "parallel"}),
    ("cbam_channel", None, {}),
    ("cbam_spatial", None, {}),
    ("cbam_spatial", "timm", {}),
    ("se", None, {}),
    ("eca", None, {}),
]
MODULE_SHAPES = [(2, 16, 9, 11), (4, 64, 14, 14)]
EVAL_SHAPES = MODULE_SHAPES + [(1, 16, 1, 1), (1, 32, 1, 40)]


def _module(name: str, channels: int, preset=None, seed: int = 0, **kw) -> torch.nn.Module:
    """A registered module with random N(0, 0.3) parameters and random BatchNorm statistics.

    The first layer of the channel MLPs (``fc1``) is drawn from |N(0, 0.3)| (bias + 0.3): at
    ``C = 16, r = 16`` the MLP has one hidden ReLU, and if it were dead for every sample no
    gradient would reach the pools, which the train-mode tests would then not check.
    """
    module = attnzoo.create(name, channels, preset=preset, **kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            if "fc1." in key:
                p.abs_().add_(0.3 if key.endswith("bias") else 0.0)
        for key, buf in module.named_buffers():
            if key.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.1)
            elif key.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=gen) + 0.5)
    return module


@contextlib.contextmanager
def _plain_path(monkeypatch):
    """Within this context ``usable()`` is False: every module runs its plain-torch path."""
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "available", lambda: False)
        yield


def _assert_close_f32(got: torch.Tensor, ref: torch.Tensor, atol_rel: float = 1e-6,
                      what: str = "") -> None:
    scale = ref.abs().max().item() if ref.numel() else 0.0
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=atol_rel * scale,
                               msg=lambda m: f"{what}: {m}")


def _train_step(module, x, g):
    """Forward in train mode and backward ``g``: (output, grad of x, {param: grad}, buffers)."""
    module.train()
    x = x.clone().requires_grad_()
    out = module(x)
    out.backward(g)
    grads = {k: p.grad for k, p in module.named_parameters()}
    return out.detach(), x.grad, grads, dict(module.named_buffers())


@pytest.mark.parametrize("shape", EVAL_SHAPES, ids=str)
@pytest.mark.parametrize("name, preset, kw", MODULE_CASES, ids=lambda v: str(v))
def test_module_eval_kernel_vs_plain(lib, calls, monkeypatch, name, preset, kw, shape):
    module = _module(name, shape[1], preset, **kw).eval()
    x = _randn(shape, seed=30)
    with torch.no_grad():
        fused = module(x.clone())
        if name.startswith("cbam"):  # (SE and ECA: one mean and one multiply, no kernel)
            assert calls
        del calls[:]
        with _plain_path(monkeypatch):
            plain = module(x.clone())
    assert calls == []
    _assert_close_f32(fused, plain, what="output")


@pytest.mark.parametrize("shape", MODULE_SHAPES, ids=str)
@pytest.mark.parametrize("name, preset, kw", MODULE_CASES, ids=lambda v: str(v))
def test_module_train_kernel_vs_plain(lib, calls, monkeypatch, name, preset, kw, shape):
    module = _module(name, shape[1], preset, **kw)
    twin = copy.deepcopy(module)
    x, g = _randn(shape, seed=31), _randn(shape, seed=32)
    out_k, gx_k, grads_k, bufs_k = _train_step(module, x, g)
    assert calls  # SE and ECA: rows_dot in the backward; CBAM's gates: the pools and the conv
    del calls[:]
    with _plain_path(monkeypatch):
        out_p, gx_p, grads_p, bufs_p = _train_step(twin, x, g)
    assert calls == []
    _assert_close_f32(out_k, out_p, what="output")
    _assert_close_f32(gx_k, gx_p, what="grad x")
    assert grads_k.keys() == grads_p.keys() and grads_k
    assert all(v.abs().max() > 0 for v in grads_p.values())  # every gradient path is live
    for key in grads_p:
        _assert_close_f32(grads_k[key], grads_p[key], atol_rel=1e-5, what=f"grad {key}")
    for key in bufs_p:
        _assert_close_f32(bufs_k[key].float(), bufs_p[key].float(), what=key)


@pytest.mark.parametrize("preset", [None, "timm"])
def test_cbam_train_mode_without_grad(lib, calls, monkeypatch, preset):
    """No graph but BatchNorm in training mode: the fused path uses (and updates) the batch
    statistics exactly as the plain path does."""
    module = _module("cbam", 16, preset).train()
    twin = copy.deepcopy(module)
    x = _randn((2, 16, 9, 11), seed=36)
    with torch.no_grad():
        fused = module(x.clone())
        assert "scale_channel_spatial" in calls
        with _plain_path(monkeypatch):
            plain = twin(x.clone())
    _assert_close_f32(fused, plain, what="output")
    for (key, buf), other in zip(module.named_buffers(), twin.buffers()):
        _assert_close_f32(buf.float(), other.float(), what=key)
    assert module.spatial.bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize("preset", [None, "timm", "yolov4-tiny"])
def test_cbam_inplace(lib, calls, monkeypatch, preset):
    module = _module("cbam", 16, preset).eval()
    x0 = _randn((2, 16, 9, 11), seed=33)
    with torch.no_grad():
        with _plain_path(monkeypatch):
            plain = module(x0.clone())
        x = x0.clone()
        out = module(x)                       # inplace=False: x untouched
        assert out.data_ptr() != x.data_ptr() and torch.equal(x, x0)
        assert "scale_channel_spatial" in calls
        x_in = x0.clone()
        out_in = module(x_in, inplace=True)   # written into x
    assert out_in.data_ptr() == x_in.data_ptr()
    assert torch.equal(out_in, out)
    _assert_close_f32(out_in, plain, what="output")


@pytest.mark.parametrize("name", ["se", "eca", "cbam_channel", "cbam_spatial"])
def test_gate_inplace(lib, name):
    module = _module(name, 16).eval()
    x0 = _randn((2, 16, 9, 11), seed=34)
    with torch.no_grad():
        out = module(x0.clone())
        x = x0.clone()
        out_in = module(x, inplace=True)
    assert out_in.data_ptr() == x.data_ptr() and torch.equal(out_in, out)
    # with a graph to record, inplace=True must not write into x
    x = x0.clone().requires_grad_()
    out_g = module.train()(x, inplace=True)
    assert out_g.data_ptr() != x.data_ptr() and torch.equal(x.detach(), x0)


def test_cbam_hooks(lib, calls, monkeypatch):
    module = _module("cbam", 16).eval()
    x = _randn((2, 16, 9, 11), seed=35)
    with torch.no_grad():
        reference = module(x.clone())
    assert "scale_channel_spatial" in calls  # the fused path ran
    # hooks on the sigmoids (the documented way to read the maps) fire on the fused path too
    maps = {}
    handles = [module.channel.gate.register_forward_hook(lambda m, i, o: maps.update(c=o)),
               module.spatial.gate.register_forward_hook(lambda m, i, o: maps.update(s=o))]
    del calls[:]
    with torch.no_grad():
        out = module(x.clone())
    assert "scale_channel_spatial" in calls and torch.equal(out, reference)
    assert maps["c"].shape == (2, 16, 1, 1) and maps["s"].shape == (2, 1, 9, 11)
    with torch.no_grad():
        _assert_close_f32(maps["s"], module.attention_map(x), what="spatial map")
    for handle in handles:
        handle.remove()
    # a forward hook on a whole gate: the fused path is skipped and the hook sees the output
    seen = []
    handle = module.spatial.register_forward_hook(lambda m, i, o: seen.append(o))
    del calls[:]
    with torch.no_grad():
        out = module(x.clone())
    handle.remove()
    assert len(seen) == 1 and seen[0] is out
    assert "scale_channel_spatial" not in calls
    _assert_close_f32(out, reference, what="output with hook")
    # a pre-hook on the channel gate too
    seen_pre = []
    handle = module.channel.register_forward_pre_hook(lambda m, i: seen_pre.append(i[0].shape))
    with torch.no_grad():
        out = module(x.clone())
    handle.remove()
    assert seen_pre == [x.shape]
    _assert_close_f32(out, reference, what="output with pre-hook")


# --------------------------------------------------------------------------------------------
# 7. fallbacks and the build cache, in fresh interpreters (the loader runs once per process)

_CHILD = textwrap.dedent('''
    import json, logging, sys
    import torch
    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append((record.levelname, record.getMessage()))
    logging.getLogger("attnzoo").addHandler(Keep())
    torch.set_num_threads(1)
    import attnzoo
    from attnzoo.ops import kernels
    report = {"available": kernels.available(), "reason": kernels.unavailable_reason()}
    if len(sys.argv) > 1:  # run the modules on the parent's data and save the results
        data = torch.load(sys.argv[1])
        results = {}
        for name, state in data["states"].items():
            module = attnzoo.create(name, data["x"].shape[1])
            module.load_state_dict(state)
            with torch.no_grad():
                results[name + ".eval"] = module.eval()(data["x"].clone())
            module.train()
            x = data["x"].clone().requires_grad_()
            out = module(x)
            out.backward(data["g"])
            results[name + ".train"] = out.detach()
            results[name + ".grad_x"] = x.grad
            for key, p in module.named_parameters():
                results[name + ".grad." + key] = p.grad
        torch.save(results, sys.argv[2])
    report["records"] = records
    print(json.dumps(report))
''')


def _run_child(env_changes: dict[str, str | None], *args: str, code: str = _CHILD) -> dict:
    """Run ``code`` (default ``_CHILD``) in a fresh interpreter with ``env_changes`` (``None``
    removes a variable); returns the JSON report on its last line of output."""
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _module_results(data: dict) -> dict[str, torch.Tensor]:
    """What _CHILD computes, in this process."""
    results = {}
    for name, state in data["states"].items():
        module = attnzoo.create(name, data["x"].shape[1])
        module.load_state_dict(state)
        with torch.no_grad():
            results[name + ".eval"] = module.eval()(data["x"].clone())
        out, grad_x, grads, _ = _train_step(module, data["x"], data["g"])
        results[name + ".train"], results[name + ".grad_x"] = out, grad_x
        results.update({f"{name}.grad.{k}": v for k, v in grads.items()})
    return results


@pytest.fixture
def module_data(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """CBAM and SE weights and data saved for a child process, and this process's results
    (kernel path) on them."""
    shape = (2, 16, 9, 11)
    data = {"states": {name: _module(name, 16).state_dict() for name in ("cbam", "se")},
            "x": _randn(shape, seed=40), "g": _randn(shape, seed=41)}
    path = tmp_path / "data.pt"
    torch.save(data, path)
    return path, _module_results(data)


def _compare_child_results(path: Path, expected: dict[str, torch.Tensor]) -> None:
    got = torch.load(path)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        _assert_close_f32(got[key], value, atol_rel=1e-5 if ".grad." in key else 1e-6, what=key)


def test_disabled_by_environment(module_data, tmp_path):
    data_path, expected = module_data
    cache = tmp_path / "cache"
    report = _run_child({"ATTNZOO_KERNELS": "0", "ATTNZOO_CACHE_DIR": str(cache)},
                        str(data_path), str(tmp_path / "out.pt"))
    assert report["available"] is False
    assert "ATTNZOO_KERNELS" in report["reason"]
    assert not cache.exists()  # nothing compiled
    _compare_child_results(tmp_path / "out.pt", expected)


def test_broken_compiler_falls_back_with_a_warning(module_data, tmp_path):
    data_path, expected = module_data
    cache = tmp_path / "cache"
    cache.mkdir()
    report = _run_child({"CC": "/bin/false", "ATTNZOO_CACHE_DIR": str(cache),
                         "ATTNZOO_KERNELS": None}, str(data_path), str(tmp_path / "out.pt"))
    assert report["available"] is False
    assert isinstance(report["reason"], str) and report["reason"].strip()
    warnings = [msg for level, msg in report["records"] if level == "WARNING"]
    assert len(warnings) == 1 and "unavailable" in warnings[0]
    assert list(cache.iterdir()) == []  # no library, no leftover temporary file
    _compare_child_results(tmp_path / "out.pt", expected)


def test_build_cache_is_reused(tmp_path):
    if not HAVE_CC:
        pytest.skip(f"no C compiler ({CC!r}): nothing to build or cache")
    cache = tmp_path / "cache"  # does not exist yet: the loader creates it
    env = {"ATTNZOO_CACHE_DIR": str(cache), "ATTNZOO_KERNELS": None}
    first = _run_child(env)
    assert first["available"] is True, first["reason"]
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 1 and files[0].startswith("kernels-") and files[0].endswith(".so")
    library = cache / files[0]
    stat = library.stat()
    second = _run_child(env)
    assert second["available"] is True and second["records"] == []
    assert sorted(p.name for p in cache.iterdir()) == files  # no new file, no .tmp
    again = library.stat()
    assert (again.st_mtime_ns, again.st_ino, again.st_size) == (
        stat.st_mtime_ns, stat.st_ino, stat.st_size)


# --------------------------------------------------------------------------------------------
# 8. thread count does not change any result


def test_results_independent_of_thread_count(lib):
    shape = (8, 64, 56, 56)
    x, y = _randn(shape, seed=24), _randn(shape, seed=25)
    s = torch.rand(8, 64, 1, 1) + 0.1
    a = torch.rand(8, 1, 56, 56)
    w = _randn((1, 2, 7, 7), seed=26, scale=0.3)
    maps = _randn((8, 2, 56, 56), seed=27)

    def run():
        return [*kernels.rows_mean_max(x), kernels.rows_dot(x, y),
                *kernels.channel_mean_max_scaled(x, s), kernels.scale_channel_spatial(x, s, a),
                kernels.conv_same(maps, w)]

    one, two = _at_one_and_two_threads(run)
    names = ["rows mean", "rows max", "rows_dot", "channel mean", "channel max", "scale", "conv"]
    for name, u, v in zip(names, one, two):
        assert torch.equal(u, v), name


# --------------------------------------------------------------------------------------------
# 9. the normalisation and GC kernels against their formulas
#
# rows_scale_shift, rows_affine2 and rows_affine2_pixels involve no summation and must be
# bit-exact against the same float32 formula evaluated left to right, as torch does (one rounding
# per operation). That holds because the library is compiled with GCC in ISO C mode
# (``-std=c99``), whose default is ``-ffp-contract=off``: no ``a * x + b`` is contracted into a
# fused multiply-add (checked: the library built here holds no vfmadd instruction). A compiler
# that contracts (clang's default ``-ffp-contract=on``) would round once instead of twice and
# differ by up to an ulp; these tests would then fail, on purpose.


def _rows_view(t: torch.Tensor, b: int, c: int) -> torch.Tensor:
    """Per-row coefficients (``B * C`` values) broadcast against ``(B, C, H, W)``."""
    return t.view(b, c, 1, 1)


def _row_coefs(b: int, c: int, seed: int, count: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b * c, generator=gen) for _ in range(count)]


def _check_mean_m2(mean: torch.Tensor, m2: torch.Tensor, x: torch.Tensor) -> None:
    """``mean``, ``m2`` are the kernel's per-row mean and sum of squared deviations of ``x``.

    Bounds for the kernel's shifted one-pass algorithm (shift ``k`` = the row's first element,
    ``d_i = fl(x_i - k)``, ``s = sum d``, ``q = sum d^2``, ``m2 = q - s * (s / n)``), from the
    exact float64 ``D = sum |d|``, ``S = sum d``, ``Q = sum d^2``: ``|q - Q| <= (g + 3u) Q``,
    ``|s - S| <= (g + u) D =: e``, so ``|s (s / n) - S^2 / n| <= e (2|S| + e) / n +
    2u (|S| + e)^2 / n``, plus one rounding of the difference; the mean ``k + s / n`` is within
    ``(g + 3u) D / n + 2u |mean|``.
    """
    b, c = x.shape[:2]
    n = x[0, 0].numel()
    x64 = x.double().reshape(b * c, n)
    d = x64 - x64[:, :1]
    big_d, big_s, big_q = d.abs().sum(1), d.sum(1), (d * d).sum(1)
    g = _gamma(n)
    ref_mean = x64.mean(1)
    ref_m2 = (x64 - ref_mean[:, None]).square().sum(1)
    e = (g + U) * big_d
    err_q = (g + 3 * U) * big_q
    err_t = (e * (2 * big_s.abs() + e) + 2 * U * (big_s.abs() + e).square()) / n
    bound_m2 = 1.001 * (err_q + err_t + U * (ref_m2 + err_q + err_t))
    bound_mean = (g + 3 * U) * big_d / n + 2 * U * ref_mean.abs()
    assert mean.shape == m2.shape == (b, c) + (1,) * (x.dim() - 2)
    _assert_within(mean.reshape(-1), ref_mean, bound_mean)
    _assert_within(m2.reshape(-1), ref_m2, bound_m2)
    assert not torch.signbit(m2).any()  # never negative, not even -0.0


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rows_mean_m2(lib, shape):
    x = _randn(shape, seed=60, scale=3.0) + 0.5
    _check_mean_m2(*kernels.rows_mean_m2(x), x)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rows_mean_m2_large_mean(lib, shape):
    """|mean| >> std: ``sum(x^2) - sum(x)^2 / n`` in float32 would lose every digit; the kernel's
    shifted sums keep m2 within 1e-3 of the float64 value."""
    x = 1000.0 + _randn(shape, seed=61, scale=1e-2)
    mean, m2 = kernels.rows_mean_m2(x)
    _check_mean_m2(mean, m2, x)
    x64 = x.double()
    ref = (x64 - x64.mean((2, 3), keepdim=True)).square().sum((2, 3), keepdim=True)
    torch.testing.assert_close(m2.double(), ref, rtol=1e-3, atol=0)
    if shape[2] * shape[3] > 1:  # the data are hard: the unshifted float32 formula fails
        n = shape[2] * shape[3]
        naive = (x * x).sum((2, 3), keepdim=True) - x.sum((2, 3), keepdim=True).square() / n
        assert ((naive.double() - ref).abs() > 1e-3 * ref).any()


def test_rows_mean_m2_constant_and_near_constant_rows(lib):
    values = [0.0, -0.0, 1.0, -3.5, 1000.1, 1e30, -1e-30, 1e-45, 3e38]
    x = torch.tensor(values).view(1, -1, 1, 1).repeat(2, 1, 13, 20)
    mean, m2 = kernels.rows_mean_m2(x)
    assert torch.equal(mean, x[:, :, :1, :1])
    assert torch.equal(m2, torch.zeros_like(m2)) and not torch.signbit(m2).any()
    # rows one ulp away from constant, some with the shift (first element) the odd one out
    ulp = torch.tensor(1000.0).nextafter(torch.tensor(2000.0)).item() - 1000.0
    gen = torch.Generator().manual_seed(62)
    near = 1000.0 + ulp * torch.randint(-1, 2, (4, 8, 260), generator=gen).float()
    near[0, :, 1:] = 1000.0
    near[0, :, 0] = 1000.0 + ulp * torch.arange(8).remainder(3).sub(1).float()
    near[1, :, :] = 1000.0
    near[1, :, torch.arange(8)] = 1000.0 + ulp  # a single odd element, at position 0 .. 7
    near = near.view(4, 8, 13, 20)
    assert (near != 1000.0).any()
    _check_mean_m2(*kernels.rows_mean_m2(near), near)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rows_sum_dot(lib, shape):
    g, x = _randn(shape, seed=63), _randn(shape, seed=64, scale=0.5) - 0.2
    total, dot = kernels.rows_sum_dot(g, x)
    assert total.shape == dot.shape == (shape[0], shape[1], 1, 1)
    n = shape[2] * shape[3]
    g64 = g.double()
    t = g64 * x.double()
    _assert_within(total, g64.sum((2, 3), keepdim=True),
                   _gamma(n - 1) * g64.abs().sum((2, 3), keepdim=True))
    _assert_within(dot, t.sum((2, 3), keepdim=True), _gamma(n) * t.abs().sum((2, 3), keepdim=True))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rows_scale_shift(lib, shape):
    b, c = shape[:2]
    x = _randn(shape, seed=65, scale=2.0)
    a, s = _row_coefs(b, c, seed=66, count=2)
    out = kernels.rows_scale_shift(x, a, s)
    assert out.shape == shape and out.data_ptr() != x.data_ptr()
    assert torch.equal(out, _rows_view(a, b, c) * x + _rows_view(s, b, c))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rows_affine2(lib, shape):
    b, c = shape[:2]
    g, x = _randn(shape, seed=67), _randn(shape, seed=68, scale=3.0)
    p, q, r = (_rows_view(t, b, c) for t in _row_coefs(b, c, seed=69, count=3))
    out = kernels.rows_affine2(g, x, p.reshape(-1), q.reshape(-1), r.reshape(-1))
    assert out.shape == shape
    assert torch.equal(out, p * g + q * x + r)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rows_affine2_pixels(lib, shape):
    b, c, h, w = shape
    g, x = _randn(shape, seed=70), _randn(shape, seed=71, scale=3.0)
    coefs = _row_coefs(b, c, seed=72, count=5)
    e1, e2 = _randn((b, h * w), seed=73), _randn((b, h * w), seed=74, scale=0.1)
    out = kernels.rows_affine2_pixels(g, x, *coefs, e1, e2)
    p, q, r, u, v = (_rows_view(t, b, c) for t in coefs)
    expected = p * g + q * x + r + u * e1.view(b, 1, h, w) + v * e2.view(b, 1, h, w)
    assert out.shape == shape
    assert torch.equal(out, expected)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rows_dot_pixels(lib, shape):
    b, c, h, w = shape
    x, v = _randn(shape, seed=75), _randn((b, h * w), seed=76, scale=0.5) + 0.1
    out = kernels.rows_dot_pixels(x, v)
    assert out.shape == (b, c, 1, 1)
    t = x.double() * v.double().view(b, 1, h, w)
    _assert_within(out, t.sum((2, 3), keepdim=True),
                   _gamma(h * w) * t.abs().sum((2, 3), keepdim=True))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_channel_weighted_sum(lib, shape):
    b, c, h, w = shape
    x = _randn(shape, seed=77)
    (weights,) = _row_coefs(b, c, seed=78, count=1)
    out = kernels.channel_weighted_sum(x, weights)
    assert out.shape == (b, h * w)
    t = x.double() * weights.double().view(b, c, 1, 1)
    _assert_within(out, t.sum(1).flatten(1), _gamma(c) * t.abs().sum(1).flatten(1))


@pytest.mark.parametrize("spatial", [(7,), (2, 3, 4)], ids=str)
def test_row_kernels_any_spatial_rank(lib, spatial):
    """The row kernels take ``(B, C, *spatial)``: 1-D and 3-D maps give the results of the same
    rows laid out as 2-D maps (the kernels only see rows), with the matching output shape."""
    b, c = 2, 3
    x, y = _randn((b, c, *spatial), seed=79), _randn((b, c, *spatial), seed=80)
    x4, y4 = x.reshape(b, c, 1, -1), y.reshape(b, c, 1, -1)
    coefs = _row_coefs(b, c, seed=81, count=3)
    keep = (b, c) + (1,) * len(spatial)
    for got, want in [(kernels.rows_mean_max(x), kernels.rows_mean_max(x4)),
                      (kernels.rows_mean_m2(x), kernels.rows_mean_m2(x4)),
                      (kernels.rows_sum_dot(x, y), kernels.rows_sum_dot(x4, y4)),
                      ((kernels.rows_dot(x, y),), (kernels.rows_dot(x4, y4),))]:
        for u, v in zip(got, want):
            assert u.shape == keep and torch.equal(u.reshape(-1), v.reshape(-1))
    for got, want in [(kernels.rows_scale_shift(x, *coefs[:2]),
                       kernels.rows_scale_shift(x4, *coefs[:2])),
                      (kernels.rows_affine2(x, y, *coefs), kernels.rows_affine2(x4, y4, *coefs))]:
        assert got.shape == x.shape and torch.equal(got, want.view_as(x))


# --------------------------------------------------------------------------------------------
# 10. their NaN / inf semantics and thread-count invariance


def test_elementwise_kernels_nonfinite_exact(lib):
    """No special cases: NaN and inf propagate exactly as in the float32 formulas."""
    b, c, h, w = 2, 3, 4, 5
    g, x = _randn((b, c, h, w), seed=82), _randn((b, c, h, w), seed=83)
    coefs = _row_coefs(b, c, seed=84, count=5)
    e1, e2 = _randn((b, h * w), seed=85), _randn((b, h * w), seed=86)
    g[0, 0, 0, 0], g[1, 2, 3, 4], x[0, 1, 2, 2], x[1, 0, 0, 1] = NAN, INF, -INF, 0.0
    coefs[0][3] = INF            # inf * 0 (x[1, 0, 0, 1]) -> NaN in the affine2 kernels
    coefs[1][4] = NAN
    coefs[2][5] = -INF
    e1[0, 7], e2[1, 3] = INF, NAN
    p, q, r, u, v = (_rows_view(t, b, c) for t in coefs)
    pix1, pix2 = e1.view(b, 1, h, w), e2.view(b, 1, h, w)
    cases = [
        (kernels.rows_scale_shift(x, coefs[0], coefs[2]), p * x + r),
        (kernels.rows_affine2(g, x, *coefs[:3]), p * g + q * x + r),
        (kernels.rows_affine2_pixels(g, x, *coefs, e1, e2),
         p * g + q * x + r + u * pix1 + v * pix2),
    ]
    for got, expected in cases:
        assert torch.isnan(expected).any() and torch.isinf(expected).any()
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


def test_row_sums_nonfinite(lib):
    """A NaN in a row makes that row's sums NaN and leaves the other rows alone."""
    b, c, h, w = 2, 4, 5, 7
    g, x = _randn((b, c, h, w), seed=87), _randn((b, c, h, w), seed=88)
    g[0, 0, 0, 0] = NAN                # first element of row (0, 0)
    x[0, 1, 4, 6] = NAN                # last element (the tail after 32) of row (0, 1)
    g[1, 2, 2, 3] = INF                # +inf -> sum inf, dot +-inf
    total, dot = kernels.rows_sum_dot(g, x)
    assert torch.isnan(total[0, 0]).all() and torch.isnan(dot[0, :2]).all()
    assert torch.isfinite(total[0, 1]).all() and total[1, 2].item() == INF
    _assert_same_nonfinite(total, g.sum((2, 3), keepdim=True))
    _assert_same_nonfinite(dot, (g * x).sum((2, 3), keepdim=True))
    assert int(torch.isfinite(total).sum()) == b * c - 2
    assert int(torch.isfinite(dot).sum()) == b * c - 3

    v = _randn((b, h * w), seed=89)
    v[1, 17] = NAN                     # every row of sample 1
    out = kernels.rows_dot_pixels(x, v)
    expected = (x * v.view(b, 1, h, w)).sum((2, 3), keepdim=True)
    assert torch.isnan(out[0, 1]).all() and torch.isnan(out[1]).all()
    finite = _assert_same_nonfinite(out, expected)
    assert int(finite.sum()) == c - 1

    weights = _randn((b * c,), seed=90)
    weights[c + 2] = NAN               # sample 1, channel 2: every pixel of sample 1
    out = kernels.channel_weighted_sum(x, weights)
    expected = (x * weights.view(b, c, 1, 1)).sum(1).flatten(1)
    assert torch.isnan(out[0, h * w - 1]) and torch.isnan(out[1]).all()
    finite = _assert_same_nonfinite(out, expected)
    assert int(finite.sum()) == h * w - 1


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_rows_mean_m2_nonfinite(lib, value):
    """As ``x.mean`` and ``((x - mean) ** 2).sum``: a NaN gives NaN for both; a +inf gives mean
    inf and m2 NaN (``inf - inf``). Positions: first element (the kernel's shift), middle, tail
    of a row of 35 (two 16-wide vectors and 3)."""
    x = _randn((2, 4, 5, 7), seed=91)
    flat = x.view(8, 35)
    flat[0, 0] = value
    flat[1, 17] = value
    flat[2, 34] = value
    flat[5, 33] = value
    mean, m2 = kernels.rows_mean_m2(x)
    x64 = x.double()
    ref_mean = x64.mean((2, 3), keepdim=True)
    ref_m2 = (x64 - ref_mean).square().sum((2, 3), keepdim=True)
    bad = [0, 1, 2, 5]
    assert torch.isnan(ref_m2.view(8)[bad]).all()  # the reference, NaN for inf as well
    finite = _assert_same_nonfinite(mean, ref_mean.float()).view(8)
    assert finite.tolist() == [i not in bad for i in range(8)]
    assert torch.isnan(m2.view(8)[bad]).all(), m2.view(8)[bad]
    _assert_same_nonfinite(m2, ref_m2.float())
    _check_mean_m2(mean[:1, 3:], m2[:1, 3:], x[:1, 3:])  # the finite rows (0, 3), (1, 2), (1, 3)
    _check_mean_m2(mean[1:, 2:], m2[1:, 2:], x[1:, 2:])


def test_new_kernels_independent_of_thread_count(lib):
    shape = b, c, h, w = (8, 64, 56, 56)
    x, y = _randn(shape, seed=92), _randn(shape, seed=93)
    coefs = _row_coefs(b, c, seed=94, count=5)
    e1, e2 = _randn((b, h * w), seed=95), _randn((b, h * w), seed=96)

    def run():
        return [*kernels.rows_mean_m2(x), *kernels.rows_sum_dot(x, y),
                kernels.rows_scale_shift(x, *coefs[:2]), kernels.rows_affine2(x, y, *coefs[:3]),
                kernels.rows_dot_pixels(x, e1), kernels.channel_weighted_sum(x, coefs[3]),
                kernels.rows_affine2_pixels(x, y, *coefs, e1, e2)]

    one, two = _at_one_and_two_threads(run)
    names = ["m2 mean", "m2", "sum", "dot", "scale_shift", "affine2", "dot_pixels",
             "channel_weighted_sum", "affine2_pixels"]
    assert len(one) == len(names)
    for name, u, v in zip(names, one, two):
        assert torch.equal(u, v), name


# --------------------------------------------------------------------------------------------
# 11. argument checks of every kernel
#
# The kernels index raw memory: a wrong layout, dtype or size must be an error, never a silent
# read of the wrong (or out-of-bounds) data. ``_VALID`` holds a valid call of every kernel
# (B, C, H, W = 2, 3, 4, 5); each test first checks that this call runs, then breaks one argument.

_B, _C, _H, _W = 2, 3, 4, 5
_MAP, _ROW, _PIX = (_B, _C, _H, _W), (_B * _C,), (_B, _H * _W)
_VALID: dict[str, tuple[tuple[int, ...], ...]] = {  # the shapes of the positional arguments
    "rows_mean_max": (_MAP,),
    "rows_dot": (_MAP, _MAP),
    "rows_mean_m2": (_MAP,),
    "rows_sum_dot": (_MAP, _MAP),
    "rows_scale_shift": (_MAP, _ROW, _ROW),
    "rows_affine2": (_MAP, _MAP, _ROW, _ROW, _ROW),
    "rows_dot_pixels": (_MAP, _PIX),
    "channel_weighted_sum": (_MAP, _ROW),
    "rows_affine2_pixels": (_MAP, _MAP, _ROW, _ROW, _ROW, _ROW, _ROW, _PIX, _PIX),
    "channel_mean_max_scaled": (_MAP, (_B, _C, 1, 1)),
    "scale_channel_spatial": (_MAP, (_B, _C, 1, 1), (_B, 1, _H, _W), _MAP),  # the last: out
    "conv_same": (_MAP, (1, _C, 3, 3)),
    "cbam_grad_spatial": (_MAP, _MAP, (_B, _C, 1, 1), (_B, 1, _H, _W)),
    "cbam_grad_channel": (_MAP, _MAP, (_B, _C, 1, 1)) + ((_B, 1, _H, _W),) * 4
    + ((_B, _C, 1, 1),),
    "cbam_grad_input": (_MAP, _MAP, (_B, _C, 1, 1)) + ((_B, 1, _H, _W),) * 4
    + ((_B, _C, 1, 1),) * 3,
}


def _valid_args(name: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(97)
    return [torch.randn(shape, generator=gen) for shape in _VALID[name]]


def _names_error(name: str) -> str:
    return rf"^attnzoo\.ops\.kernels\.{name}:"


def test_validation_covers_every_kernel():
    public = set(kernels.__all__) - {"available", "disabled", "unavailable_reason", "usable"}
    assert set(_VALID) == public
    assert len(_SIZED) == 33  # the coefficients, gates and pixel vectors of all kernels


_LAYOUTS = {
    # a C > 1 map with H, W > 1 in channels_last is not NCHW-contiguous
    "channels_last": (lambda t: t.dim() == 4 and t.shape[1] > 1 and t.shape[2] * t.shape[3] > 1,
                      lambda t: t.to(memory_format=torch.channels_last)),
    # the same shape and values, stored transposed
    "transposed": (lambda t: t.dim() >= 2 and t.shape[-1] > 1 and t.shape[-2] > 1,
                   lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2)),
    # every other element of a buffer (any shape)
    "strided": (lambda t: True, lambda t: torch.stack([t, t], -1)[..., 0]),
    "float64": (lambda t: True, lambda t: t.double()),
    "float16": (lambda t: True, lambda t: t.half()),
}


@pytest.mark.parametrize("layout", list(_LAYOUTS))
@pytest.mark.parametrize("name", list(_VALID))
def test_rejects_wrong_layout_or_dtype(lib, name, layout):
    applies, change = _LAYOUTS[layout]
    fn = getattr(kernels, name)
    args = _valid_args(name)
    fn(*args)
    broken = 0
    for i, t in enumerate(args):
        if not applies(t):
            continue
        bad = change(t)
        assert bad.shape == t.shape and torch.equal(bad.float(), t.half().float()
                                                    if layout == "float16" else t)
        assert layout.startswith("float") or not bad.is_contiguous()
        with pytest.raises(ValueError, match=_names_error(name)):
            fn(*args[:i], bad, *args[i + 1:])
        broken += 1
    assert broken >= 1


@pytest.mark.parametrize("name, index", [
    ("rows_dot", 1), ("rows_dot", 0), ("rows_sum_dot", 1), ("rows_sum_dot", 0),
    ("rows_affine2", 1), ("rows_affine2", 0), ("rows_affine2_pixels", 1),
    ("rows_affine2_pixels", 0), ("scale_channel_spatial", 3)], ids=str)
@pytest.mark.parametrize("shape", [(_B, _C, _W, _H), (_B, _C, _H, _W + 1), (_B, _C + 1, _H, _W)],
                         ids=str)
def test_rejects_mismatched_maps(lib, name, index, shape):
    """The second map (or ``out``) must have the first one's shape, even with the same number
    of elements (``(B, C, W, H)``)."""
    fn = getattr(kernels, name)
    args = _valid_args(name)
    fn(*args)
    args[index] = torch.randn(shape)
    with pytest.raises(ValueError, match=_names_error(name)):
        fn(*args)


_SIZED = [(name, i) for name, shapes in _VALID.items() for i, shape in enumerate(shapes)
          if i > 0 and shape in (_ROW, _PIX, (_B, _C, 1, 1), (_B, 1, _H, _W))]


@pytest.mark.parametrize("delta", [-1, 1])
@pytest.mark.parametrize("name, index", _SIZED, ids=str)
def test_rejects_wrong_vector_size(lib, name, index, delta):
    fn = getattr(kernels, name)
    args = _valid_args(name)
    fn(*args)
    args[index] = torch.randn(args[index].numel() + delta)
    with pytest.raises(ValueError, match=_names_error(name)):
        fn(*args)


@pytest.mark.parametrize("name", list(_VALID))
def test_rejects_2d_maps(lib, name):
    """Every ``(B, C, H, W)`` map given as ``(B * C, H * W)`` (the other arguments unchanged)."""
    fn = getattr(kernels, name)
    args = _valid_args(name)
    fn(*args)
    args = [t.reshape(_B * _C, _H * _W) if t.shape == _MAP else t for t in args]
    with pytest.raises(ValueError, match=_names_error(name)):
        fn(*args)


@pytest.mark.parametrize("name", list(_VALID))
def test_unavailable_raises_runtime_error(monkeypatch, name):
    monkeypatch.setattr(kernels, "available", lambda: False)
    with pytest.raises(RuntimeError, match=_names_error(name) + ".*unavailable"):
        getattr(kernels, name)(*_valid_args(name))


# --------------------------------------------------------------------------------------------
# 12. hooks: CBAM's fused inference must not skip global module hooks; has_hooks


@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_cbam_global_hooks_skip_fused_path(lib, calls, kind):
    module = _module("cbam", 16).eval()
    x = _randn((2, 16, 9, 11), seed=98)
    with torch.no_grad():
        reference = module(x.clone())
    assert "scale_channel_spatial" in calls  # without hooks: the fused path
    del calls[:]
    seen: list[torch.nn.Module] = []
    hooks = torch.nn.modules.module
    if kind == "forward":
        handle = hooks.register_module_forward_hook(lambda m, i, o: seen.append(m))
    else:
        handle = hooks.register_module_forward_pre_hook(lambda m, i: seen.append(m))
    try:
        with torch.no_grad():
            out = module(x.clone())
    finally:
        handle.remove()
    assert "scale_channel_spatial" not in calls
    assert any(m is module.channel for m in seen) and any(m is module.spatial for m in seen)
    _assert_close_f32(out, reference, what="output with a global hook")
    del calls[:]
    with torch.no_grad():
        module(x.clone())
    assert "scale_channel_spatial" in calls  # hook removed: fused again


def test_has_hooks():
    inner = torch.nn.ReLU()
    child = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), inner)
    root, other = torch.nn.Sequential(child), torch.nn.Identity()
    has = gates.has_hooks

    def noop(*args):
        return None

    assert not has(root) and not has(root, other) and not has(root, recurse=False)
    for register in (inner.register_forward_hook, inner.register_forward_pre_hook):
        handle = register(noop)
        try:
            assert has(root) and has(other, root) and has(inner, recurse=False)
            assert not has(root, recurse=False) and not has(child, other, recurse=False)
            assert not has(other)
        finally:
            handle.remove()
    handle = root.register_forward_pre_hook(noop)
    try:
        assert has(root, recurse=False) and has(root) and not has(child)
    finally:
        handle.remove()
    hooks = torch.nn.modules.module
    for register in (hooks.register_module_forward_hook, hooks.register_module_forward_pre_hook):
        handle = register(noop)
        try:
            assert has(other, recurse=False) and has(root) and has()
        finally:
            handle.remove()
    assert not has(root) and not has(other) and not has()


# --------------------------------------------------------------------------------------------
# 13. the cache key includes the CPU

_CPU_CHILD = textwrap.dedent('''
    import json, os
    from attnzoo.ops import kernels
    cache = os.environ["ATTNZOO_CACHE_DIR"]
    report = {"real": kernels.available(), "files_real": sorted(os.listdir(cache)),
              "lib_real": kernels._lib._name if kernels._lib else None}
    kernels._tried, kernels._lib = False, None   # load again, as a process on another CPU would
    cpu = kernels._cpu_identity
    kernels._cpu_identity = lambda: cpu() + "\\nflags : pretend another instruction set"
    report["other"] = kernels.available()
    report["files_other"] = sorted(os.listdir(cache))
    report["lib_other"] = kernels._lib._name if kernels._lib else None
    kernels._tried, kernels._lib = False, None   # and back on this CPU: the first file again
    kernels._cpu_identity = cpu
    report["again"] = kernels.available()
    report["files_again"] = sorted(os.listdir(cache))
    report["lib_again"] = kernels._lib._name if kernels._lib else None
    print(json.dumps(report))
''')


def test_build_cache_key_includes_cpu(tmp_path):
    if not HAVE_CC:
        pytest.skip(f"no C compiler ({CC!r}): nothing to build or cache")
    report = _run_child({"ATTNZOO_CACHE_DIR": str(tmp_path), "ATTNZOO_KERNELS": None},
                        code=_CPU_CHILD)
    assert report["real"] and report["other"] and report["again"], report
    (first,) = report["files_real"]
    assert first.startswith("kernels-") and first.endswith(".so")
    assert len(report["files_other"]) == 2 and first in report["files_other"]
    (second,) = set(report["files_other"]) - {first}
    assert second.startswith("kernels-") and second.endswith(".so")
    assert report["lib_real"] == str(tmp_path / first)
    assert report["lib_other"] == str(tmp_path / second)
    assert report["files_again"] == report["files_other"]
    assert report["lib_again"] == str(tmp_path / first)


@pytest.mark.parametrize("name", ["rows_mean_max", "rows_mean_m2"])
def test_empty_maps_are_rejected_not_read(lib, name):
    # an empty row has no first element: the kernels must never be called on one
    with pytest.raises(ValueError, match=f"attnzoo.ops.kernels.{name}: .*non-empty"):
        getattr(kernels, name)(torch.empty(2, 3, 0, 4))


def test_has_hooks_sees_backward_hooks():
    inner = torch.nn.ReLU()
    root = torch.nn.Sequential(torch.nn.Sequential(inner))
    assert not gates.has_hooks(root)
    for register in (inner.register_full_backward_hook, inner.register_full_backward_pre_hook):
        handle = register(lambda *args: None)
        try:
            assert gates.has_hooks(root) and not gates.has_hooks(root, recurse=False)
        finally:
            handle.remove()
    handle = torch.nn.modules.module.register_module_full_backward_hook(lambda *args: None)
    try:
        assert gates.has_hooks(torch.nn.Identity(), recurse=False)
    finally:
        handle.remove()
    assert not gates.has_hooks(root)



# ---- CBAM's backward kernels vs float64 formulas ---------------------------------------------
def _cbam_case(shape, seed=0, ties=False):
    gen = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    x = torch.randn(shape, generator=gen)
    if ties:  # ReLU'd: pixels whose channels are all 0 tie, and rows of zeros tie
        x = torch.relu(x)
        x[0, 0] = 0.0
        x[:, :, 0, 0] = 0.0
    s = torch.rand(b, c, 1, 1, generator=gen) + 0.1
    g = torch.randn(shape, generator=gen)
    a = torch.rand(b, 1, h, w, generator=gen)
    v = x * s
    M = v.amax(1, keepdim=True)
    mrow = x.amax((2, 3), keepdim=True)
    return x, s, g, a, v, M, mrow, gen


@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (3, 16, 1, 1), (2, 3, 40, 30)], ids=str)
@pytest.mark.parametrize("ties", [False, True])
def test_cbam_backward_kernels(lib, shape, ties):
    x, s, g, a, v, M, mrow, gen = _cbam_case(shape, ties=ties)
    b, c, h, w = shape
    x64, s64, g64, a64 = x.double(), s.double(), g.double(), a.double()
    hit = (v == M).double()  # the ties, exactly as the kernel compares (v computed alike)
    grad_a, cnt = kernels.cbam_grad_spatial(g, x, s, M)
    torch.testing.assert_close(grad_a.double(), (s64 * g64 * x64).sum(1, keepdim=True),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(cnt, hit.sum(1, keepdim=True).float())
    gm_c = torch.randn(b, 1, h, w, generator=gen) / c
    share = torch.randn(b, 1, h, w, generator=gen) / cnt
    dv = g64 * a64 + gm_c.double() + hit * share.double()
    grad_s, rowcnt = kernels.cbam_grad_channel(g, x, s, a, gm_c, M, share, mrow)
    torch.testing.assert_close(grad_s.double(), (x64 * dv).sum((2, 3), keepdim=True),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(rowcnt, (x == mrow).sum((2, 3), keepdim=True).float())
    gmean_p = torch.randn(b, c, 1, 1, generator=gen) / (h * w)
    gmax_share = torch.randn(b, c, 1, 1, generator=gen) / rowcnt
    got = kernels.cbam_grad_input(g, x, s, a, gm_c, M, share, mrow, gmean_p, gmax_share)
    want = dv * s64 + gmean_p.double() + (x == mrow).double() * gmax_share.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)



def test_a_compiler_without_openmp_still_builds_serial_kernels(tmp_path):
    """A compiler that rejects -fopenmp (Apple clang) gets the serial build, not the fallback."""
    real_cc = shutil.which(os.environ.get("CC", "cc"))
    if real_cc is None:
        assert not kernels.available()  # no compiler here at all: nothing to wrap
        return
    wrapper = tmp_path / "cc-without-openmp"
    wrapper.write_text("#!/bin/sh\n"
                       'for a in "$@"; do [ "$a" = "-fopenmp" ] && exit 1; done\n'
                       f'exec {real_cc} "$@"\n')
    wrapper.chmod(0o755)
    cache = tmp_path / "cache"
    report = _run_child({"CC": str(wrapper), "ATTNZOO_CACHE_DIR": str(cache),
                         "ATTNZOO_KERNELS": None})
    assert report["available"] and report["reason"] is None
    assert report["records"] == []  # no warning: the kernels are there, on one thread
    built = list(cache.glob("kernels-*.so"))
    assert len(built) == 1
    assert b"libgomp" not in built[0].read_bytes()  # the serial build: no OpenMP runtime linked
