"""The module contract (design.md), checked for every registered attention module.

Registering a module enrols it here: every test is parametrised over ``attnzoo.available()``.
Modules are given random weights (``conftest.randomize_``) so that zero-initialised parts do not
hide the maths; the identity-at-init test uses the official initialisation.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnzoo
from conftest import SPATIAL_SIZES, example_input, make

NAMES = attnzoo.available()
PRESETS = [(n, p) for n in NAMES for p in attnzoo.info(n).presets]


def _dims(name: str) -> int:
    return attnzoo.info(name).spatial_dims


def _memory_format(dims: int) -> torch.memory_format | None:
    return {2: torch.channels_last, 3: torch.channels_last_3d}.get(dims)


def test_registry_is_populated() -> None:
    expected = {"se", "cbam", "eca", "sk", "gc", "ca", "ema"}
    assert expected <= set(NAMES), f"missing: {expected - set(NAMES)}"


# --------------------------------------------------------------------------------------------
# shapes, dtypes, memory format
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 3])
def test_shape_dtype_device_eval(name: str, dtype: torch.dtype, batch: int) -> None:
    module = make(name).to(dtype).eval()
    for spatial in SPATIAL_SIZES[_dims(name)]:
        x = example_input(name, batch, spatial, dtype=dtype)
        with torch.no_grad():
            y = module(x)
        assert isinstance(y, torch.Tensor), f"{name} returned {type(y).__name__}"
        assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
        assert torch.isfinite(y).all(), f"{name} gave non-finite values at {tuple(x.shape)}"


@pytest.mark.parametrize("name", NAMES)
def test_train_mode_forward_backward(name: str) -> None:
    module = make(name).train()
    x = example_input(name, 2, SPATIAL_SIZES[_dims(name)][2]).requires_grad_()
    y = module(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for pname, p in module.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reached {pname}"


@pytest.mark.parametrize("name", [n for n in NAMES if _dims(n) in (2, 3)])
@pytest.mark.parametrize("train", [False, True])
def test_channels_last_is_preserved(name: str, train: bool) -> None:
    fmt = _memory_format(_dims(name))
    module = make(name).train(train)
    x = example_input(name, 2, SPATIAL_SIZES[_dims(name)][2])
    x_cl = x.contiguous(memory_format=fmt)
    with torch.no_grad():
        y_ref = module(x)
        y = module(x_cl)
    assert y.is_contiguous(memory_format=fmt), f"{name} dropped channels_last"
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_autocast(name: str) -> None:
    module = make(name).eval()
    x = example_input(name, 2, SPATIAL_SIZES[_dims(name)][2])
    with torch.no_grad():
        ref = module(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(x)
    assert y.shape == x.shape and y.dtype in (torch.float32, torch.bfloat16)
    assert torch.isfinite(y).all()
    # bfloat16 keeps 8 bits of mantissa: compare relative to the output's scale.
    err = (y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)
    assert err < 0.1, f"{name}: bf16 autocast relative error {err:.3f}"


# --------------------------------------------------------------------------------------------
# properties over shapes (hypothesis)
@pytest.mark.parametrize("name", NAMES)
def test_samples_are_independent_in_eval(name: str) -> None:
    """In eval mode each sample's output depends on that sample alone, at any size."""
    module = make(name).double().eval()
    dims = _dims(name)

    @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        batch=st.integers(2, 3), spatial=st.lists(st.integers(1, 11), min_size=dims, max_size=dims)
    )
    def check(batch: int, spatial: list[int]) -> None:
        x = example_input(name, batch, tuple(spatial), dtype=torch.float64)
        with torch.no_grad():
            y = module(x)
            y0 = module(x[1:2])
        assert y.shape == x.shape
        torch.testing.assert_close(y[1:2], y0, rtol=1e-9, atol=1e-10)

    check()


# --------------------------------------------------------------------------------------------
# gradients
@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_float64(name: str) -> None:
    module = make(name).double().train()
    spatial = {1: (5,), 2: (4, 5), 3: (2, 3, 4)}[_dims(name)]
    x = example_input(name, 2, spatial, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(module, (x,), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


# --------------------------------------------------------------------------------------------
# compile and export
@pytest.mark.parametrize("name", NAMES)
def test_compile_fullgraph_matches_eager(name: str) -> None:
    """fullgraph=True fails on any graph break; aot_eager also traces the backward."""
    torch._dynamo.reset()
    module = make(name).train()
    # A separate copy: train-mode BatchNorm updates its running statistics in place.
    compiled = torch.compile(copy.deepcopy(module), fullgraph=True, backend="aot_eager")
    x = example_input(name, 2, SPATIAL_SIZES[_dims(name)][2])
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_eager, y_comp = module(x1), compiled(x2)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-5)
    y_eager.square().sum().backward()
    y_comp.square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["se", "cbam", "ema"])
def test_compile_inductor_matches_eager(name: str) -> None:
    torch._dynamo.reset()
    module = make(name).eval()
    compiled = torch.compile(module, fullgraph=True)
    x = example_input(name, 2, SPATIAL_SIZES[_dims(name)][2])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-5)


def _export_onnx(module: torch.nn.Module, x: torch.Tensor, path: str) -> None:
    dims = {0: torch.export.Dim("batch", min=1, max=64)}
    for i in range(2, x.dim()):
        dims[i] = torch.export.Dim(f"s{i}", min=1, max=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, (x,), dynamo=True, opset_version=18, dynamic_shapes=(dims,), verbose=False
        )
    program.save(path)


@pytest.mark.parametrize("name", NAMES)
def test_onnx_dynamic_shapes_match_onnxruntime(name: str, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    module = make(name).eval()
    dims = _dims(name)
    export_spatial = {1: (10,), 2: (8, 10), 3: (4, 6, 8)}[dims]
    path = str(tmp_path / f"{name}.onnx")
    _export_onnx(module, example_input(name, 2, export_spatial), path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    other_sizes = {1: [(7,), (16,)], 2: [(5, 7), (12, 9)], 3: [(3, 5, 7), (2, 8, 6)]}[dims]
    for batch, spatial in zip((1, 3), other_sizes):
        x = example_input(name, batch, spatial, seed=batch)
        with torch.no_grad():
            expected = module(x)
        got = torch.from_numpy(session.run(None, {input_name: x.numpy()})[0])
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# attention maps for visualisation
@pytest.mark.parametrize("name", NAMES)
def test_attention_maps_method(name: str) -> None:
    from attnzoo.viz import attention_maps

    module = make(name).eval()
    x = example_input(name, 3, SPATIAL_SIZES[_dims(name)][1])
    point = (0.5,) * _dims(name)
    with torch.no_grad():
        maps = module.attention_maps(x)
        at_point = module.attention_maps(x, query=point)
    assert isinstance(maps, dict) and maps, f"{name}: attention_maps must return a non-empty dict"
    assert set(at_point) == set(maps)
    for key, value in maps.items():
        assert isinstance(key, str) and isinstance(value, torch.Tensor), (name, key)
        assert value.shape[0] == 3 and torch.isfinite(value).all(), (name, key)
        if not getattr(module, "attention_query", False):  # `query` is accepted and ignored
            torch.testing.assert_close(at_point[key], value, rtol=0, atol=0)
    records = attention_maps(module, x, query=point)
    assert list(records) == [""] and records[""].name == name
    assert set(records[""].maps) == set(maps)
    assert (records[""].query is None) != bool(getattr(module, "attention_query", False))


# --------------------------------------------------------------------------------------------
# state, initialisation, parameters
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name: str) -> None:
    source = make(name, seed=1).eval()
    target = make(name, seed=2).eval()
    target.load_state_dict(copy.deepcopy(source.state_dict()))
    x = example_input(name, 2, SPATIAL_SIZES[_dims(name)][1])
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", [n for n in NAMES if attnzoo.info(n).identity_at_init])
@pytest.mark.parametrize("train", [False, True])
def test_identity_at_init(name: str, train: bool) -> None:
    module = make(name, randomize=False).train(train)
    x = example_input(name, 2, SPATIAL_SIZES[_dims(name)][2])
    with torch.no_grad():
        torch.testing.assert_close(module(x), x, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("name", "preset"), PRESETS)
def test_param_count_formula_matches_module(name: str, preset: str) -> None:
    meta = attnzoo.info(name)
    for channels in (meta.example_channels, 4 * meta.example_channels):
        module = attnzoo.create(name, channels, preset=preset)
        actual = sum(p.numel() for p in module.parameters())
        formula = meta.count_params(channels, **meta.presets[preset])
        assert formula == actual, f"{name}[{preset}] C={channels}: formula {formula} != {actual}"
        x = example_input(name, 2, SPATIAL_SIZES[meta.spatial_dims][1], channels=channels)
        with torch.no_grad():
            assert module.eval()(x).shape == x.shape


# --------------------------------------------------------------------------------------------
# errors
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels", [0, -8])
def test_non_positive_channels_raise(name: str, channels: int) -> None:
    cls = attnzoo.get(name)
    with pytest.raises(ValueError, match=rf"{cls.__name__}.*channels"):
        attnzoo.create(name, channels)


@pytest.mark.parametrize("name", NAMES)
def test_non_integer_channels_raise_type_error(name: str) -> None:
    cls = attnzoo.get(name)
    with pytest.raises(TypeError, match=rf"{cls.__name__}.*channels"):
        attnzoo.create(name, 64.0)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_channel_count_at_forward(name: str) -> None:
    meta = attnzoo.info(name)
    module = make(name).eval()
    x = example_input(
        name, 2, SPATIAL_SIZES[meta.spatial_dims][1], channels=2 * meta.example_channels
    )
    with pytest.raises(ValueError, match=rf"{meta.cls.__name__}.*channels={meta.example_channels}"):
        module(x)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_rank_at_forward(name: str) -> None:
    meta = attnzoo.info(name)
    module = make(name).eval()
    x = torch.randn(2, meta.example_channels, *([5] * (meta.spatial_dims + 1)))
    with pytest.raises(
        ValueError, match=rf"{meta.cls.__name__}.*{meta.spatial_dims + 2} dimensions"
    ):
        module(x)


BAD_ARGUMENTS = [
    ("eca", 64, {"kernel_size": 4}, "kernel_size"),
    ("eca", 64, {"kernel_size": 0}, "kernel_size"),
    ("se", 64, {"reduction": 0}, "reduction"),
    ("cbam", 64, {"kernel_size": 6}, "kernel_size"),
    ("cbam", 64, {"order": "sideways"}, "order"),
    ("sk", 48, {"groups": 32}, "groups"),
    ("ema", 48, {"factor": 32}, "factor"),
    ("gc", 64, {"fusion": ()}, "fusion"),
    ("gc", 64, {"pooling": "max"}, "pooling"),
]


@pytest.mark.parametrize(("name", "channels", "kwargs", "argument"), BAD_ARGUMENTS)
def test_bad_arguments_raise_value_error(
    name: str, channels: int, kwargs: dict, argument: str
) -> None:
    cls = attnzoo.get(name)
    with pytest.raises(ValueError, match=rf"{cls.__name__}.*{argument}"):
        attnzoo.create(name, channels, **kwargs)
