"""attnzoo.fast.BatchNormGate2d: BatchNorm2d + SE / ECA folded into one custom op."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import attnzoo
from attnzoo import fast
from attnzoo.fast import ops

GATES = [("se", {}), ("se", {"bias": False}), ("eca", {})]
GATE_IDS = ["se", "se-nobias", "eca"]


class OpCalls(TorchDispatchMode):
    """Records the names of the ops that reach the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))

    def count(self, prefix: str = "attnzoo.bn_gate") -> int:
        return sum(n.startswith(prefix) for n in self.names)


def _pair(
    name: str, kw: dict, channels: int, momentum: float | None = 0.1, track: bool = True
) -> tuple[nn.BatchNorm2d, nn.Module]:
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(channels, momentum=momentum, track_running_stats=track)
    gate = attnzoo.create(name, channels, **kw)
    with torch.no_grad():  # non-trivial weights and statistics
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
        if track:
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
        for p in gate.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return norm, gate


def _inputs(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(shape, generator=gen) * 2 + 1, torch.randn(shape, generator=gen)


def _run(module: nn.Module, z: torch.Tensor, grad: torch.Tensor, switch: bool = True):
    leaf = z.clone().requires_grad_()
    with fast.enabled(switch), OpCalls() as calls:
        y = module(leaf)
        y.backward(grad)
    return y, leaf.grad, [p.grad for p in module.parameters()], calls


def _close64(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 result vs a float64 reference: float32 rounding, relative to the scale."""
    scale = expected.abs().max().item() + 1e-12
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize(
    "shape", [(3, 16, 7, 5), (2, 32, 13, 13), (4, 16, 1, 1)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,kw", GATES, ids=GATE_IDS)
def test_folded_pair_equals_the_plain_pair_in_float64(name, kw, train, momentum, shape):
    norm, gate = _pair(name, kw, shape[1], momentum)
    ref_norm, ref_gate = copy.deepcopy(norm).double(), copy.deepcopy(gate).double()
    layer = fast.BatchNormGate2d(norm, gate).train(train)
    reference = nn.Sequential(ref_norm, ref_gate).train(train)
    z, grad = _inputs(shape)
    for _ in range(2):  # twice: the running statistics and the cumulative average move
        y, gz, grads, calls = _run(layer, z, grad)
        assert calls.count() == 2  # the op, forward and backward
        ref_leaf = z.double().requires_grad_()
        ref_y = reference(ref_leaf)
        ref_y.backward(grad.double())
        _close64(y, ref_y)
        _close64(gz, ref_leaf.grad)
        for p, q in zip(grads, reference.parameters()):
            _close64(p, q.grad)
        layer.zero_grad()
        reference.zero_grad()
        _close64(norm.running_mean, ref_norm.running_mean)
        _close64(norm.running_var, ref_norm.running_var)
        assert norm.num_batches_tracked.item() == ref_norm.num_batches_tracked.item()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_without_running_statistics_batch_statistics_are_used(train):
    norm, gate = _pair("se", {}, 16, track=False)
    reference = nn.Sequential(copy.deepcopy(norm), copy.deepcopy(gate)).double().train(train)
    layer = fast.BatchNormGate2d(norm, gate).train(train)
    z, grad = _inputs((3, 16, 6, 6))
    y, gz, _, calls = _run(layer, z, grad)
    assert calls.count() == 2
    ref_leaf = z.double().requires_grad_()
    ref_y = reference(ref_leaf)
    ref_y.backward(grad.double())
    _close64(y, ref_y)
    _close64(gz, ref_leaf.grad)


def test_the_fused_kernels_match_the_op_without_them(monkeypatch):
    from attnzoo.fast import kernels

    if not kernels.available():
        pytest.skip(f"no C compiler here: {kernels.unavailable_reason()}")
    norm, gate = _pair("eca", {}, 32)
    z, grad = _inputs((2, 32, 9, 11))
    fused = _run(fast.BatchNormGate2d(copy.deepcopy(norm), copy.deepcopy(gate)), z, grad)
    monkeypatch.setattr(kernels, "usable", lambda *t: False)
    torch_ops = _run(fast.BatchNormGate2d(copy.deepcopy(norm), copy.deepcopy(gate)), z, grad)
    for a, b in zip([fused[0], fused[1], *fused[2]], [torch_ops[0], torch_ops[1], *torch_ops[2]]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class _Doubled(nn.Module):
    """A wrapper (as an adapter would be) that changes its layer's output."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 2 * self.inner(x)


def _hook(module: nn.Module) -> None:
    module.register_forward_hook(lambda m, a, o: o * 3)


@pytest.mark.parametrize(
    "change",
    [
        "hook-norm",
        "hook-gate",
        "hook-fc1",
        "replace-fc1",
        "switch-off",
        "float64",
        "channels_last",
        "bfloat16-autocast",
    ],
)
def test_anything_else_runs_the_two_modules(change):
    norm, gate = _pair("se", {}, 16)
    layer = fast.BatchNormGate2d(norm, gate)
    z, grad = _inputs((2, 16, 5, 5))
    switch = change != "switch-off"
    if change == "hook-norm":
        _hook(norm)
    elif change == "hook-gate":
        _hook(gate)
    elif change == "hook-fc1":
        _hook(gate.fc1)
    elif change == "replace-fc1":
        gate.fc1 = _Doubled(gate.fc1)
    elif change == "float64":
        layer.double()
        z, grad = z.double(), grad.double()
    elif change == "channels_last":
        z = z.contiguous(memory_format=torch.channels_last)
    expected = gate(copy.deepcopy(norm)(z))  # a copy: the running statistics move once
    leaf = z.clone().requires_grad_()
    with fast.enabled(switch), OpCalls() as calls:
        if change == "bfloat16-autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(leaf)
            expected = y.detach()  # the plain pair under autocast is the reference itself
        else:
            y = layer(leaf)
        y.float().backward(grad.to(y.dtype).float())
    assert calls.count("attnzoo.") == 0
    torch.testing.assert_close(y, expected)


def test_construction_refuses_pairs_without_a_folded_form():
    norm, gate = _pair("se", {}, 16)
    with pytest.raises(ValueError, match="BatchNormGate2d.*norm must be"):
        fast.BatchNormGate2d(nn.BatchNorm2d(16, affine=False), gate)
    with pytest.raises(ValueError, match="BatchNormGate2d.*SqueezeExcitation"):
        fast.BatchNormGate2d(norm, attnzoo.create("cbam", 16))
    with pytest.raises(ValueError, match="same channels"):
        fast.BatchNormGate2d(nn.BatchNorm2d(8), gate)
    assert not fast.foldable(norm, attnzoo.create("gc", 16))


def _op_fn(kind, use_batch_stats):
    def fn(z, bn_w, bn_b, w1, b1, w2, b2):
        rm = torch.zeros(z.shape[1], dtype=z.dtype) + 0.2
        rv = torch.ones(z.shape[1], dtype=z.dtype) * 1.5
        return ops.bn_gate(z, bn_w, bn_b, rm, rv, use_batch_stats, 1e-5, kind, w1, b1, w2, b2)[0]

    return fn


def _op_inputs(kind):
    torch.manual_seed(0)
    c = 6
    z = torch.randn(2, c, 3, 4, dtype=torch.double)
    bn_w, bn_b = torch.rand(c, dtype=torch.double) + 0.5, torch.randn(c, dtype=torch.double)
    if kind == "se":
        params = [
            torch.randn(3, c, dtype=torch.double),
            torch.randn(3, dtype=torch.double),
            torch.randn(c, 3, dtype=torch.double),
            torch.randn(c, dtype=torch.double),
        ]
    else:
        params = [torch.randn(1, 1, 3, dtype=torch.double), None, None, None]
    return [t.requires_grad_() if t is not None else None for t in [z, bn_w, bn_b, *params]]


@pytest.mark.parametrize("use_batch_stats", [True, False], ids=["batch", "running"])
@pytest.mark.parametrize("kind", ["se", "eca"])
def test_op_gradcheck_and_gradgradcheck(kind, use_batch_stats):
    fn, inputs = _op_fn(kind, use_batch_stats), _op_inputs(kind)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_double_backward_through_the_layer_equals_the_plain_pair():
    norm, gate = _pair("se", {}, 8)
    layer = fast.BatchNormGate2d(norm, gate)
    reference = nn.Sequential(copy.deepcopy(norm), copy.deepcopy(gate))
    z, _ = _inputs((2, 8, 4, 4))
    penalties = []
    for module, switch in ((layer, True), (reference, False)):
        leaf = z.clone().requires_grad_()
        with fast.enabled(switch):
            (g,) = torch.autograd.grad(module(leaf).square().sum(), leaf, create_graph=True)
            penalties.append(torch.autograd.grad(g.square().sum(), leaf)[0])
    torch.testing.assert_close(penalties[0], penalties[1], rtol=1e-4, atol=1e-5)


def _attached(name: str, switch: bool) -> nn.Module:
    torch.manual_seed(0)
    with fast.enabled(switch):
        return attnzoo.models.resnet18(attention=name, num_classes=5)


@pytest.mark.parametrize("name", ["se", "eca"])
def test_attach_folds_the_pairs_and_keeps_the_state_dict(name):
    plain, folded = _attached(name, False), _attached(name, True)
    assert list(plain.state_dict()) == list(folded.state_dict())
    folded.load_state_dict(plain.state_dict())
    x = torch.randn(8, 3, 32, 32)
    with fast.enabled(), OpCalls() as calls:  # train mode: batch statistics, running ones move
        y = folded(x)
    assert calls.count() == 8  # every BasicBlock's (bn2, attention) pair
    torch.testing.assert_close(y, plain(x), rtol=1e-3, atol=1e-3)  # 8 BatchNorms deep
    for key, value in folded.state_dict().items():
        torch.testing.assert_close(value, plain.state_dict()[key], rtol=1e-4, atol=1e-4)
    plain.eval()
    folded.eval()
    with fast.enabled(), OpCalls() as calls:
        y = folded(x)
    assert calls.count() == 8
    torch.testing.assert_close(y, plain(x), rtol=1e-4, atol=1e-4)
    with OpCalls() as calls:  # the switch off on the built network: the plain pair
        y_off = folded(x)
    assert calls.count("attnzoo.") == 0
    torch.testing.assert_close(y_off, plain(x))


def test_attach_uses_a_replaced_attention_or_norm():
    net = _attached("se", True)
    block = net.layer1[0]
    block.attention = nn.Identity()
    block.bn2.register_forward_hook(lambda m, a, o: o)
    net.layer1[1].bn2 = nn.BatchNorm2d(64)
    x = torch.randn(2, 3, 32, 32)
    with fast.enabled(), OpCalls() as calls:
        net.eval()(x)
    assert calls.count("attnzoo.bn_gate") == 6  # the two changed blocks run plain


def test_flop_counter_and_export_see_one_op():
    norm, gate = _pair("se", {}, 16)
    layer = fast.BatchNormGate2d(norm, gate).eval()
    z = torch.randn(2, 16, 8, 8)
    with fast.enabled():
        with FlopCounterMode(display=False) as counter:
            layer(z)
        exported = torch.export.export(layer, (z,))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count("attnzoo.bn_gate.default") == 1
    assert not any("batch_norm" in t or "linear" in t for t in targets)
    assert counter.get_total_flops() == 2 * 2 * 2 * 16 * gate.fc1.out_features
    torch.testing.assert_close(exported.module()(z), layer(z))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["se", "eca"])
def test_compile_fullgraph_sees_one_op_and_trains_alike(name):
    norm, gate = _pair(name, {}, 16)
    layer = fast.BatchNormGate2d(norm, gate)
    reference = fast.BatchNormGate2d(copy.deepcopy(norm), copy.deepcopy(gate))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    z, grad = _inputs((2, 16, 6, 6))
    with fast.enabled():
        for _ in range(2):
            outs = []
            for module in (compiled, reference):
                leaf = z.clone().requires_grad_()
                y = module(leaf)
                y.backward(grad)
                outs.append((y, leaf.grad))
            torch.testing.assert_close(outs[0], outs[1])
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum("bn_gate" in t for t in targets) == 1, targets
    assert not any("batch_norm" in t for t in targets)
    torch.testing.assert_close(norm.running_mean, reference.norm.running_mean)
    torch.testing.assert_close(norm.num_batches_tracked, reference.norm.num_batches_tracked)
