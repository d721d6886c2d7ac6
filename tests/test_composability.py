"""Composability: every registered module (default and every preset) works with the PyTorch tools
plain ``nn.Module`` layers work with.

Hooks and wrapped submodules, ``torch.fx`` and torchvision's ``create_feature_extractor``, double
backward, ``torch.export`` with dynamic shapes, ``torch.func`` per-sample gradients, bfloat16
autocast training, weight parametrizations, dynamic quantization and the TorchScript-based ONNX
exporter. Modules get random weights (``conftest.randomize_``) so that zero-initialised parts
(``gamma = 0``, zero-initialised BatchNorm) do not hide the maths.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import attnzoo
from conftest import example_input, make, randomize_

PRESETS = [(n, p) for n in attnzoo.available() for p in attnzoo.info(n).presets]
IDS = [f"{n}-{p}" for n, p in PRESETS]
NAMES_2D = [n for n in attnzoo.available() if attnzoo.info(n).spatial_dims == 2]
#: 32 channels: valid for every preset (EMA's 32 groups, SK's 32 groups) and fast
CHANNELS = 32
SIZE = {1: (7,), 2: (5, 6), 3: (2, 4, 5)}
OTHER_SIZE = {1: (9,), 2: (7, 4), 3: (3, 5, 3)}
TINY = {1: (5,), 2: (3, 4), 3: (2, 3, 3)}  # for the costly second-derivative checks
LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _channels(name: str) -> int:
    """:data:`CHANNELS`, or the module's example width where 32 channels are not valid (Shuffle
    Attention's default needs a multiple of 2 x 64 groups)."""
    meta = attnzoo.info(name)
    try:
        meta.count_params(CHANNELS)
    except ValueError:
        return meta.example_channels
    return CHANNELS


def _build(name: str, preset: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    return make(name, _channels(name), preset=None if preset == "official" else preset).to(dtype)


def _input(
    name: str,
    batch: int = 2,
    *,
    other: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 1,
) -> torch.Tensor:
    dims = attnzoo.info(name).spatial_dims
    spatial = (OTHER_SIZE if other else SIZE)[dims]
    return example_input(name, batch, spatial, channels=_channels(name), dtype=dtype, seed=seed)


def _layers(module: nn.Module) -> list[str]:
    return [path for path, m in module.named_modules() if isinstance(m, LAYER_TYPES)]


PRESETS_WITH_LAYERS = [(n, p) for n, p in PRESETS if _layers(_build(n, p))]
IDS_WITH_LAYERS = [f"{n}-{p}" for n, p in PRESETS_WITH_LAYERS]


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


# --------------------------------------------------------------------------------------------
# hooks and wrapped submodules
@pytest.mark.parametrize(("name", "preset"), PRESETS, ids=IDS)
def test_forward_hooks_fire_on_every_submodule_with_parameters(name: str, preset: str) -> None:
    module = _build(name, preset).eval()
    owners = [p for p, m in module.named_modules() if list(m.parameters(recurse=False))]
    fired: set[str] = set()
    for path in owners:
        module.get_submodule(path).register_forward_hook(
            lambda m, args, out, path=path: fired.add(path)
        )
    with torch.no_grad():
        module(_input(name))
    assert fired == set(owners), f"{name}[{preset}]: no hook call for {set(owners) - fired}"


class _Doubled(nn.Module):
    """A wrapper around a layer, as LoRA/PEFT adapters and eager quantization install them."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x) * 2


@pytest.mark.parametrize(("name", "preset"), PRESETS_WITH_LAYERS, ids=IDS_WITH_LAYERS)
def test_wrapping_a_layer_acts_like_changing_its_weights(name: str, preset: str) -> None:
    """``wrapper(x) = 2 layer(x)`` must give the output of the module whose layer has doubled
    weight and bias, for every Linear/Conv submodule in turn."""
    base = _build(name, preset, torch.float64).eval()
    x = _input(name, dtype=torch.float64)
    changed = []
    with torch.no_grad():
        plain = base(x)
        for path in _layers(base):
            wrapped = copy.deepcopy(base)
            wrapper = _Doubled(wrapped.get_submodule(path))
            _set_submodule(wrapped, path, wrapper)
            scaled = copy.deepcopy(base)
            for p in scaled.get_submodule(path).parameters():
                p.mul_(2)
            got = wrapped(x)
            assert wrapper.calls >= 1, f"{name}[{preset}]: wrapper at {path} never called"
            changed.append(not torch.allclose(got, plain))
            torch.testing.assert_close(
                got,
                scaled(x),
                rtol=1e-9,
                atol=1e-10,
                msg=lambda m, path=path: f"{name}[{preset}] {path}: {m}",
            )
    # a layer right before a scale-invariant norm (GC's LayerNorm) may not change the output
    assert any(changed), f"{name}[{preset}]: no wrapped layer changed the output"


# --------------------------------------------------------------------------------------------
# torch.fx and feature extraction
@pytest.mark.parametrize(("name", "preset"), PRESETS, ids=IDS)
def test_fx_symbolic_trace_matches_eager(name: str, preset: str) -> None:
    module = _build(name, preset).eval()
    traced = torch.fx.symbolic_trace(module)
    for x in (_input(name), _input(name, 3, other=True)):
        with torch.no_grad():
            torch.testing.assert_close(traced(x), module(x), rtol=1e-6, atol=1e-6)


def _randomize_attached(model: nn.Module) -> nn.Module:
    for entry in attnzoo.attached(model):
        randomize_(model.get_submodule(entry.path), seed=3)
    return model


def _first_host(model: nn.Module) -> str:
    """The block holding the first attention module. (Not the module's own output: the block
    adds the residual into it in place, as torchvision's blocks do.)"""
    return attnzoo.attached(model)[0].path.rpartition(".")[0]


def _check_feature_extractor(model: nn.Module, nodes: list[str], x: torch.Tensor) -> None:
    from torchvision.models.feature_extraction import create_feature_extractor

    model.eval()
    extractor = create_feature_extractor(model, {n: n for n in nodes})
    eager: dict[str, torch.Tensor] = {}
    for n in nodes:
        model.get_submodule(n).register_forward_hook(
            lambda m, args, out, n=n: eager.__setitem__(n, out)
        )
    with torch.no_grad():
        model(x)
        got = extractor(x)
    assert set(got) == set(nodes)
    for n in nodes:
        torch.testing.assert_close(got[n], eager[n], rtol=1e-5, atol=1e-5, msg=n)


@pytest.mark.parametrize("name", NAMES_2D)
def test_create_feature_extractor_on_resnet50_with_attention(name: str) -> None:
    pytest.importorskip("torchvision")
    # attention in stage 1 only (3 blocks): the tracing is the same, the test stays fast
    model = _randomize_attached(
        attnzoo.models.resnet50(attention=name, stages=(1,), num_classes=10)
    )
    _check_feature_extractor(
        model, [_first_host(model), "layer2", "layer4", "fc"], torch.randn(1, 3, 64, 64)
    )


@pytest.mark.parametrize("name", NAMES_2D)
def test_create_feature_extractor_on_attached_torchvision_resnet18(name: str) -> None:
    tv = pytest.importorskip("torchvision")
    kwargs = {"groups": 32} if name == "sa" else {}  # SA's 64 groups need 128 | C; layer1 has 64
    model = _randomize_attached(
        attnzoo.models.attach(tv.models.resnet18(num_classes=10), name, **kwargs)
    )
    _check_feature_extractor(model, [_first_host(model), "layer3", "fc"], torch.randn(2, 3, 40, 36))


# --------------------------------------------------------------------------------------------
# double backward
@pytest.mark.parametrize(("name", "preset"), PRESETS, ids=IDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_gradgradcheck_float64(name: str, preset: str, train: bool) -> None:
    """Second derivatives with respect to the input (gradient penalties, Hessian-vector
    products). Pixel-pair modules use the explicit softmax here (see ``ops/pairwise.py``)."""
    module = _build(name, preset, torch.float64).train(train)
    x = example_input(
        name,
        2,
        TINY[attnzoo.info(name).spatial_dims],
        channels=_channels(name),
        dtype=torch.float64,
    ).requires_grad_()
    assert torch.autograd.gradgradcheck(
        module, (x,), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True
    )


@pytest.mark.parametrize("name", attnzoo.available())
def test_gradgradcheck_float64_through_parameters(name: str) -> None:
    """The mixed second derivatives a gradient penalty trains with, d/dtheta of dy/dx (train
    mode, default configuration, a tiny input)."""
    module = _build(name, "official", torch.float64).train()
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    x = example_input(
        name,
        2,
        TINY[attnzoo.info(name).spatial_dims],
        channels=_channels(name),
        dtype=torch.float64,
    ).requires_grad_()

    def fn(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return functional_call(module, dict(zip(names, params)), (x,))

    assert torch.autograd.gradgradcheck(
        fn, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True
    )


# --------------------------------------------------------------------------------------------
# torch.export
@pytest.mark.parametrize(("name", "preset"), PRESETS, ids=IDS)
def test_torch_export_dynamic_batch_and_size(name: str, preset: str) -> None:
    """Batch: a named ``Dim`` from 1. Spatial sizes: ``Dim.AUTO``, i.e. dynamic with the range the
    program supports (2x2 sub-sampling adds guards such as "pooled size != 1" that a named
    ``Dim`` from 1 would reject); the program is then run at another batch and size."""
    module = _build(name, preset).eval()
    x = _input(name)
    dims = {0: torch.export.Dim("batch", min=1, max=64)}
    for i in range(2, x.dim()):
        dims[i] = torch.export.Dim.AUTO
    program = torch.export.export(module, (x,), dynamic_shapes=(dims,))
    exported = program.module()
    for other in (_input(name, 3, other=True), _input(name, 1, other=True, seed=2)):
        with torch.no_grad():
            torch.testing.assert_close(exported(other), module(other), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# torch.func
@pytest.mark.parametrize(("name", "preset"), PRESETS, ids=IDS)
def test_vmap_grad_per_sample_gradients_equal_a_loop(name: str, preset: str) -> None:
    """Per-sample gradients (as DP-SGD computes them) with respect to the parameters and the
    sample (parameter-free modules: the sample only), eval mode (BatchNorm statistics fixed)."""
    module = _build(name, preset).eval()
    params = {n: p.detach() for n, p in module.named_parameters()}
    x = _input(name, 3)
    target = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(5))

    def loss(p: dict[str, torch.Tensor], sample: torch.Tensor) -> torch.Tensor:
        return (functional_call(module, p, (sample.unsqueeze(0),)) * target).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "batching rule not implemented" falls back to a loop
        per_param, per_input = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
        sample = x[i].clone().requires_grad_()
        grads = torch.autograd.grad(
            loss(leaves, sample), [*leaves.values(), sample], allow_unused=True
        )
        expected = {
            n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(leaves.items(), grads)
        }
        expected["<input>"] = grads[-1]
        got = {**{n: g[i] for n, g in per_param.items()}, "<input>": per_input[i]}
        # float32; some gradients are exactly 0 in exact arithmetic (key biases before a softmax):
        # the absolute tolerance follows the scale of this sample's gradients
        scale = max(float(g.abs().max()) for g in expected.values())
        for n, g in expected.items():
            torch.testing.assert_close(
                got[n],
                g,
                rtol=1e-4,
                atol=1e-5 * max(scale, 1.0),
                msg=lambda m, n=n, i=i: f"{name}[{preset}] {n}, sample {i}: {m}",
            )


# --------------------------------------------------------------------------------------------
# mixed precision
@pytest.mark.parametrize(("name", "preset"), PRESETS, ids=IDS)
def test_bfloat16_autocast_training_keeps_input_dtype(name: str, preset: str) -> None:
    """Inside an autocast network a module receives bfloat16 activations: it must train and return
    bfloat16 (not promote the rest of the network to float32)."""
    module = _build(name, preset).train()
    x = _input(name).to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
        loss = y.float().square().mean()
    assert y.dtype == torch.bfloat16, f"{name}[{preset}] returned {y.dtype} for bfloat16 input"
    assert y.shape == x.shape
    loss.backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    assert torch.isfinite(x.grad).all()
    for pname, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: {pname}"


# --------------------------------------------------------------------------------------------
# parametrizations
@pytest.mark.parametrize(("name", "preset"), PRESETS_WITH_LAYERS, ids=IDS_WITH_LAYERS)
@pytest.mark.parametrize("kind", ["spectral_norm", "weight_norm"])
def test_weight_parametrizations_apply(name: str, preset: str, kind: str) -> None:
    """``spectral_norm`` (SAGAN's discriminator) / ``weight_norm`` on every conv and linear: the
    module trains, and in eval computes with the parametrized weights."""
    from torch.nn.utils import parametrizations

    module = _build(name, preset)
    plain = copy.deepcopy(module).eval()
    for path in _layers(module):
        layer = module.get_submodule(path)
        getattr(parametrizations, kind)(layer)
        if kind == "weight_norm":  # at registration g = ||v||: the weight is unchanged; move g
            with torch.no_grad():
                layer.parametrizations.weight.original0.mul_(0.5)
    x = _input(name).requires_grad_()
    trained = copy.deepcopy(module).train()  # a copy: train mode updates BatchNorm statistics
    trained(x).square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for path in _layers(trained):
        weight = trained.get_submodule(path).parametrizations.weight
        leaves = (
            [weight.original] if kind == "spectral_norm" else [weight.original0, weight.original1]
        )
        assert all(p.grad is not None for p in leaves), f"{name}[{preset}]: no grad at {path}"

    module.eval()
    reference = copy.deepcopy(plain)
    with torch.no_grad():
        for path in _layers(module):
            reference.get_submodule(path).weight.copy_(module.get_submodule(path).weight)
        y, y_plain = module(x), plain(x)
        assert not torch.allclose(y, y_plain), f"{name}[{preset}]: {kind} had no effect"
        torch.testing.assert_close(y, reference(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# dynamic quantization
#: one module per stage of a ResNet-18; together every 2-D module family
QUANTIZE_GROUPS = [
    ("se", "cbam", "eca", "sagan"),
    ("gc", "ca", "ema", "dual_attention"),
    ("sk", "nonlocal2d", "pam", "cam"),
]


@pytest.mark.parametrize("names", QUANTIZE_GROUPS, ids="-".join)
def test_quantize_dynamic_on_attached_resnet(names: tuple[str, ...]) -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10)
    for stage, name in enumerate(names, start=1):
        attnzoo.models.attach(model, name, stages=(stage,))
    model = _randomize_attached(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        quantized = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8
        )
    linears = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    for path in linears:
        assert not isinstance(quantized.get_submodule(path), nn.Linear), f"{path} not quantized"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, got = model(x), quantized(x)
    err = (got - ref).abs().max() / ref.abs().max()
    assert err < 0.05, f"{names}: dynamic int8 relative error {err:.3f}"


# --------------------------------------------------------------------------------------------
# ONNX, TorchScript-based exporter
@pytest.mark.parametrize(("name", "preset"), PRESETS, ids=IDS)
def test_onnx_torchscript_exporter_dynamic_batch_and_size(name: str, preset: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    module = _build(name, preset).eval()
    x = _input(name)
    axes = {0: "batch", **{i: f"s{i}" for i in range(2, x.dim())}}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (x,),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": axes, "y": axes},
        )
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for other in (_input(name, 3, other=True), _input(name, 1, other=True, seed=2)):
        with torch.no_grad():
            expected = module(other)
        got = torch.from_numpy(session.run(None, {"x": other.numpy()})[0])
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
