"""attnzoo.viz.attention_maps / upsample_map: shapes for every registered module, values against
the modules' own public computations, no side effects on the model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnzoo
from attnzoo.detection import YoloV4Tiny
from attnzoo.models import cifar_resnet8
from attnzoo.modules import danet as danet_mod
from attnzoo.modules import nonlocal_ as nonlocal_mod
from attnzoo.ops import query as query_mod
from attnzoo.viz import AttentionRecord, attention_maps, upsample_map
from conftest import randomize_

torch.set_num_threads(2)


def half(n: int) -> int:
    return math.ceil(n / 2)


def expected_shapes(
    name: str, module: nn.Module, x_shape: tuple[int, ...]
) -> dict[str, tuple] | None:
    """The documented map shapes (the modules' ``attention_maps`` docstrings) for one input
    shape; ``None`` for modules documented only in their own tests."""
    b, c, *s = x_shape
    if name in ("se", "eca", "cbam_channel"):
        return {"channel": (b, c)}
    if name == "cbam_spatial":
        return {"spatial": (b, *s)}
    if name == "cbam":
        return {"channel": (b, c), "spatial": (b, *s)}
    if name == "ca":
        return {"spatial": (b, *s), "a_h": (b, c, s[0]), "a_w": (b, c, s[1])}
    if name == "gc":
        out = {"spatial": (b, *s)} if module.pooling == "att" else {}
        out.update({f: (b, c) for f in module.fusion})
        return out
    if name == "ema":
        return {"spatial": (b, *s), "groups": (b, module.factor, *s)}
    if name == "sk":
        return {"branch": (b, module.num_branches, module.out_channels)}
    if name == "cam":
        return {"channel_affinity": (b, c, c), "channel": (b, c)}
    if name in ("pam", "dual_attention"):
        extra = {"channel_affinity": (b, c, c), "channel": (b, c)} if name != "pam" else {}
        return {"spatial": (b, *s), **extra}
    if name == "sagan":
        keys = s if module.variant == "pytorch" else [half(v) for v in s]
        return {"spatial": (b, *keys)}
    if name.startswith("nonlocal"):
        if not module.sub_sample:
            return {"spatial": (b, *s)}
        keys = [half(v) for v in s]
        if name == "nonlocal3d":
            keys[0] = s[0]  # time is not pooled
        return {"spatial": (b, *keys)}
    return None


SPATIAL = {1: (11,), 2: (6, 9), 3: (3, 6, 9)}


def build(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    module = attnzoo.create(name, attnzoo.info(name).example_channels, **kwargs)
    return randomize_(module, seed).eval()


def standalone_input(name: str, batch: int = 2, dtype=torch.float32) -> torch.Tensor:
    meta = attnzoo.info(name)
    gen = torch.Generator().manual_seed(1)
    return torch.randn(
        (batch, meta.example_channels, *SPATIAL[meta.spatial_dims]), generator=gen, dtype=dtype
    )


def test_every_registered_module_has_attention_maps():
    missing = [
        n
        for n in attnzoo.available()
        if not callable(getattr(attnzoo.get(n), "attention_maps", None))
    ]
    assert not missing, f"document and implement attention_maps of {sorted(missing)}"


@pytest.mark.parametrize("name", attnzoo.available())
def test_standalone_in_sequential_shapes(name):
    module = build(name)
    model = nn.Sequential(nn.Identity(), module).eval()
    x = standalone_input(name)
    records = attention_maps(model, x)
    assert list(records) == ["1"]
    rec = records["1"]
    assert isinstance(rec, AttentionRecord)
    assert (rec.name, rec.cls, rec.module_path, rec.wrapped) == (name, type(module), "1", False)
    assert rec.input_shape == tuple(x.shape) and rec.calls == 1
    got = {k: tuple(v.shape) for k, v in rec.maps.items()}
    with torch.no_grad():
        own = module.attention_maps(x)
    assert got == (
        expected_shapes(name, module, tuple(x.shape)) or {k: tuple(v.shape) for k, v in own.items()}
    )
    assert_maps_equal(rec.maps, own, atol=0)
    for v in rec.maps.values():
        assert v.device.type == "cpu" and not v.requires_grad and torch.isfinite(v).all()


@pytest.mark.parametrize("name", attnzoo.available())
def test_module_as_the_model_itself_has_key_empty(name):
    module = build(name)
    records = attention_maps(module, standalone_input(name))
    assert list(records) == [""] and records[""].name == name


# ---------------------------------------------------------------------------------------------
# values against the modules' public computations (float64, exact up to rounding)
def reference_maps(name: str, m: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    if name in ("se", "eca", "cbam_channel"):
        return {"channel": m.attention_map(x).flatten(1)}
    if name == "cbam_spatial":
        return {"spatial": m.attention_map(x)[:, 0]}
    if name == "cbam":  # attention_map: the spatial gate of the channel-gated input m.channel(x)
        return {
            "channel": m.channel.attention_map(x).flatten(1),
            "spatial": m.attention_map(x)[:, 0],
        }
    if name == "ca":
        a_h, a_w = m.gates(x)
        return {"spatial": m.attention_map(x).mean(1), "a_h": a_h[..., 0], "a_w": a_w[:, :, 0]}
    if name == "gc":
        ctx = m.context(x)
        out = {"spatial": m.attention_map(x)[:, 0]}
        if m.channel_add_conv is not None:
            out["channel_add"] = m.channel_add_conv(ctx).flatten(1)
        if m.channel_mul_conv is not None:
            out["channel_mul"] = torch.sigmoid(m.channel_mul_conv(ctx)).flatten(1)
        return out
    if name == "ema":
        w = m.attention_map(x)
        return {"spatial": w.mean(1), "groups": w}
    if name == "sk":
        return {"branch": m.attention_map(x)[:, :, :, 0, 0]}
    if name == "cam":
        a = m.attention_map(x)
        return {"channel_affinity": a, "channel": a.mean(1)}
    keys = expected_shapes(name, m, tuple(x.shape))["spatial"]
    if name == "dual_attention":
        a = m.cam.attention_map(x)
        return {
            "spatial": m.attention_map(x).mean(1).view(keys),
            "channel_affinity": a,
            "channel": a.mean(1),
        }
    return {"spatial": m.attention_map(x).mean(1).view(keys)}  # pixel-pair, query="mean"


def assert_maps_equal(got: dict, want: dict, atol: float = 1e-12) -> None:
    assert set(got) == set(want)
    for k, value in want.items():
        assert got[k].dtype == value.dtype, k
        torch.testing.assert_close(got[k], value, rtol=0, atol=atol, msg=k)


# modules whose maps this file documents; the others are checked against their own
# ``attention_maps`` above and in their own test files
DOCUMENTED = [
    *("se", "eca", "cbam_channel", "cbam_spatial", "cbam", "ca", "gc", "ema", "sk", "cam"),
    *("pam", "dual_attention", "sagan", "nonlocal1d", "nonlocal2d", "nonlocal3d"),
]


@pytest.mark.parametrize("name", DOCUMENTED)
def test_values_match_the_module_standalone(name):
    module = build(name).double()
    x = standalone_input(name, dtype=torch.float64)
    got = attention_maps(nn.Sequential(nn.Identity(), module), x)["1"].maps
    with torch.no_grad():
        assert_maps_equal(got, reference_maps(name, module, x))


@pytest.mark.parametrize(
    "kwargs, ref",
    [
        (
            {"order": "spatial-channel"},
            lambda m, x: (m.channel.attention_map(m.spatial(x)), m.spatial.attention_map(x)),
        ),
        (
            {"order": "parallel"},
            lambda m, x: (m.channel.attention_map(x), m.spatial.attention_map(x)),
        ),
    ],
)
def test_cbam_orders(kwargs, ref):
    m = build("cbam", **kwargs).double()
    x = standalone_input("cbam", dtype=torch.float64)
    got = attention_maps(m, x)[""].maps
    with torch.no_grad():
        mc, ms = ref(m, x)
    assert_maps_equal(got, {"channel": mc.flatten(1), "spatial": ms[:, 0]})


@pytest.mark.parametrize(
    "name, kwargs, rebuild",
    [
        ("se", {}, lambda r, x: x * r["channel"][..., None, None]),
        ("eca", {}, lambda r, x: x * r["channel"][..., None, None]),
        ("cbam", {}, lambda r, x: x * r["channel"][..., None, None] * r["spatial"][:, None]),
        ("cbam_spatial", {}, lambda r, x: x * r["spatial"][:, None]),
        ("ca", {}, lambda r, x: x * r["a_h"][..., None] * r["a_w"][:, :, None]),
        (
            "gc",
            {"fusion": ("channel_add", "channel_mul")},
            lambda r, x: x * r["channel_mul"][..., None, None] + r["channel_add"][..., None, None],
        ),
        ("ema", {}, lambda r, x: x * r["groups"].repeat_interleave(x.shape[1] // 32, 1)),
    ],
)
def test_recorded_gates_reproduce_the_forward(name, kwargs, rebuild):
    # Independent of how the maps were computed: the gates must be what forward applies.
    m = build(name, **kwargs).double()
    x = standalone_input(name, dtype=torch.float64)
    rec = attention_maps(m, x)[""].maps
    with torch.no_grad():
        torch.testing.assert_close(rebuild(rec, x), m(x), rtol=1e-12, atol=1e-12)


def test_gc_avg_pooling_has_no_spatial_map():
    m = build("gc", pooling="avg")
    rec = attention_maps(m, standalone_input("gc"))[""].maps
    assert set(rec) == {"channel_add"}


# ---------------------------------------------------------------------------------------------
# pixel-pair queries
PIXEL = [
    ("nonlocal2d", {}),
    ("nonlocal2d", {"mode": "gaussian"}),
    ("nonlocal2d", {"mode": "dot_product"}),
    ("nonlocal2d", {"mode": "concatenation"}),
    ("nonlocal2d", {"sub_sample": False, "use_scale": True}),
    ("nonlocal1d", {}),
    ("nonlocal3d", {"mode": "concatenation"}),
    ("sagan", {}),
    ("sagan", {"variant": "tf"}),
    ("pam", {}),
    ("dual_attention", {}),
]


@pytest.mark.parametrize("name, kwargs", PIXEL)
@pytest.mark.parametrize("query", ["mean", "point", "fraction"])
def test_pixel_pair_rows_match_attention_map(name, kwargs, query):
    m = build(name, **kwargs).double()
    x = standalone_input(name, dtype=torch.float64)
    grid = tuple(x.shape[2:])
    with torch.no_grad():
        full = m.attention_map(x)  # (B, N, M)
    keys = expected_shapes(name, m, tuple(x.shape))["spatial"]
    if query == "mean":
        q, want, point = "mean", full.mean(1), "mean"
    else:
        point = tuple(s - 2 for s in grid)  # an interior point, not the first row
        q = point if query == "point" else tuple((p + 0.5) / s for p, s in zip(point, grid))
        flat = 0
        for p, s in zip(point, grid):
            flat = flat * s + p
        want = full[:, flat]
    rec = attention_maps(m, x, query=q)[""]
    assert rec.query == point
    torch.testing.assert_close(rec.maps["spatial"], want.view(keys), rtol=0, atol=1e-12)


def test_mean_is_chunked_and_still_exact(monkeypatch):
    m = build("nonlocal2d", sub_sample=False).double()
    x = torch.randn(2, 64, 9, 10, dtype=torch.float64)
    with torch.no_grad():
        want = m.attention_map(x).mean(1).view(2, 9, 10)
    calls = []
    real = nonlocal_mod.softmax_affinity

    def spy(q, k, scale=1.0):
        calls.append(q.shape[1])
        return real(q, k, scale=scale)

    monkeypatch.setattr(query_mod, "QUERY_CHUNK_VALUES", 2 * 90 * 7)  # 7 query rows per chunk
    monkeypatch.setattr(nonlocal_mod, "softmax_affinity", spy)  # what affinity_rows calls
    got = attention_maps(m, x)[""].maps["spatial"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert max(calls) == 7 and sum(calls) == 90  # never more than 7 rows at once


def test_point_query_computes_one_row_only(monkeypatch):
    m = build("pam")
    x = torch.randn(1, 64, 12, 12)
    shapes = []
    real = danet_mod.softmax_affinity
    monkeypatch.setattr(
        danet_mod,
        "softmax_affinity",
        lambda q, k, scale=1.0: shapes.append(tuple(q.shape)) or real(q, k, scale=scale),
    )
    attention_maps(m, x, query=(3, 4))
    assert shapes == [(1, 1, 8)]


@pytest.mark.parametrize(
    "query, error",
    [
        ((6, 0), ValueError),
        ((0, 9), ValueError),
        ((1, 2, 3), ValueError),
        ("max", ValueError),
        ((1.5, 0.2), ValueError),
        ((1, 0.5), TypeError),
        ((True, 1), TypeError),
        ((), TypeError),
    ],
)
def test_bad_queries(query, error):
    model = nn.Sequential(nn.Identity(), build("sagan"))
    with pytest.raises(error, match="query"):
        attention_maps(model, standalone_input("sagan"), query=query)
    assert_no_hooks(model)


def test_fraction_one_maps_to_the_last_index():
    m = build("pam")
    rec = attention_maps(m, standalone_input("pam"), query=(1.0, 1.0))[""]
    assert rec.query == (5, 8)


# ---------------------------------------------------------------------------------------------
# networks: attach(), IdentityInit, YOLOv4-tiny
def assert_no_hooks(model: nn.Module) -> None:
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name
        assert not m._backward_hooks, name


TWO_D = [n for n in attnzoo.available() if attnzoo.info(n).spatial_dims == 2]


def capture_inputs(model: nn.Module, paths: list[str]) -> tuple[dict, list]:
    got, handles = {}, []
    for p in paths:
        handles.append(
            model.get_submodule(p).register_forward_pre_hook(
                lambda mod, args, p=p: got.setdefault(p, args[0].clone())
            )
        )
    return got, handles


#: keywords that make a module valid at cifar_resnet8's widths 16, 32, 64 (Shuffle Attention's
#: default 64 groups need a multiple of 128 channels)
SMALL_WIDTH_KWARGS = {"sa": {"groups": 8}}


@pytest.mark.parametrize("name", TWO_D)
def test_attached_into_cifar_resnet8(name):
    torch.manual_seed(0)
    model = randomize_(cifar_resnet8(name, **SMALL_WIDTH_KWARGS.get(name, {}))).eval()
    attached = attnzoo.attached(model)
    x = torch.randn(2, 3, 32, 32)
    inputs, handles = capture_inputs(model, [a.path for a in attached])
    records = attention_maps(model, x)
    for h in handles:
        h.remove()
    assert list(records) == [a.path for a in attached]
    for a in attached:
        rec = records[a.path]
        m = model.get_submodule(a.path)
        assert rec.name == name and not rec.wrapped and rec.input_shape == inputs[a.path].shape
        with torch.no_grad():
            if name in DOCUMENTED:
                want = reference_maps(name, m, inputs[a.path])
            else:
                want = m.attention_maps(inputs[a.path])
        assert_maps_equal(rec.maps, want, atol=1e-6)


def test_identity_init_wrapper_is_keyed_by_the_slot():
    torch.manual_seed(0)
    model = cifar_resnet8("cbam", identity_init=True).eval()
    attached = attnzoo.attached(model)
    assert all(a.identity_init for a in attached)
    records = attention_maps(model, torch.randn(1, 3, 32, 32))
    assert list(records) == [a.path for a in attached]  # "layer1.0.attention", ...
    for a in attached:
        rec = records[a.path]
        assert rec.wrapped and rec.module_path == a.path + ".attn" and rec.name == "cbam"
        assert isinstance(model.get_submodule(a.path), attnzoo.models.IdentityInit)


def test_yolov4_tiny_cbam():
    torch.manual_seed(0)
    model = YoloV4Tiny(3, attention="cbam").eval()
    records = attention_maps(model, torch.randn(1, 3, 64, 64))
    assert list(records) == ["feat1_att", "feat2_att", "upsample_att"]
    shapes = {k: {n: tuple(t.shape) for n, t in r.maps.items()} for k, r in records.items()}
    assert shapes == {
        "feat1_att": {"channel": (1, 256), "spatial": (1, 4, 4)},
        "feat2_att": {"channel": (1, 512), "spatial": (1, 2, 2)},
        "upsample_att": {"channel": (1, 128), "spatial": (1, 4, 4)},
    }


def test_nested_registered_modules_reported_once():
    model = nn.Sequential(build("cbam"), build("dual_attention"))
    records = attention_maps(model, standalone_input("cbam"))
    assert list(records) == ["0", "1"]  # not 0.channel, 0.spatial, 1.pam, 1.cam
    assert records["1"].name == "dual_attention"


class UserAttention(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gate = nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(x.mean((2, 3), keepdim=True))

    def attention_map(self, x):
        return self.gate(x.mean((2, 3), keepdim=True))


class SESubclass(attnzoo.get("se")):
    pass


def test_unregistered_classes_skipped_subclasses_of_registered_kept():
    torch.manual_seed(0)
    model = nn.Sequential(UserAttention(64), SESubclass(64), build("eca")).eval()
    records = attention_maps(model, torch.randn(2, 64, 5, 5))
    assert list(records) == ["1", "2"]
    assert records["1"].name == "se" and records["1"].cls is SESubclass


def test_registered_class_without_attention_maps_falls_back_to_attention_map(monkeypatch):
    monkeypatch.delattr(attnzoo.get("se"), "attention_maps")
    m = build("se")
    x = standalone_input("se")
    rec = attention_maps(m, x)[""]
    with torch.no_grad():
        torch.testing.assert_close(rec.maps["attention_map"], m.attention_map(x))
    assert set(rec.maps) == {"attention_map"}


def test_attention_maps_returning_no_dict_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(attnzoo.get("se"), "attention_maps", lambda self, x, query="mean": x)
    model = nn.Sequential(build("se"))
    with pytest.raises(TypeError, match="SqueezeExcitation.attention_maps must return a dict"):
        attention_maps(model, standalone_input("se"))
    assert_no_hooks(model)


def test_shared_module_recorded_once_with_call_count():
    se = build("se")
    model = nn.Sequential(se, nn.ReLU(), se)
    rec = attention_maps(model, standalone_input("se"))
    assert list(rec) == ["0"] and rec["0"].calls == 2


def test_modules_that_do_not_run_are_absent():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = build("se"), build("eca")

        def forward(self, x):
            return self.used(x)

    assert list(attention_maps(Skip(), standalone_input("se"))) == ["used"]


# ---------------------------------------------------------------------------------------------
# no side effects
def test_outputs_unchanged_hooks_removed_mode_kept():
    torch.manual_seed(0)
    model = randomize_(cifar_resnet8("ca")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    seen = []
    probe = model.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    attention_maps(model, x)
    probe.remove()
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], before, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert_no_hooks(model)
    assert not any(m.training for m in model.modules())


def test_train_mode_kept_and_buffers_restored():
    torch.manual_seed(0)
    model = cifar_resnet8("ca").train()  # CA has a BatchNorm; the ResNet too
    state = {k: v.clone() for k, v in model.state_dict().items()}
    records = attention_maps(model, torch.randn(4, 3, 32, 32))
    assert len(records) == 3
    assert all(m.training for m in model.modules())
    after = model.state_dict()
    for k, v in state.items():
        assert torch.equal(after[k], v), k
    assert_no_hooks(model)


def test_hooks_removed_when_the_forward_fails():
    model = nn.Sequential(build("se"), build("eca"))
    with pytest.raises(ValueError):
        attention_maps(model, torch.randn(2, 63, 4, 4))  # wrong channel count
    assert_no_hooks(model)


def test_existing_user_hooks_survive():
    model = nn.Sequential(build("se"))
    handle = model[0].register_forward_hook(lambda *a: None)
    attention_maps(model, standalone_input("se"))
    assert list(model[0]._forward_hooks) == [handle.id]
    assert not model[0]._forward_pre_hooks


# ---------------------------------------------------------------------------------------------
# upsample_map
def test_upsample_hot_cell_lands_in_its_image_cell():
    m = torch.zeros(1, 8, 8)
    m[0, 2, 5] = 1.0
    up = upsample_map(m, (32, 32))
    assert up.shape == (1, 32, 32)
    idx = int(up[0].argmax())
    y, x = divmod(idx, 32)
    assert 8 <= y < 12 and 20 <= x < 24
    # half-pixel geometry: symmetric around the cell centre (9.5, 21.5)
    torch.testing.assert_close(up[0, 9, 21], up[0, 10, 22])
    torch.testing.assert_close(
        up, F.interpolate(m[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    )


def test_upsample_non_square_and_int():
    m = torch.arange(6).view(1, 2, 3)
    up = upsample_map(m, (4, 6))
    assert up.dtype == torch.float32 and up.shape == (1, 4, 6)
    assert upsample_map(up, (4, 6)) is up
    assert upsample_map(torch.ones(2, 3, 3, dtype=torch.float64), 9).dtype == torch.float64


@pytest.mark.parametrize(
    "maps, size",
    [
        (torch.zeros(3, 3), (4, 4)),
        (torch.zeros(1, 3, 3), (0, 4)),
        (torch.zeros(1, 3, 3), (4, 4, 4)),
    ],
)
def test_upsample_errors(maps, size):
    with pytest.raises(ValueError, match="upsample_map"):
        upsample_map(maps, size)
