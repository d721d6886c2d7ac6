"""attnzoo.fast: the switch, the accelerated modules and their custom ops."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import attnzoo
from attnzoo import fast
from attnzoo.fast import ops

CASES = [
    ("cbam", None),
    ("cbam", "timm"),
    ("cbam", "yolov4-tiny"),
    ("eca", None),
    ("gc", None),
    ("gc", "timm"),
]
#: registry name -> its custom op
OPS = {"cbam": "cbam", "eca": "eca", "gc": "gc_add"}
SHAPES = [(2, 16, 1, 1), (3, 16, 7, 5), (2, 32, 13, 13)]


class OpCalls(TorchDispatchMode):
    """Records the names of the ops that reach the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))

    def ran_fast_op(self) -> bool:
        return any(n.startswith("attnzoo.") for n in self.names)


def _pair(name: str, preset: str | None, channels: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    plain = attnzoo.create(name, channels, preset=preset)
    with torch.no_grad():  # non-trivial weights everywhere (CBAM's BN weight starts at 0)
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return plain, fast.accelerate(copy.deepcopy(plain))


def _run(module, x, grad):
    leaf = x.clone().requires_grad_()
    y = module(leaf)
    y.backward(grad)
    return y, leaf.grad, [p.grad for p in module.parameters()]


def _assert_close(a, b):
    # float32 rounding of sums over many terms: absolute error relative to the tensor's scale
    scale = max(1.0, b.detach().abs().max().item()) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


# ---------------------------------------------------------------------------------------------
# the switch
def test_switch_is_off_by_default_and_read_from_the_environment():
    code = "import attnzoo.fast as f; print(f.is_enabled())"
    env = {k: v for k, v in os.environ.items() if k != fast.ENV_VAR}
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    on = subprocess.run(
        [sys.executable, "-c", code], env={**env, fast.ENV_VAR: "1"}, capture_output=True, text=True
    )
    assert (off.stdout.strip(), on.stdout.strip()) == ("False", "True"), off.stderr + on.stderr


def test_context_manager_and_setter_restore_and_validate():
    before = fast.is_enabled()
    with fast.enabled():
        assert fast.is_enabled()
        with fast.enabled(False):
            assert not fast.is_enabled()
        assert fast.is_enabled()
    assert fast.is_enabled() == before
    with pytest.raises(RuntimeError, match="boom"), fast.enabled():
        raise RuntimeError("boom")
    assert fast.is_enabled() == before
    with pytest.raises(TypeError, match="attnzoo.fast.*True or False"):
        fast.set_enabled(1)
    with pytest.raises(TypeError, match="attnzoo.fast.*True or False"):
        fast.enabled("yes").__enter__()
    fast.set_enabled(True)
    try:
        assert fast.is_enabled()
    finally:
        fast.set_enabled(before)


def test_accelerate_and_plain_swap_classes_and_keep_the_state_dict():
    model = torch.nn.Sequential(
        attnzoo.create("cbam", 16),
        attnzoo.create("eca", 16),
        attnzoo.create("se", 16),
        attnzoo.create("gc", 16),
    )
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    fast.accelerate(model)
    assert [type(m).__name__ for m in model] == [
        "FastCBAM",
        "FastECA",
        "SqueezeExcitation",
        "FastGC",
    ]
    assert isinstance(model[0], attnzoo.get("cbam"))
    assert model.state_dict().keys() == keys.keys()
    fast.plain(model)
    assert [type(m).__name__ for m in model] == [
        "CBAM",
        "EfficientChannelAttention",
        "SqueezeExcitation",
        "GlobalContext",
    ]
    with pytest.raises(TypeError, match="attnzoo.fast.accelerate: model must be an nn.Module"):
        fast.accelerate("cbam")


def test_attach_accelerates_while_the_switch_is_on():
    with fast.enabled():
        model = attnzoo.models.resnet18(attention="cbam")
    assert type(model.layer1[0].attention).__name__ == "FastCBAM"
    assert type(attnzoo.models.resnet18(attention="cbam").layer1[0].attention).__name__ == "CBAM"


@pytest.mark.parametrize("name", ["cbam", "eca", "gc"])
def test_attached_network_trains_alike_with_the_switch_on(name):
    torch.manual_seed(0)
    plain = attnzoo.models.resnet18(attention=name, num_classes=5)
    accel = fast.accelerate(copy.deepcopy(plain))
    x = torch.randn(2, 3, 48, 40)
    for model, on in ((plain, False), (accel, True)):
        with fast.enabled(on):
            model(x).square().sum().backward()
    for (key, p), q in zip(plain.named_parameters(), accel.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4, msg=key)
    for a, b in zip(accel.buffers(), plain.buffers()):
        _assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# parity with the plain modules
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,preset", CASES)
def test_fast_path_equals_plain_path(name, preset, train, shape):
    plain, accel = _pair(name, preset, shape[1])
    plain.train(train)
    accel.train(train)
    x = torch.randn(shape)
    grad = torch.randn(shape)
    y0, gx0, gp0 = _run(plain, x, grad)
    with fast.enabled(), OpCalls() as calls:
        y1, gx1, gp1 = _run(accel, x, grad)
    assert calls.ran_fast_op()
    _assert_close(y1, y0)
    _assert_close(gx1, gx0)
    for a, b in zip(gp1, gp0):
        _assert_close(a, b)
    for a, b in zip(accel.buffers(), plain.buffers()):  # BatchNorm running statistics
        _assert_close(a, b)


@pytest.mark.parametrize("name,preset", CASES[:1] + CASES[3:])
def test_ties_in_max_pools_split_the_gradient_as_amax(name, preset):
    plain, accel = _pair(name, preset, 16)
    x = torch.randint(-2, 3, (2, 16, 6, 6)).float()  # many equal values: ties everywhere
    grad = torch.randn_like(x)
    ref = _run(plain, x, grad)
    with fast.enabled():
        got = _run(accel, x, grad)
    _assert_close(got[0], ref[0])
    _assert_close(got[1], ref[1])


# ---------------------------------------------------------------------------------------------
# where the fast path must not run
_OUTSIDE = ["switch-off", "float64", "channels_last", "autocast", "meta"]


@pytest.mark.parametrize(
    "name,case",
    [(n, c) for n in ("cbam", "eca", "gc") for c in _OUTSIDE]
    + [("cbam", "parallel-order"), ("gc", "avg-pooling")],
)
def test_plain_path_runs_outside_the_tested_modes(name, case):
    kwargs = {"parallel-order": {"order": "parallel"}, "avg-pooling": {"pooling": "avg"}}.get(
        case, {}
    )
    accel = fast.accelerate(attnzoo.create(name, 16, **kwargs))
    x = torch.randn(2, 16, 5, 5)
    if case == "float64":
        accel, x = accel.double(), x.double()
    elif case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case == "meta":
        accel, x = accel.to("meta"), x.to("meta")
    with fast.enabled(case != "switch-off"), OpCalls() as calls:
        if case == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = accel(x.bfloat16())
        else:
            y = accel(x)
    assert not calls.ran_fast_op(), calls.names
    assert y.shape == x.shape


class _Doubled(torch.nn.Module):
    """A wrapper such as an adapter: twice the wrapped layer's output."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 2 * self.inner(x)


def _wrap_submodule(models, path: str, wrapper) -> None:
    """Replace the submodule at ``path`` of every model by ``wrapper(submodule)``."""
    parent, _, child = path.rpartition(".")
    for m in models:
        owner = m.get_submodule(parent) if parent else m
        setattr(owner, child, wrapper(getattr(owner, child)))


@pytest.mark.parametrize(
    "name,path",
    [
        ("cbam", "channel.fc1"),
        ("cbam", "channel.act"),
        ("cbam", "spatial.conv"),
        ("cbam", "spatial.gate"),
        ("eca", "conv"),
        ("eca", "gate"),
        ("gc", "conv_mask"),
        ("gc", "context_softmax"),
    ],
)
def test_hooked_or_replaced_submodules_take_the_plain_path(name, path):
    plain, accel = _pair(name, None, 16)
    x = torch.randn(2, 16, 5, 5)
    seen = []
    accel.get_submodule(path).register_forward_hook(lambda *a: seen.append(path))
    with fast.enabled(), OpCalls() as calls:
        y = accel(x)
    assert seen and set(seen) == {path} and not calls.ran_fast_op()  # CBAM: MLP runs twice
    _assert_close(y, plain(x))

    _wrap_submodule((plain, accel), path, _Doubled)
    with fast.enabled(), OpCalls() as calls:
        y = accel(x)
    assert not calls.ran_fast_op()
    _assert_close(y, plain(x))


@pytest.mark.parametrize("preset,op", [(None, "gc_add"), ("r4", "gc_add"), ("timm", "gc_context")])
def test_gc_runs_its_ops_and_transforms_as_matrix_products(preset, op):
    """Add fusion alone: the whole block is ``attnzoo::gc_add``; otherwise the pooling op and
    the transforms as products on the ``(B, C)`` context: no convolution either way."""
    plain, accel = _pair("gc", preset, 16)
    x = torch.randn(2, 16, 5, 5)
    with fast.enabled(), OpCalls() as calls:
        y = accel(x)
    assert f"attnzoo.{op}.default" in calls.names
    assert not any("convolution" in n for n in calls.names), calls.names
    if op == "gc_context":
        assert any(n.startswith("aten.addmm") for n in calls.names)
    _assert_close(y, plain(x))


class _Adapted(torch.nn.Module):
    """A wrapper whose change survives LayerNorm (not a scale or a shift of the output)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        y = self.inner(x)
        return y + 0.5 * y.square()


@pytest.mark.parametrize(
    "path",
    [
        "channel_add_conv",
        "channel_add_conv.0",
        "channel_add_conv.1",
        "channel_add_conv.2",
        "channel_add_conv.3",
    ],
)
def test_gc_hooked_or_replaced_transform_layers_run_as_modules(path):
    plain, accel = _pair("gc", "r4", 16)
    x = torch.randn(2, 16, 5, 5)
    seen = []
    handle = accel.get_submodule(path).register_forward_hook(lambda *a: seen.append(path))
    with fast.enabled():
        before = accel(x)
    assert seen == [path]
    _assert_close(before, plain(x))
    handle.remove()

    _wrap_submodule((plain, accel), path, _Adapted)
    with fast.enabled(), OpCalls() as calls:
        y = accel(x)
    assert calls.ran_fast_op()  # the pooling op still runs; the transform is the modules'
    _assert_close(y, plain(x))
    assert not torch.allclose(y, before)  # the replacement was used


# ---------------------------------------------------------------------------------------------
# the ops' own autograd formulas, in float64 (the ops compute the plain branch there)
def _cbam_op_inputs(bias: bool, norm: bool, train: bool):
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * 0.5).requires_grad_()

    x = r(2, 4, 3, 3)
    return (
        x,
        r(2, 4),
        r(2) if bias else None,
        r(4, 2),
        r(4) if bias else None,
        r(1, 2, 3, 3),
        r(1) if norm else None,
        r(1) if norm else None,
        torch.zeros(1, dtype=torch.float64) if norm else None,
        torch.ones(1, dtype=torch.float64) if norm else None,
        train,
        1e-5,
    )


@pytest.mark.parametrize(
    "bias,norm,train,max_first",
    [(True, True, True, True), (True, True, False, False), (False, False, True, True)],
)
def test_cbam_op_gradcheck(bias, norm, train, max_first):
    args = _cbam_op_inputs(bias, norm, train)

    def fn(*tensors):
        full = list(args)
        for i, t in zip(differentiable, tensors):
            full[i] = t
        return ops.cbam(*full, max_first)[0]

    differentiable = [i for i, t in enumerate(args[:8]) if t is not None]
    inputs = [args[i] for i in differentiable]
    assert torch.autograd.gradcheck(fn, inputs)


def _eca_fn(x, w):
    return ops.eca(x, w)[0]


def _eca_inputs():
    x = torch.randn(2, 6, 3, 2, dtype=torch.float64, requires_grad=True)
    return x, torch.randn(1, 1, 3, dtype=torch.float64, requires_grad=True)


def test_eca_op_gradcheck():
    assert torch.autograd.gradcheck(_eca_fn, _eca_inputs())


def _gc_inputs():
    g = torch.Generator().manual_seed(0)
    return tuple(
        torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()
        for s in ((2, 5, 3, 4), (5,), (1,))
    )


def _gc_fn(*tensors):
    return ops.gc_context(*tensors)[0]


def test_gc_op_gradcheck_and_equals_the_plain_formula():
    inputs = _gc_inputs()
    assert torch.autograd.gradcheck(_gc_fn, inputs)
    torch.testing.assert_close(_gc_fn(*inputs), ops.gc_context_plain(*inputs))
    weights = ops.gc_context(*inputs)[1]
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 1, dtype=torch.float64))


def _gc_add_inputs():
    g = torch.Generator().manual_seed(2)

    def r(*s):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * 0.5).requires_grad_()

    hidden = 3
    return [
        r(2, 6, 3, 4),
        r(6),
        r(1),
        r(hidden, 6),
        r(hidden),
        r(hidden),
        r(hidden),
        r(6, hidden),
        r(6),
    ]


def _gc_add_fn(x, wk, bk, w1, b1, ln_w, ln_b, w2, b2):
    return ops.gc_add(x, wk, bk, w1, b1, ln_w, ln_b, 1e-5, w2, b2)[0]


def test_gc_add_op_gradcheck_and_equals_the_plain_formula():
    inputs = _gc_add_inputs()
    assert torch.autograd.gradcheck(_gc_add_fn, inputs)
    want = ops.gc_add_plain(*inputs[:7], 1e-5, *inputs[7:])
    torch.testing.assert_close(_gc_add_fn(*inputs), want)
    # the formula itself, written out: y = x + W2 relu(LN(W1 c + b1)) + b2
    x, wk, bk, w1, b1, ln_w, ln_b, w2, b2 = inputs
    logits = torch.einsum("c,bchw->bhw", wk, x) + bk
    weights = torch.softmax(logits.flatten(1), dim=1).view_as(logits)
    c = torch.einsum("bhw,bchw->bc", weights, x)
    h = c @ w1.t() + b1
    h = (h - h.mean(1, keepdim=True)) / (h.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    t = torch.relu(h * ln_w + ln_b) @ w2.t() + b2
    torch.testing.assert_close(want, x + t[:, :, None, None])


def test_ops_gradgradcheck():
    assert torch.autograd.gradgradcheck(_gc_fn, _gc_inputs())
    assert torch.autograd.gradgradcheck(_gc_add_fn, _gc_add_inputs())
    # the double backward differentiates the plain formula (create_graph=True)
    assert torch.autograd.gradgradcheck(_eca_fn, _eca_inputs())
    args = _cbam_op_inputs(True, True, True)
    inputs = list(args[:8])

    def fn(*tensors):
        return ops.cbam(*tensors, *args[8:], False)[0]

    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("name", ["cbam", "eca", "gc"])
def test_double_backward_through_the_switch_equals_plain(name):
    plain, accel = _pair(name, None, 16)
    x = torch.randn(2, 16, 6, 7)
    grad = torch.randn_like(x)
    results = []
    for module, on in ((plain, False), (accel, True)):
        leaf = x.clone().requires_grad_()
        with fast.enabled(on):
            (gx,) = torch.autograd.grad((module(leaf) * grad).sum(), leaf, create_graph=True)
        (ggx,) = torch.autograd.grad(gx.square().sum(), leaf)
        results.append((gx.detach(), ggx))
    _assert_close(results[1][0], results[0][0])
    _assert_close(results[1][1], results[0][1])


# ---------------------------------------------------------------------------------------------
# the tools see one op
@pytest.mark.parametrize("name", ["cbam", "eca", "gc"])
def test_fx_export_and_flop_counter_see_the_op(name):
    plain, accel = _pair(name, None, 16)
    plain.eval()
    accel.eval()
    x = torch.randn(2, 16, 5, 6)
    with fast.enabled():
        traced = torch.fx.symbolic_trace(accel)
        exported = torch.export.export(accel, (x,))
        with FlopCounterMode(display=False) as counter:
            accel(x)
    with FlopCounterMode(display=False) as reference:
        plain(x)
    fx_ops = [str(n.target) for n in traced.graph.nodes if n.op == "call_function"]
    assert f"attnzoo.{OPS[name]}.default" in fx_ops
    assert any(f"attnzoo.{OPS[name]}" in str(n.target) for n in exported.graph.nodes)
    _assert_close(traced(x), plain(x))
    _assert_close(exported.module()(x), plain(x))
    assert counter.get_total_flops() == reference.get_total_flops() > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cbam", "eca", "gc"])
def test_compile_fullgraph_sees_the_op_and_trains_alike(name):
    plain, accel = _pair(name, None, 16)
    x = torch.randn(2, 16, 9, 7)
    grad = torch.randn_like(x)
    ref = _run(plain, x, grad)
    graphs = []

    def backend(gm, inputs):  # record dynamo's graph, then trace the backward too (AOT)
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)

    torch._dynamo.reset()
    with fast.enabled():
        got = _run(torch.compile(accel, fullgraph=True, backend=backend), x, grad)
    targets = [str(n.target) for gm in graphs for n in gm.graph.nodes]
    assert f"attnzoo.{OPS[name]}.default" in targets
    _assert_close(got[0], ref[0])
    _assert_close(got[1], ref[1])
    for a, b in zip(got[2], ref[2]):
        _assert_close(a, b)


def test_without_a_compiler_the_ops_compute_the_plain_formula(tmp_path):
    code = (
        "import logging, torch, attnzoo, copy\n"
        "from attnzoo import fast\n"
        "logging.basicConfig()\n"
        "m = attnzoo.create('cbam', 8).train()\n"
        "f = fast.accelerate(copy.deepcopy(m))\n"
        "x = torch.randn(2, 8, 5, 5)\n"
        "with fast.enabled():\n"
        "    a = f(x); b = f(x)\n"
        "assert not fast.kernels.available()\n"
        "torch.testing.assert_close(a, m(x)); print('ok')\n"
    )
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "ATTNZOO_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
    assert out.stderr.count("fused CPU kernels unavailable") == 1
