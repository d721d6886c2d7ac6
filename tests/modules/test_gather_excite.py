"""GatherExcite: reference formula (every variant), timm parity, parameter counts, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.modules.gather_excite import GatherExcite, ge_hidden_channels, ge_param_count
from conftest import assert_matches_reference, randomize_


# ---------------------------------------------------------------------------------------------
# reference, written out with loops (float64)
def _avg_gather(x: torch.Tensor, e: int) -> torch.Tensor:
    """Mean of each ``(2e-1) x (2e-1)`` window centred on ``(i e, j e)``, inside the map only."""
    b, c, h, w = x.shape
    oh, ow = math.ceil(h / e), math.ceil(w / e)
    rows = []
    for i in range(oh):
        cols = []
        for j in range(ow):
            r0, r1 = max(0, i * e - (e - 1)), min(h, i * e + e)
            c0, c1 = max(0, j * e - (e - 1)), min(w, j * e + e)
            cols.append(x[:, :, r0:r1, c0:c1].sum((2, 3)) / ((r1 - r0) * (c1 - c0)))
        rows.append(torch.stack(cols, -1))
    return torch.stack(rows, -2)


def _depthwise3x3_s2(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise 3x3 conv, stride 2, zero padding 1, no bias, as a sum of 9 shifted slices."""
    h, w = x.shape[2:]
    oh, ow = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    xp = torch.zeros(*x.shape[:2], h + 2, w + 2, dtype=x.dtype)
    xp[:, :, 1:-1, 1:-1] = x
    out = torch.zeros(*x.shape[:2], oh, ow, dtype=x.dtype)
    for di in range(3):
        for dj in range(3):
            patch = xp[:, :, di : di + 2 * oh - 1 : 2, dj : dj + 2 * ow - 1 : 2]
            out = out + patch * weight[:, 0, di, dj][None, :, None, None]
    return out


def _bn_eval(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (x - bn.running_mean.view(shape)) * scale.view(shape) + bn.bias.view(shape)


def _nearest(g: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Output pixel ``(i, j)`` takes gathered pixel ``(floor(i gh / h), floor(j gw / w))``."""
    gh, gw = g.shape[2:]
    rows = [i * gh // h for i in range(h)]
    cols = [j * gw // w for j in range(w)]
    return g[:, :, rows][:, :, :, cols]


def ge_reference(m: GatherExcite, x: torch.Tensor) -> torch.Tensor:
    """The paper's ``x * sigmoid(up(excite(gather(x))))`` from the module's parameters (eval)."""
    h, w = x.shape[2:]
    if m.gather is None:
        g = x.sum((2, 3), keepdim=True) / (h * w)
    elif isinstance(m.gather, nn.AvgPool2d):
        g = _avg_gather(x, m.extent)
    else:
        layers = dict(m.gather.named_children())
        g = x
        for i in range(1, len([k for k in layers if k.startswith("conv")]) + 1):
            conv = layers[f"conv{i}"]
            if m.extent == 0:  # one depthwise conv as large as the map
                g = (g * conv.weight[:, 0][None]).sum((2, 3), keepdim=True)
            else:
                g = _depthwise3x3_s2(g, conv.weight)
            g = _bn_eval(g, layers[f"norm{i}"])
            if f"act{i}" in layers:
                g = torch.clamp_min(g, 0)
    if m.mlp is not None:
        z = g.permute(0, 2, 3, 1)  # (B, h, w, C): the 1x1 convs are matrix products
        z = torch.clamp_min(z @ m.mlp.fc1.weight[:, :, 0, 0].T + m.mlp.fc1.bias, 0)
        g = (z @ m.mlp.fc2.weight[:, :, 0, 0].T + m.mlp.fc2.bias).permute(0, 3, 1, 2)
    if m.extent > 0:
        g = _nearest(g, h, w)
    return x / (1 + torch.exp(-g))


VARIANTS = [
    ("theta-minus global (official default)", {}),
    ("theta-minus e2", {"extent": 2}),
    ("theta-minus e4", {"extent": 4}),
    ("theta-minus e8", {"extent": 8}),
    ("theta-minus e4 + mlp", {"extent": 4, "use_mlp": True}),
    ("timm default (global + mlp)", {"use_mlp": True}),
    ("theta e2", {"extent": 2, "extra_params": True}),
    ("theta e8", {"extent": 8, "extra_params": True}),
    ("theta-plus e4 (official relu)", {"extent": 4, "extra_params": True, "use_mlp": True}),
    (
        "theta-plus e4 (timm)",
        {"extent": 4, "extra_params": True, "use_mlp": True, "gather_act": False},
    ),
]


@pytest.mark.parametrize(("label", "kwargs"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_matches_reference_forward_and_gradients(label: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    m = randomize_(GatherExcite(16, reduction=4, **kwargs)).double().eval()
    for size in ((7, 10), (1, 3)):
        x = torch.randn(2, 16, *size, dtype=torch.float64)
        assert_matches_reference(m, lambda t: ge_reference(m, t), x)


@pytest.mark.parametrize("use_mlp", [False, True], ids=["GEP theta", "GEPP theta-plus"])
def test_official_global_learned_gather(use_mlp: bool) -> None:
    """RN50-GEP / RN50-GEPP: a depthwise conv as large as the map (conv2_x: 56x56, C = 256)."""
    m = GatherExcite(256, extra_params=True, use_mlp=use_mlp, feat_size=56)
    conv = m.gather.conv1
    assert conv.kernel_size == (56, 56) and conv.groups == 256 and conv.bias is None
    assert hasattr(m.gather, "act1") == use_mlp  # GEPP: gather/bn -> gather/relu -> 1x1_down
    if use_mlp:
        assert m.mlp.fc1.out_channels == 16 and m.mlp.fc1.bias is not None  # excite/1x1_down
    expected = 256 * 56 * 56 + 2 * 256 + ((2 * 256 * 16 + 16 + 256) if use_mlp else 0)
    assert sum(p.numel() for p in m.parameters()) == expected
    small = randomize_(GatherExcite(8, extra_params=True, use_mlp=use_mlp, feat_size=(3, 5)))
    small = small.double().eval()
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(small(x), ge_reference(small, x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"GatherExcite.*feat_size=\(3, 5\).*\(4, 5\)"):
        small(torch.randn(2, 8, 4, 5, dtype=torch.float64))


def test_theta_minus_global_is_parameter_free_sigmoid_of_the_mean() -> None:
    m = GatherExcite(8)
    assert not list(m.parameters())
    x = torch.randn(2, 8, 5, 3)
    torch.testing.assert_close(m(x), x * torch.sigmoid(x.mean((2, 3), keepdim=True)))


# ---------------------------------------------------------------------------------------------
# timm parity
def _timm_ge(channels: int, extent: int, extra_params: bool, use_mlp: bool, rd_ratio: float):
    """timm's ``GatherExcite``; where its constructor fails (timm 1.0.31 passes ``*dd``, the
    dict's keys, positionally to ``ConvMlp`` and ``create_conv2d``), timm's own instance with
    the ``gather``/``mlp`` built as that constructor intends; the forward is timm's."""
    from timm.layers import ConvMlp, create_conv2d
    from timm.layers import GatherExcite as TimmGE

    try:
        return TimmGE(
            channels, extent=extent, extra_params=extra_params, use_mlp=use_mlp, rd_ratio=rd_ratio
        )
    except TypeError:
        pass
    t = TimmGE(channels, extent=extent, use_mlp=False)  # the working path: no parameters
    if extra_params:
        t.gather = nn.Sequential()
        n = int(math.log2(extent))
        for i in range(n):
            t.gather.add_module(
                f"conv{i + 1}",
                create_conv2d(channels, channels, kernel_size=3, stride=2, depthwise=True),
            )
            t.gather.add_module(f"norm{i + 1}", nn.BatchNorm2d(channels))
            if i != n - 1:
                t.gather.add_module(f"act{i + 1}", nn.ReLU(inplace=True))
    if use_mlp:
        from timm.layers.helpers import make_divisible

        t.mlp = ConvMlp(channels, make_divisible(channels * rd_ratio, 1, round_limit=0.0))
    return t


TIMM_CONFIGS = [
    (0, False, False),
    (2, False, False),
    (8, False, False),
    (0, False, True),
    (4, False, True),
    (4, True, False),
    (8, True, True),
]


@pytest.mark.parametrize(("extent", "extra_params", "use_mlp"), TIMM_CONFIGS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_timm_parity(extent: int, extra_params: bool, use_mlp: bool, train: bool) -> None:
    pytest.importorskip("timm")
    ours = randomize_(
        GatherExcite(
            40,
            extent=extent,
            extra_params=extra_params,
            use_mlp=use_mlp,
            reduction=8,
            gather_act=False,
        )
    )
    theirs = _timm_ge(40, extent, extra_params, use_mlp, 1 / 8)
    theirs.load_state_dict(ours.state_dict())  # same names, strict
    ours.train(train), theirs.train(train)
    x = torch.randn(3, 40, 11, 6)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)


def test_official_relu_differs_from_timm_in_theta_plus() -> None:
    """The official GE-theta-plus applies ReLU to the gathered map before the MLP; timm does not.
    Same weights, different outputs (negative gathered values are clipped in one only)."""
    official = randomize_(GatherExcite(16, extent=4, extra_params=True, use_mlp=True)).eval()
    timm_like = GatherExcite(16, extent=4, extra_params=True, use_mlp=True, gather_act=False)
    timm_like.load_state_dict(official.state_dict())
    x = torch.randn(2, 16, 8, 8)
    assert not torch.allclose(official(x), timm_like.eval()(x))


# ---------------------------------------------------------------------------------------------
# parameter counts and widths
@pytest.mark.parametrize("channels", [1, 8, 24, 64, 256])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"use_mlp": True},
        {"extent": 2, "extra_params": True},
        {"extent": 8, "extra_params": True, "use_mlp": True, "reduction": 4},
        {"extra_params": True, "feat_size": (7, 5), "use_mlp": True},
    ],
)
def test_param_count_closed_form(channels: int, kwargs: dict) -> None:
    m = GatherExcite(channels, **kwargs)
    assert ge_param_count(channels, **kwargs) == sum(p.numel() for p in m.parameters())


def test_hidden_width_rounds_like_timm() -> None:
    assert [ge_hidden_channels(c) for c in (1, 8, 24, 64, 256, 2048)] == [1, 1, 2, 4, 16, 128]


def test_presets() -> None:
    meta = attnzoo.info("ge")
    assert set(meta.presets) == {"official", "theta-minus-e8", "theta-plus-e2"}
    m = attnzoo.create("ge", 64, preset="theta-plus-e2")
    assert [n for n, _ in m.gather.named_children()] == ["conv1", "norm1", "act1"]
    assert meta.count_params(64, **meta.presets["theta-plus-e2"]) == 11 * 64 + 2 * 64 * 4 + 68
    assert isinstance(attnzoo.create("ge", 64, preset="theta-minus-e8").gather, nn.AvgPool2d)


# ---------------------------------------------------------------------------------------------
# attention maps and errors
def test_attention_maps() -> None:
    x = torch.randn(2, 8, 6, 5)
    glob = GatherExcite(8).attention_maps(x)
    assert set(glob) == {"channel"} and glob["channel"].shape == (2, 8)
    local = GatherExcite(8, extent=2)
    maps = local.attention_maps(x, query=(1, 1))
    assert maps["gate"].shape == (2, 8, 6, 5) and maps["spatial"].shape == (2, 6, 5)
    torch.testing.assert_close(maps["gate"] * x, local(x))
    torch.testing.assert_close(maps["channel"], maps["gate"].mean((2, 3)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"extent": 3}, "extent must be 0 .global. or a power of two"),
        ({"extent": 1}, "extent"),
        ({"extent": -2}, "extent"),
        ({"extra_params": True}, "feat_size"),
        ({"extent": 4, "feat_size": 7}, "feat_size is only used"),
        ({"extra_params": True, "feat_size": (7, 0)}, "feat_size must be"),
        ({"reduction": 0}, "reduction"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=rf"GatherExcite.*{match}"):
        GatherExcite(64, **kwargs)
    with pytest.raises(ValueError, match="GatherExcite"):
        ge_param_count(64, **kwargs)


def test_non_bool_flags_are_type_errors() -> None:
    with pytest.raises(TypeError, match="GatherExcite: use_mlp must be True or False"):
        GatherExcite(64, use_mlp=1)
