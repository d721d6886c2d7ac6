"""Fused training paths: BatchNorm + gate (SE, ECA, GC) and CBAM. Same values, gradients and running
statistics as
``gate(bn(z))`` with stock BatchNorm and the gate's plain-torch path."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import attnzoo
from attnzoo.ops import fused_norm, kernels
from attnzoo.ops.fused_norm import batchnorm_mean_gate, fusable
from attnzoo.ops.gates import disable_fast_path

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs the fused kernels; "
                                "tests/ops/test_kernels.py asserts they build wherever cc exists")



#: the autograd node that shows the fused path was taken
FUSED_NODE = {"se": "_NormScaleBackward", "eca": "_NormScaleBackward",
              "gc": "_NormGlobalContextFunctionBackward"}


def _random_bn(channels: int, *, affine: bool = True, track: bool = True,
               momentum: float | None = 0.1) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, affine=affine, track_running_stats=track, momentum=momentum)
    with torch.no_grad():
        if affine:
            bn.weight.uniform_(-1.5, 1.5)  # negative scales too
            bn.bias.normal_(0, 0.5)
        if track:
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    return bn


def _random_gate(name: str, channels: int) -> nn.Module:
    gate = attnzoo.create(name, channels)
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_(0, 0.3)
    return gate


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    # float32, different summation orders: relative to the tensor's scale
    scale = b.abs().max().clamp_min(1e-6)
    err = (a - b).abs().max() / scale
    assert err < 2e-5, f"{what}: max error {err:.2e} of scale {scale:.2e}"


def _as_accurate(fused: torch.Tensor, stock: tuple[torch.Tensor, ...], exact: torch.Tensor,
                 what: str) -> None:
    """The fused float32 result is about as accurate as stock float32 BatchNorm + gate, both
    measured against the float64 computation. ``stock`` holds the stock float32 result and the
    stock result on an input perturbed at float32 rounding level: where the output is
    ill-conditioned (tiny batches make BatchNorm's gradient a difference of nearly equal terms;
    LayerNorm's gradient sums to zero over its few channels) any float32 order of operations
    moves it that much."""
    exact = exact.float()
    scale = exact.abs().max().clamp_min(1e-6)
    err_fused = (fused - exact).abs().max()
    err_stock = max((s - exact).abs().max() for s in stock)
    assert err_fused <= 4 * err_stock + 2e-6 * scale, (
        f"{what}: fused error {err_fused:.2e}, stock float32 error {err_stock:.2e}, "
        f"scale {scale:.2e}")


def _run_plain(bn: nn.Module, gate: nn.Module, z: torch.Tensor, g: torch.Tensor):
    z = z.detach().clone().requires_grad_()
    with disable_fast_path():
        y = gate(bn(z))
    y.backward(g)
    return y, z.grad


def _compare(name: str, shape: tuple[int, ...], *, train: bool, offset: float = 1.0,
             **bn_kwargs) -> None:
    torch.manual_seed(0)
    bn = _random_bn(shape[1], **bn_kwargs).train(train)
    gate = _random_gate(name, shape[1])
    z = (torch.randn(shape) * 2 + offset).requires_grad_()
    g = torch.randn(shape)
    # stock float32, stock float32 on a rounding-level perturbed input, float64
    z_jitter = z.detach() * (1 + 2.0 ** -24 * torch.randn(shape))
    stock = []
    for dtype, z_in in ((torch.float32, z), (torch.float32, z_jitter), (torch.float64, z)):
        bn_s, gate_s = copy.deepcopy(bn).to(dtype), copy.deepcopy(gate).to(dtype)
        y_s, gz_s = _run_plain(bn_s, gate_s, z_in.to(dtype), g.to(dtype))
        stock.append((y_s, gz_s, [*bn_s.parameters(), *gate_s.parameters()], list(bn_s.buffers())))
    assert fusable(bn, gate, z)
    y = gate.forward_after_batchnorm(bn, z)
    assert type(y.grad_fn).__name__ == FUSED_NODE[name]
    y.backward(g)
    (y32, gz32, p32, b32), (yj, gzj, pj, bj), (y64, gz64, p64, b64) = stock
    _as_accurate(y, (y32, yj), y64, "output")
    _as_accurate(z.grad, (gz32, gzj), gz64, "grad z")
    named = [*bn.named_parameters(), *gate.named_parameters()]
    for (pname, p), q32, qj, q64 in zip(named, p32, pj, p64):
        _as_accurate(p.grad, (q32.grad, qj.grad), q64.grad, f"grad {pname}")
    for (bname, buf), c32, cj, c64 in zip(bn.named_buffers(), b32, bj, b64):
        if buf.dtype.is_floating_point:
            _as_accurate(buf, (c32, cj), c64, bname)
        else:
            assert torch.equal(buf, c32), bname


@pytest.mark.parametrize("name", ["se", "eca", "gc"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", [(4, 32, 9, 7), (2, 64, 2, 2), (8, 48, 14, 14), (1, 16, 1, 2)])
def test_equals_batchnorm_then_gate(name, train, shape) -> None:
    _compare(name, shape, train=train)


@pytest.mark.parametrize("bn_kwargs", [{"momentum": None}, {"affine": False},
                                       {"track": False}, {"affine": False, "track": False}])
@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_options(bn_kwargs, train) -> None:
    _compare("se", (4, 32, 6, 5), train=train, **bn_kwargs)


def test_large_mean_offset_keeps_the_variance_accurate() -> None:
    # |mean| >> std: naive E[z^2] - E[z]^2 in float32 would lose every digit of the variance.
    _compare("se", (4, 32, 8, 8), train=True, offset=300.0)


def test_momentum_none_counts_batches() -> None:
    torch.manual_seed(0)
    bn, gate = _random_bn(16, momentum=None), _random_gate("se", 16)
    bn_ref = copy.deepcopy(bn)
    for step in range(3):
        z = torch.randn(4, 16, 5, 5) + step
        batchnorm_mean_gate(bn, z, gate._gate)
        bn_ref(z)
    assert int(bn.num_batches_tracked) == 3
    _close(bn.running_mean, bn_ref.running_mean, "running_mean")
    _close(bn.running_var, bn_ref.running_var, "running_var")


def test_fusable_conditions() -> None:
    bn, gate = nn.BatchNorm2d(8), attnzoo.create("se", 8)
    z = torch.randn(2, 8, 4, 4)
    assert fusable(bn, gate, z)
    assert not fusable(bn, gate, z.double())
    assert not fusable(copy.deepcopy(bn).double(), copy.deepcopy(gate).double(), z.double())
    assert not fusable(bn, gate, z.contiguous(memory_format=torch.channels_last))
    assert not fusable(bn, gate, torch.randn(2, 6, 4, 4))          # wrong channels
    assert not fusable(nn.BatchNorm2d(8).train(), gate, torch.randn(1, 8, 1, 1))  # 1 value
    assert fusable(nn.BatchNorm2d(8).eval(), gate, torch.randn(1, 8, 1, 1))

    class MyBN(nn.BatchNorm2d):
        pass

    assert not fusable(MyBN(8), gate, z)                            # subclasses may differ
    handle = bn.register_forward_hook(lambda *a: None)
    assert not fusable(bn, gate, z)                                 # the hook would be skipped
    handle.remove()
    handle = gate.register_forward_pre_hook(lambda *a: None)
    assert not fusable(bn, gate, z)
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert not fusable(bn, gate, z)
    finally:
        handle.remove()
    handle = bn.register_full_backward_hook(lambda *a: None)
    assert not fusable(bn, gate, z)                                 # backward hooks too
    handle.remove()
    handle = gate.fc1.register_full_backward_pre_hook(lambda *a: None)
    assert not fusable(bn, gate, z)                                 # on a submodule
    handle.remove()
    handle = nn.modules.module.register_module_full_backward_hook(lambda *a: None)
    try:
        assert not fusable(bn, gate, z)
    finally:
        handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fusable(bn, gate, z)
    assert fusable(bn, gate, z)


def _blocks():
    tv_basic = torchvision.models.resnet.BasicBlock(32, 32)
    tv_bottle = torchvision.models.resnet.Bottleneck(64, 16)
    import timm.models.resnet as timm_resnet

    timm_bottle = timm_resnet.Bottleneck(64, 16)
    return [("tv_basic", tv_basic, 32), ("tv_bottleneck", tv_bottle, 64),
            ("timm_bottleneck", timm_bottle, 64)]


@pytest.mark.parametrize("name", ["se", "eca", "gc"])
@pytest.mark.parametrize("train", [True, False])
def test_attached_blocks_take_the_fused_path_and_match(name, train, monkeypatch) -> None:
    for label, block, channels in _blocks():
        torch.manual_seed(0)
        attnzoo.attach(block, name)
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.2)
        block.train(train)
        reference = copy.deepcopy(block)
        x = torch.randn(4, channels, 10, 10, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        calls = []
        real = fused_norm.fusable

        def counting(*args, _real=real, _calls=calls):
            ok = _real(*args)
            _calls.append(ok)
            return ok

        monkeypatch.setattr(fused_norm, "fusable", counting)
        y = block(x)
        assert calls == [True], label
        monkeypatch.setattr(fused_norm, "fusable", lambda *args: False)
        y_ref = reference(x_ref)
        monkeypatch.setattr(fused_norm, "fusable", real)
        _close(y, y_ref, f"{label} output")
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        _close(x.grad, x_ref.grad, f"{label} grad x")
        for (pname, p), p_ref in zip(block.named_parameters(), reference.parameters()):
            _close(p.grad, p_ref.grad, f"{label} grad {pname}")
        for (bname, buf), buf_ref in zip(block.named_buffers(), reference.buffers()):
            if buf.dtype.is_floating_point:
                _close(buf, buf_ref, f"{label} {bname}")


def test_identity_init_and_other_modules_are_not_fused(monkeypatch) -> None:
    block = torchvision.models.resnet.Bottleneck(64, 16)
    attnzoo.attach(block, "se", identity_init=True)
    calls = []
    monkeypatch.setattr(fused_norm, "fusable", lambda *a: calls.append(1) or True)
    block(torch.randn(2, 64, 6, 6))
    assert calls == []  # IdentityInit has no fused form: bn3 then the wrapper
    block = torchvision.models.resnet.Bottleneck(64, 16)
    attnzoo.attach(block, "cbam")
    block(torch.randn(2, 64, 6, 6))
    assert calls == []


# ---- CBAM's fused training path (attnzoo.modules.cbam._CBAMScale and friends) ---------------
def _cbam_stock(module: nn.Module, x: torch.Tensor, g: torch.Tensor, dtype: torch.dtype):
    module = copy.deepcopy(module).to(dtype)
    x = x.detach().to(dtype).requires_grad_()
    with kernels.disabled(), disable_fast_path():
        y = module(x)
    y.backward(g.to(dtype))
    return y, x.grad, [p.grad for p in module.parameters()]


@pytest.mark.parametrize("preset", [None, "timm", "yolov4-tiny"])
# (4, 32, 1, 1): a 1x1 map gives the spatial BatchNorm one value per sample; with only two
# samples its gradient amplifies a 1-ulp difference in the 7x7 conv's output (our kernel vs
# oneDNN's) to ~1e-5 of the conv weight's gradient on any path that uses the kernel.
@pytest.mark.parametrize("shape", [(2, 16, 9, 11), (4, 64, 14, 14), (4, 32, 1, 1), (3, 8, 5, 1)])
@pytest.mark.parametrize("relu", [False, True])  # ReLU'd inputs: ties at 0 in both max pools
def test_cbam_fused_training_is_as_accurate_as_stock(preset, shape, relu) -> None:
    torch.manual_seed(0)
    module = attnzoo.create("cbam", shape[1], **({"preset": preset} if preset else {}))
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(shape)
    if relu:
        x = torch.relu(x)
    g = torch.randn(shape)
    # Stock float32 on the exact inputs and on inputs and upstream gradients perturbed at
    # rounding level: where a tiny spatial BatchNorm amplifies rounding (1x1 maps: two values
    # per channel), every float32 summation order lands somewhere in that spread.
    def jitter(t: torch.Tensor) -> torch.Tensor:
        return t * (1 + 2.0 ** -24 * torch.randn(t.shape))

    variants = [(x, g), (jitter(x), g), (x, jitter(g)), (jitter(x), jitter(g))]
    stock = [_cbam_stock(module, xv, gv, torch.float32) for xv, gv in variants]
    y64, gx64, gp64 = _cbam_stock(module, x, g, torch.float64)
    fused = copy.deepcopy(module)
    xf = x.clone().requires_grad_()
    y = fused(xf)
    assert type(y.grad_fn).__name__ == "_CBAMScaleBackward"  # the fused path ran
    y.backward(g)
    _as_accurate(y.detach(), tuple(v[0].detach() for v in stock), y64.detach(), "output")
    _as_accurate(xf.grad, tuple(v[1] for v in stock), gx64, "grad x")
    for i, ((name, p), q64) in enumerate(zip(fused.named_parameters(), gp64)):
        _as_accurate(p.grad, tuple(v[2][i] for v in stock), q64, f"grad {name}")
    for (name, b), b64 in zip(fused.named_buffers(), copy.deepcopy(module).double().buffers()):
        assert b.shape == b64.shape, name


def test_cbam_fused_training_ties_split_like_amax() -> None:
    # whole rows and pixels of equal values: every tie gets an equal share, as amax's backward
    module = attnzoo.create("cbam", 4, spatial_norm=False)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    x = torch.zeros(2, 4, 3, 3)
    x[0, 1] = 2.0
    x[1, :, 1, 1] = 1.5
    g = torch.randn(2, 4, 3, 3)
    xf = x.clone().requires_grad_()
    y = module(xf)
    assert type(y.grad_fn).__name__ == "_CBAMScaleBackward"
    y.backward(g)
    _, gx64, gp64 = _cbam_stock(module, x, g, torch.float64)
    torch.testing.assert_close(xf.grad, gx64.float(), rtol=1e-5, atol=1e-6)
    for p, q in zip(module.parameters(), gp64):
        torch.testing.assert_close(p.grad, q.float(), rtol=1e-5, atol=1e-6)


def test_cbam_fused_training_is_skipped_for_gate_hooks_and_autocast() -> None:
    module = attnzoo.create("cbam", 8)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    assert type(module(x).grad_fn).__name__ == "_CBAMScaleBackward"
    handle = module.spatial.register_forward_hook(lambda *a: None)
    try:
        assert type(module(x).grad_fn).__name__ != "_CBAMScaleBackward"
    finally:
        handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(module(x).grad_fn).__name__ != "_CBAMScaleBackward"
    with disable_fast_path():
        assert type(module(x).grad_fn).__name__ != "_CBAMScaleBackward"
