"""Non-local blocks: parity with a naive N x N formula (every mode, dimension and option), identity
at init, sub-sampling on odd maps, no N x M tensor, timm parity, argument errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pixel_pair_helpers import LargestTensor, assert_same_forward_and_grads

import attnzoo
from attnzoo.modules.nonlocal_ import NonLocal1d, NonLocal2d, NonLocal3d, nonlocal_param_count
from conftest import randomize_

CLASSES = {1: NonLocal1d, 2: NonLocal2d, 3: NonLocal3d}
MODES = ["embedded_gaussian", "gaussian", "dot_product", "concatenation"]
ODD_SIZES = {1: (9,), 2: (5, 7), 3: (3, 5, 6)}
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# ---------------------------------------------------------------------------------------------
# the naive reference: every pair (i, j) explicitly, as in the papers / the PyTorch port
def _pool(x: torch.Tensor, dims: int, ceil: bool) -> torch.Tensor:
    if dims == 1:
        return F.max_pool1d(x, 2, 2, ceil_mode=ceil)
    if dims == 2:
        return F.max_pool2d(x, 2, 2, ceil_mode=ceil)
    return F.max_pool3d(x, (1, 2, 2), (1, 2, 2), ceil_mode=ceil)


def _conv(x: torch.Tensor, conv: torch.nn.Module, dims: int) -> torch.Tensor:
    return CONV[dims](x, conv.weight, conv.bias)


def naive_affinity_and_values(m, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``f / C(x)`` ``(B, N, M)`` built pair by pair, and ``g`` ``(B, I, M)``."""
    dims, B = m.spatial_dims, x.shape[0]
    pool = lambda t: _pool(t, dims, m.pool_ceil_mode)  # noqa: E731

    def key_path(conv):
        if not m.sub_sample:
            return _conv(x, conv, dims)
        if m.pool_before_conv:
            return _conv(pool(x), conv, dims)
        return pool(_conv(x, conv, dims))

    if m.mode == "gaussian":
        theta = x
        phi = pool(x) if m.sub_sample else x
    else:
        theta, phi = _conv(x, m.theta, dims), key_path(m.phi)
    g = key_path(m.g)
    theta, phi, g = (t.reshape(B, t.shape[1], -1) for t in (theta, phi, g))
    N, M = theta.shape[2], phi.shape[2]
    if m.mode == "concatenation":
        # the PyTorch port's form: concat [theta_i, phi_j] for every pair, project, ReLU
        pair = torch.cat(
            [theta.unsqueeze(3).expand(-1, -1, N, M), phi.unsqueeze(2).expand(-1, -1, N, M)], dim=1
        )  # (B, 2I, N, M)
        w = m.concat_project.weight.view(-1)
        f = torch.relu(torch.einsum("bcnm,c->bnm", pair, w)) / M
    else:
        f = torch.einsum("bcn,bcm->bnm", theta, phi)
        if m.mode == "dot_product":
            f = f / M
        else:
            scale = theta.shape[1] ** -0.5 if m.use_scale else 1.0
            f = torch.softmax(f * scale, dim=-1)
    return f, g


def naive_nonlocal(m, x: torch.Tensor) -> torch.Tensor:
    dims, B = m.spatial_dims, x.shape[0]
    f, g = naive_affinity_and_values(m, x)
    y = torch.einsum("bnm,bcm->bcn", f, g).reshape(B, -1, *x.shape[2:])
    if m.bn_layer:
        conv, bn = m.W[0], m.W[1]
        z = _conv(y, conv, dims)
        z = F.batch_norm(
            z,
            bn.running_mean.clone(),
            bn.running_var.clone(),
            bn.weight,
            bn.bias,
            training=m.training,
            eps=bn.eps,
        )
    else:
        z = _conv(y, m.W, dims)
    return x + z


def build(dims: int, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_(CLASSES[dims](6, **kw), seed).double()


def rand(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sub_sample", [True, False])
def test_matches_naive_formula_float64(dims: int, mode: str, sub_sample: bool) -> None:
    m = build(dims, mode=mode, sub_sample=sub_sample).eval()
    x = rand(2, 6, *ODD_SIZES[dims])
    assert_same_forward_and_grads(m, lambda t: naive_nonlocal(m, t), x)


def _ids(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items())


OPTIONS = [
    {"bn_layer": False},
    {"pool_before_conv": True},
    {"pool_ceil_mode": False},
    {"inter_channels": 5},
    {"inter_channels": 1},
]


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("options", OPTIONS, ids=_ids)
def test_options_match_naive_formula(dims: int, mode: str, options: dict) -> None:
    m = build(dims, mode=mode, **options).eval()
    x = rand(2, 6, *ODD_SIZES[dims])
    assert_same_forward_and_grads(m, lambda t: naive_nonlocal(m, t), x)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("mode", ["embedded_gaussian", "gaussian"])
@pytest.mark.parametrize("preset", [None, "facebookresearch"])
def test_use_scale_and_presets_match_naive_formula(
    dims: int, mode: str, preset: str | None
) -> None:
    torch.manual_seed(0)
    m = attnzoo.create(f"nonlocal{dims}d", 6, preset=preset, mode=mode, use_scale=True)
    m = randomize_(m).double().eval()
    assert m.use_scale and m.pool_before_conv == (preset == "facebookresearch")
    x = rand(2, 6, *ODD_SIZES[dims])
    assert_same_forward_and_grads(m, lambda t: naive_nonlocal(m, t), x)


@pytest.mark.parametrize("mode", MODES)
def test_train_mode_batchnorm_matches_naive_formula(mode: str) -> None:
    m = build(2, mode=mode).train()
    x = rand(3, 6, 6, 5)
    assert_same_forward_and_grads(m, lambda t: naive_nonlocal(m, t), x)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_attention_map_is_the_normalised_affinity(dims: int, mode: str) -> None:
    m = build(dims, mode=mode).eval()
    x = rand(2, 6, *ODD_SIZES[dims])
    got = m.attention_map(x)
    n = math.prod(ODD_SIZES[dims])
    assert got.shape[:2] == (2, n)
    torch.testing.assert_close(got, naive_affinity_and_values(m, x)[0], atol=1e-12, rtol=1e-10)
    if mode in ("embedded_gaussian", "gaussian"):
        torch.testing.assert_close(got.sum(-1), torch.ones(2, n, dtype=torch.float64))


def test_facebookresearch_preset_is_scale_and_pool_first() -> None:
    """Checked against facebookresearch/video-nonlocal-net (nonlocal_helper.py, config.py):
    USE_SCALE=True scales by dim_inner**-0.5 before the softmax; the max-pool is applied to the
    block input and phi/g convs follow; USE_MAXPOOL=True; dim_inner = dim_in / 2."""
    info = attnzoo.info("nonlocal3d")
    assert info.presets["facebookresearch"] == {"use_scale": True, "pool_before_conv": True}
    m = attnzoo.create("nonlocal3d", 64, preset="facebookresearch")
    assert m.inter_channels == 32 and m.sub_sample and m.bn_layer


# ---------------------------------------------------------------------------------------------
# identity at init (zero-initialised BN / W)
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bn_layer", [True, False])
@pytest.mark.parametrize("train", [False, True])
def test_identity_at_init(dims: int, mode: str, bn_layer: bool, train: bool) -> None:
    m = CLASSES[dims](8, mode=mode, bn_layer=bn_layer).train(train)
    x = torch.randn(2, 8, *ODD_SIZES[dims])
    with torch.no_grad():
        assert torch.equal(m(x), x)
    if bn_layer:
        assert not m.W[1].weight.any() and not m.W[1].bias.any()
    else:
        assert not m.W.weight.any() and not m.W.bias.any()


# ---------------------------------------------------------------------------------------------
# sub-sampling on odd and non-square maps
@pytest.mark.parametrize(
    ("dims", "spatial", "ceil_keys", "floor_keys"),
    [
        (1, (9,), 5, 4),
        (2, (5, 7), 3 * 4, 2 * 3),
        (2, (13, 20), 7 * 10, 6 * 10),
        (3, (3, 5, 6), 3 * 3 * 3, 3 * 2 * 3),  # time is never pooled
    ],
)
def test_sub_sample_key_count_on_odd_maps(dims, spatial, ceil_keys, floor_keys) -> None:
    """Default (pool_ceil_mode=True): ceil(H/2) keys per axis, the odd row/column stays a key.
    pool_ceil_mode=False: floor(H/2), the official codes' behaviour (the last odd row/column is
    never a key)."""
    x = torch.randn(1, 6, *spatial)
    for ceil, keys in ((True, ceil_keys), (False, floor_keys)):
        m = CLASSES[dims](6, pool_ceil_mode=ceil).eval()
        assert m.attention_map(x).shape == (1, math.prod(spatial), keys)
        assert m(x).shape == x.shape


def test_odd_row_is_a_key_only_with_ceil_mode() -> None:
    """gaussian mode, sub_sample: the keys are max-pooled raw inputs. Make the last (odd) row
    dominant: with ceil mode its pooled value is a key, with floor mode it cannot be."""
    x = torch.zeros(1, 2, 5, 4, dtype=torch.float64)
    x[0, 0, 4, :] = 3.0  # only in the last row
    for ceil, expected_max in ((True, 3.0), (False, 0.0)):
        m = NonLocal2d(2, mode="gaussian", pool_ceil_mode=ceil).double().eval()
        keys = m._project(x)[1]  # (1, M, C): the pooled raw input
        assert keys[..., 0].max().item() == expected_max


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_even_sizes_ceil_and_floor_agree(dims: int) -> None:
    spatial = {1: (8,), 2: (6, 4), 3: (3, 4, 6)}[dims]
    x = rand(2, 6, *spatial)
    a = build(dims, pool_ceil_mode=True).eval()
    b = build(dims, pool_ceil_mode=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_size_one_maps_work_by_default_and_floor_mode_explains(dims: int) -> None:
    ones = (1,) * dims
    x = torch.randn(2, 6, *ones)
    m = randomize_(CLASSES[dims](6)).eval()
    with torch.no_grad():
        assert m(x).shape == x.shape
    m_floor = CLASSES[dims](6, pool_ceil_mode=False).eval()
    with pytest.raises(ValueError, match=rf"{CLASSES[dims].__name__}.*pool_ceil_mode"):
        m_floor(x)


# ---------------------------------------------------------------------------------------------
# memory: no N x M tensor in forward or backward
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sub_sample", [True, False])
def test_no_pairwise_tensor_in_forward_and_backward(dims: int, mode: str, sub_sample: bool) -> None:
    spatial = {1: (512,), 2: (16, 24), 3: (2, 12, 16)}[dims]
    n = math.prod(spatial)
    keys = (n // 2 if dims == 1 else n // 4) if sub_sample else n
    m = randomize_(CLASSES[dims](8, mode=mode, sub_sample=sub_sample)).train()
    x = torch.randn(2, 8, *spatial, requires_grad=True)
    with LargestTensor() as spy:
        m(x).square().sum().backward()
    # the largest legitimate tensors are (B, N, C)-sized; an affinity has B * N * M elements
    assert spy.numel < 2 * n * keys // 8, f"{spy.op} produced {spy.numel} elements"
    with LargestTensor() as spy_map:
        m.attention_map(x)
    assert spy_map.numel >= 2 * n * keys  # the map itself is N x M (sanity check of the spy)


# ---------------------------------------------------------------------------------------------
# timm parity
def _timm_and_ours(use_scale: bool, dtype: torch.dtype):
    timm_layers = pytest.importorskip("timm.layers")
    channels = 64
    torch.manual_seed(0)
    ref = randomize_(timm_layers.NonLocalAttn(channels, use_scale=use_scale)).to(dtype).eval()
    inter = ref.t.out_channels  # make_divisible(64 / 8, 8) = 8
    ours = NonLocal2d(channels, inter_channels=inter, sub_sample=False, use_scale=use_scale)
    ours = ours.to(dtype).eval()
    with torch.no_grad():
        pairs = ((ref.t, ours.theta), (ref.p, ours.phi), (ref.g, ours.g), (ref.z, ours.W[0]))
        for src, dst in pairs:
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
        if use_scale:
            # timm scales by C**-0.5, ours (facebookresearch) by inter**-0.5: fold the ratio
            # into theta, which the affinity is linear in.
            ratio = (inter / channels) ** 0.5
            ours.theta.weight.mul_(ratio)
            ours.theta.bias.mul_(ratio)
        ours.W[1].load_state_dict(ref.norm.state_dict())
    return ref, ours


@pytest.mark.parametrize("use_scale", [False, True])
def test_timm_nonlocal_attn_parity(use_scale: bool) -> None:
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        ref, ours = _timm_and_ours(use_scale, dtype)
        x = torch.randn(2, 64, 9, 11, dtype=dtype)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------
# compile and ONNX for every mode (the contract tests cover the default mode only)
@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_compile_fullgraph_every_mode(mode: str) -> None:
    torch._dynamo.reset()
    m = randomize_(NonLocal2d(8, mode=mode)).eval()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager", dynamic=True)
    for spatial in ((6, 8), (5, 7)):
        x = torch.randn(2, 8, *spatial)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dims", "mode"),
    [
        (2, "gaussian"),
        (2, "dot_product"),
        (1, "concatenation"),
        (2, "concatenation"),
        (3, "concatenation"),
    ],
)
def test_onnx_dynamic_every_mode(dims: int, mode: str, tmp_path) -> None:
    """Sort, cumsum, gather/scatter (concatenation) and SDPA export with dynamic sizes; the
    contract tests cover the default mode in every dimension."""
    ort = pytest.importorskip("onnxruntime")
    import warnings

    m = randomize_(CLASSES[dims](8, mode=mode)).eval()
    x = torch.randn(2, 8, *{1: (10,), 2: (8, 10), 3: (2, 6, 8)}[dims])
    shapes = {0: torch.export.Dim("batch", min=1, max=64)}
    for i in range(2, x.dim()):
        shapes[i] = torch.export.Dim(f"s{i}", min=1, max=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            m, (x,), dynamo=True, opset_version=18, dynamic_shapes=(shapes,), verbose=False
        )
    path = str(tmp_path / "nl.onnx")
    program.save(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for batch, spatial in (
        (1, {1: (7,), 2: (5, 7), 3: (3, 5, 7)}),
        (3, {1: (16,), 2: (12, 9), 3: (2, 8, 6)}),
    ):
        xi = torch.randn(batch, 8, *spatial[dims])
        with torch.no_grad():
            expected = m(xi)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: xi.numpy()})[0])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# arguments
def test_defaults_and_inter_channels() -> None:
    m = NonLocal2d(64)
    assert (m.mode, m.inter_channels, m.sub_sample, m.bn_layer, m.use_scale) == (
        "embedded_gaussian",
        32,
        True,
        True,
        False,
    )
    assert NonLocal2d(1).inter_channels == 1  # C // 2 = 0 is guarded
    assert NonLocal2d(3).inter_channels == 1
    assert not hasattr(NonLocal2d(8, mode="gaussian"), "theta")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bn_layer", [True, False])
def test_param_count_formula(mode: str, bn_layer: bool) -> None:
    for dims in (1, 2, 3):
        m = CLASSES[dims](12, mode=mode, bn_layer=bn_layer, inter_channels=5)
        expected = sum(p.numel() for p in m.parameters())
        assert nonlocal_param_count(12, mode=mode, bn_layer=bn_layer, inter_channels=5) == expected


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"mode": "cosine"}, ValueError, "NonLocal2d: mode must be one of"),
        ({"inter_channels": 0}, ValueError, "NonLocal2d: inter_channels must be an integer >= 1"),
        ({"inter_channels": 2.5}, TypeError, "NonLocal2d: inter_channels"),
        ({"mode": "dot_product", "use_scale": True}, ValueError, "NonLocal2d: use_scale"),
        ({"mode": "concatenation", "use_scale": True}, ValueError, "NonLocal2d: use_scale"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        NonLocal2d(8, **kwargs)


def test_wrong_input_rank_names_the_layout() -> None:
    with pytest.raises(ValueError, match=r"NonLocal3d: input must have 5 dimensions"):
        NonLocal3d(8)(torch.randn(1, 8, 4, 4))
