"""attach / detach / attached / identity_init / load_pretrained on torchvision and timm networks.

The reference forwards below are written out by hand from the blocks' definitions (torchvision
0.29 ``BasicBlock``/``Bottleneck``/``InvertedResidual``, timm 1.0 ``BasicBlock``/``Bottleneck``),
independently of the slot forwards in ``attnzoo.models.attach``.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v2, resnet18, resnet50

import attnzoo
from attnzoo.models import IdentityInit, attach, attached, detach, load_pretrained

timm = pytest.importorskip("timm")

torch.set_num_threads(2)


class Affine(nn.Module):
    """Test attention: ``x * (1 + w_c) + b_c`` with random per-channel w, b (a visible change)."""

    def __init__(self, channels: int, *, scale: float = 1.0) -> None:
        super().__init__()
        self.channels = channels
        self.w = nn.Parameter(torch.randn(channels) * scale)
        self.b = nn.Parameter(torch.randn(channels) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.channels, (x.shape, self.channels)
        return x * (1 + self.w.view(1, -1, 1, 1)) + self.b.view(1, -1, 1, 1)


def _snapshot(model: nn.Module) -> dict:
    return {
        "repr": repr(model),
        "types": {n: type(m) for n, m in model.named_modules()},
        "dicts": {n: sorted(vars(m)) for n, m in model.named_modules()},
        "keys": list(model.state_dict()),
        "ptrs": {k: v.data_ptr() for k, v in model.state_dict().items()},
    }


MODEL_NAMES = ["tv_basic", "tv_bottleneck", "tv_mobilenet_v2", "timm_basic", "timm_bottleneck_d"]


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    from timm.layers import BlurPool2d
    from timm.models import resnet as timm_resnet
    from torchvision.models import resnet as tv_resnet

    # small networks with the real blocks (first stage has 2 blocks: with and without downsample)
    builders = {
        "tv_resnet18": resnet18,
        "tv_resnet50": resnet50,
        "tv_basic": lambda: tv_resnet.ResNet(tv_resnet.BasicBlock, [2, 1, 1, 1]),
        "tv_bottleneck": lambda: tv_resnet.ResNet(
            tv_resnet.Bottleneck, [2, 1, 1, 1], groups=2, width_per_group=32
        ),
        "tv_mobilenet_v2": mobilenet_v2,
        # timm: anti-aliasing (BlurPool2d), drop-path, deep stem, avg-down, timm's own SE
        "timm_basic": lambda: timm_resnet.ResNet(
            timm_resnet.BasicBlock, [2, 1, 1, 1], aa_layer=BlurPool2d
        ),
        "timm_bottleneck_d": lambda: timm_resnet.ResNet(
            timm_resnet.Bottleneck,
            [2, 1, 1, 1],
            stem_type="deep",
            avg_down=True,
            drop_path_rate=0.2,
            block_args=dict(attn_layer="se"),
            aa_layer=BlurPool2d,
        ),
        "timm_resnet50d": lambda: timm.create_model("resnet50d", pretrained=False),
    }
    return builders[name]().eval()


X = torch.randn(2, 3, 32, 32)


# ---------------------------------------------------------------------------------------------
# keys, weights, detach
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_keys_kept_weights_untouched_and_detach_restores(name: str) -> None:
    model = _build(name)
    before = _snapshot(model)
    with torch.no_grad():
        y0 = model(X)
    attach(model, Affine)
    inserted = attached(model)
    assert inserted, "nothing attached"
    after_keys = list(model.state_dict())
    # every original key is still there, in the same order, pointing at the same tensor
    assert [k for k in after_keys if k in set(before["keys"])] == before["keys"]
    new = set(after_keys) - set(before["keys"])
    prefixes = tuple(a.path + "." for a in inserted)
    assert new and all(k.startswith(prefixes) for k in new)
    assert {
        k: v.data_ptr() for k, v in model.state_dict().items() if k in before["ptrs"]
    } == before["ptrs"]
    with torch.no_grad():
        assert not torch.allclose(model(X), y0)
    detach(model)
    assert _snapshot(model) == before
    assert attached(model) == []
    with torch.no_grad():
        assert torch.equal(model(X), y0)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(
    "position",
    [
        "before_add",
        "after_conv3x3",
        "after_conv3x3_pre_bn",
        "after_dwconv",
        "after_block",
        "after_stage",
    ],
)
def test_identity_attention_keeps_the_function(name: str, position: str) -> None:
    """With nn.Identity inserted, the slot forward equals the block's own forward exactly."""
    model = _build(name)
    is_mbv2 = "mobilenet" in name
    if (position.startswith("after_conv3x3") and is_mbv2) or (
        position == "after_dwconv" and not is_mbv2
    ):
        with pytest.raises(ValueError, match="not available"):
            attach(model, lambda c: nn.Identity(), position=position)
        assert attached(model) == []
        return
    original = copy.deepcopy(model)
    attach(model, lambda c: nn.Identity(), position=position)
    with torch.no_grad():
        assert torch.equal(model(X), original(X))
    model.train()
    original.train()
    torch.manual_seed(1)
    y_train = original(X)
    torch.manual_seed(1)
    assert torch.equal(model(X), y_train)


# ---------------------------------------------------------------------------------------------
# the positions compute what the docs say: hand-written block forwards
def _tv_bottleneck_ref(b: nn.Module, x: torch.Tensor, a: dict[str, nn.Module]) -> torch.Tensor:
    f = lambda key, t: a[key](t) if key in a else t  # noqa: E731
    out = torch.relu(b.bn1(b.conv1(x)))
    out = f("after_conv3x3", torch.relu(b.bn2(f("after_conv3x3_pre_bn", b.conv2(out)))))
    out = f("before_add", b.bn3(b.conv3(out)))
    idt = x if b.downsample is None else b.downsample(x)
    return f("after_block", torch.relu(out + idt))


def _tv_basic_ref(b: nn.Module, x: torch.Tensor, a: dict[str, nn.Module]) -> torch.Tensor:
    f = lambda key, t: a[key](t) if key in a else t  # noqa: E731
    out = f("after_conv3x3", torch.relu(b.bn1(b.conv1(x))))
    out = f("before_add", b.bn2(f("after_conv3x3_pre_bn", b.conv2(out))))
    idt = x if b.downsample is None else b.downsample(x)
    return f("after_block", torch.relu(out + idt))


def _timm_bottleneck_ref(b: nn.Module, x: torch.Tensor, a: dict[str, nn.Module]) -> torch.Tensor:
    """timm 1.0 Bottleneck in eval mode (drop_block/drop_path inactive)."""
    f = lambda key, t: a[key](t) if key in a else t  # noqa: E731
    h = b.act1(b.bn1(b.conv1(x)))
    h = f("after_conv3x3", b.aa(b.act2(b.bn2(f("after_conv3x3_pre_bn", b.conv2(h))))))
    h = b.bn3(b.conv3(h))
    h = f("before_add", b.se(h) if b.se is not None else h)
    sc = x if b.downsample is None else b.downsample(x)
    return f("after_block", b.act3(h + sc))


def _tv_inverted_ref(b: nn.Module, x: torch.Tensor, a: dict[str, nn.Module]) -> torch.Tensor:
    f = lambda key, t: a[key](t) if key in a else t  # noqa: E731
    layers = list(b.conv)
    h = x
    for layer in layers[:-3]:
        h = layer(h)
    h = f("after_dwconv", layers[-3](h))
    h = f("before_add", layers[-1](layers[-2](h)))
    if b.use_res_connect:
        h = x + h
    return f("after_block", h)


RESNET_POSITIONS = ["before_add", "after_conv3x3", "after_conv3x3_pre_bn", "after_block"]


@pytest.mark.parametrize(
    ("name", "path", "ref", "positions"),
    [
        (
            "tv_bottleneck",
            "layer2.0",
            _tv_bottleneck_ref,
            ["before_add", "after_conv3x3", "after_conv3x3_pre_bn", "after_block"],
        ),
        (
            "timm_bottleneck_d",
            "layer2.0",
            _timm_bottleneck_ref,
            ["before_add", "after_conv3x3", "after_conv3x3_pre_bn", "after_block"],
        ),
        ("tv_basic", "layer1.1", _tv_basic_ref, RESNET_POSITIONS),
        ("tv_resnet18", "layer3.0", _tv_basic_ref, RESNET_POSITIONS),
        (
            "tv_mobilenet_v2",
            "features.4",
            _tv_inverted_ref,
            ["after_dwconv", "before_add", "after_block"],
        ),
        ("tv_mobilenet_v2", "features.3", _tv_inverted_ref, ["after_dwconv", "before_add"]),
        ("tv_mobilenet_v2", "features.1", _tv_inverted_ref, ["after_dwconv"]),
    ],
)
def test_positions_match_hand_written_block(name, path, ref, positions) -> None:
    model = _build(name)
    block = model.get_submodule(path)
    x = torch.randn(
        2,
        block.conv1.in_channels if hasattr(block, "conv1") else block.conv[0][0].in_channels,
        16,
        16,
    )
    for pos in positions:
        attach(model, Affine, position=pos)
    mods = {
        a.position: model.get_submodule(a.path)
        for a in attached(model)
        if a.path.startswith(path + ".")
    }
    assert sorted(mods) == sorted(positions)
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref(block, x, mods), rtol=0, atol=0)


def test_attached_listing_channels_stages_every_select() -> None:
    model = _build("tv_resnet50")
    attach(model, Affine)
    rows = attached(model)
    assert [r.channels for r in rows] == [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
    assert rows[0].path == "layer1.0.attention" and rows[0].cls == "Affine"
    assert rows[0].params == 512 and rows[0].position == "before_add"
    detach(model)
    attach(model, Affine, position="after_conv3x3", stages=(2, 4))
    assert [(r.path, r.channels) for r in attached(model)] == (
        [(f"layer2.{i}.attention_conv3x3", 128) for i in range(4)]
        + [(f"layer4.{i}.attention_conv3x3", 512) for i in range(3)]
    )
    detach(model)
    # non-local placement: after every other block of res3 and res4 -> 2 + 3 = 5 blocks
    attach(model, Affine, position="after_block", stages=(2, 3), every=2)
    assert [r.path for r in attached(model)] == [
        "layer2.1.attention_out",
        "layer2.3.attention_out",
        "layer3.1.attention_out",
        "layer3.3.attention_out",
        "layer3.5.attention_out",
    ]
    # BAM placement can be added on top (another slot of the same blocks)
    attach(model, Affine, position="after_stage", stages=(1, 4))
    assert [r.path for r in attached(model)][:1] == ["layer1.2.attention_out"]
    assert len(attached(model)) == 7
    with pytest.raises(ValueError, match="already has 'attention_out'"):
        attach(model, Affine, position="after_stage", stages=(2,))
    detach(model)
    attach(model, Affine, select=lambda path, c: c >= 1024)
    assert len(attached(model)) == 9


def test_mobilenet_stages_and_dw_channels() -> None:
    model = _build("tv_mobilenet_v2")
    attach(model, Affine)
    rows = attached(model)
    assert [r.channels for r in rows] == [
        32,
        96,
        144,
        144,
        192,
        192,
        192,
        384,
        384,
        384,
        384,
        576,
        576,
        576,
        960,
        960,
        960,
    ]
    assert rows[1].path == "features.2.attention_dw"
    detach(model)
    attach(model, Affine, position="after_stage")
    assert [r.path for r in attached(model)] == [
        f"features.{i}.attention_out" for i in (1, 3, 6, 10, 13, 16, 17)
    ]


def test_stage_kwargs_go_to_their_stage() -> None:
    model = _build("tv_resnet18")
    attach(model, Affine, stage_kwargs={1: {"scale": 0.0}, 3: {"scale": 0.0}})
    for r in attached(model):
        zero = r.path.startswith(("layer1.", "layer3."))
        w = model.get_submodule(r.path).w
        assert bool((w == 0).all()) is zero
    with pytest.raises(ValueError, match="stage_kwargs for stages"):
        attach(_build("tv_resnet18"), Affine, stages=(1,), stage_kwargs={2: {"scale": 0.0}})


# ---------------------------------------------------------------------------------------------
# after= for any model
def test_after_paths_generic() -> None:
    model = _build("tv_resnet18")
    with torch.no_grad():
        y0 = model(X)
    before = _snapshot(model)
    attach(model, Affine, after=["layer3", "layer1.0.bn1", "layer4.1"], example_input=X)
    rows = {r.path: r.channels for r in attached(model)}
    assert rows == {
        "layer1.0.bn1.attention_out": 64,
        "layer3.attention_out": 256,
        "layer4.1.attention_out": 512,
    }
    assert isinstance(model.layer1[0].bn1, nn.BatchNorm2d)
    # reference: run the pieces by hand
    a3 = model.layer3.attention_out
    a1 = model.layer1[0].bn1.attention_out
    a4 = model.layer4[1].attention_out
    with torch.no_grad():
        m = model
        h = m.maxpool(m.relu(m.bn1(m.conv1(X))))
        b = m.layer1[0]
        o = torch.relu(a1(nn.BatchNorm2d.forward(b.bn1, b.conv1(h))))
        h = torch.relu(b.bn2(b.conv2(o)) + h)
        h = m.layer2(m.layer1[1](h))
        h = a3(m.layer3[1](m.layer3[0](h)))
        h = a4(type(m.layer4[1])._attnzoo_base.forward(m.layer4[1], m.layer4[0](h)))
        ref = m.fc(torch.flatten(m.avgpool(h), 1))
        torch.testing.assert_close(model(X), ref, rtol=0, atol=0)
        assert not torch.allclose(model(X), y0)
    detach(model)
    assert _snapshot(model) == before


def test_after_errors() -> None:
    model = _build("tv_resnet18")
    with pytest.raises(ValueError, match="ran 2 times"):
        attach(model, Affine, after=["layer1.0.relu"], example_input=X)
    with pytest.raises(ValueError, match="Did you mean 'layer1.0.bn1'"):
        attach(model, Affine, after=["layer1.0.bn_1"], example_input=X)
    with pytest.raises(ValueError, match="tensor"):
        attach(model, Affine, after=["fc"], example_input=X)
    with pytest.raises(ValueError, match="cannot be combined"):
        attach(model, Affine, after=["layer1"], stages=(1,))
    assert attached(model) == []
    with pytest.raises(ValueError, match="no known residual blocks"):
        attach(nn.Sequential(nn.Conv2d(3, 8, 3)), Affine)
    with pytest.raises(ValueError, match="position must be one of"):
        attach(model, Affine, position="after_bn3")
    with pytest.raises(ValueError, match="stages must be integers in 1..4"):
        attach(model, Affine, stages=(0,))
    with pytest.raises(ValueError, match="every must be"):
        attach(model, Affine, every=0)


def test_failing_constructor_leaves_model_untouched() -> None:
    model = _build("tv_resnet18")
    before = _snapshot(model)
    with pytest.raises(ValueError):  # 512 channels are fine, 64 are not divisible by 48
        attach(model, "ema", factor=48)
    assert _snapshot(model) == before


# ---------------------------------------------------------------------------------------------
# identity_init with the real modules
@pytest.mark.parametrize("attention", ["se", "cbam", "eca", "gc", "ca", "ema"])
def test_identity_init_equals_original(attention: str) -> None:
    model = _build("tv_resnet18")
    with torch.no_grad():
        y0 = model(X)
    attach(model, attention, identity_init=True)
    rows = attached(model)
    assert all(r.identity_init for r in rows) and rows[0].cls != "IdentityInit"
    with torch.no_grad():
        assert torch.equal(model(X), y0)
    alphas = [m.alpha for m in model.modules() if isinstance(m, IdentityInit)]
    if attnzoo.info(attention).identity_at_init:
        # already the identity at init (GC's zero-initialised add branch): not wrapped, because
        # x + alpha * (attn(x) - x) would have zero gradient for alpha and attn alike
        assert alphas == []
        model.train()
        model(X).square().mean().backward()
        last = [model.get_submodule(r.path).channel_add_conv[-1].weight for r in rows]
        assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in last)
        return
    # the gates are trainable: alpha gets a gradient at once
    model.train()
    model(X).square().mean().backward()
    assert len(alphas) == 8 and all(a.grad is not None and a.grad != 0 for a in alphas)


def test_identity_init_on_mobilenet_and_timm() -> None:
    for name, attention in (("tv_mobilenet_v2", "ca"), ("timm_resnet50d", "cbam")):
        model = _build(name)
        with torch.no_grad():
            y0 = model(X)
        attach(model, attention, identity_init=True)
        with torch.no_grad():
            assert torch.equal(model(X), y0)


# ---------------------------------------------------------------------------------------------
# load_pretrained
def test_load_pretrained_reports_only_attention_keys() -> None:
    source = _build("tv_resnet18")
    plain = source.state_dict()
    model = resnet18()
    attach(model, "se")
    missing = load_pretrained(model, plain)
    assert missing == sorted(k for k in model.state_dict() if ".attention." in k)
    assert len(missing) == 8 * 4  # fc1/fc2 weight+bias in 8 blocks
    for k, v in plain.items():
        assert torch.equal(model.state_dict()[k], v)
    # a full checkpoint of the attached model loads with nothing missing
    assert load_pretrained(resnet18(), plain) == []
    other = attach(resnet18(), "se")
    assert load_pretrained(other, model.state_dict()) == []


def test_load_pretrained_raises_on_other_mismatch(tmp_path) -> None:
    plain = _build("tv_resnet18").state_dict()
    model = attach(resnet18(), "se")
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(plain)
    del bad["layer1.0.bn1.weight"]
    with pytest.raises(RuntimeError, match=r"Missing: \['layer1.0.bn1.weight'\]"):
        load_pretrained(model, bad)
    bad = {**plain, "extra.weight": torch.zeros(1)}
    with pytest.raises(RuntimeError, match="unexpected: \\['extra.weight'\\]"):
        load_pretrained(model, bad)
    bad = {**plain, "fc.weight": torch.zeros(10, 512)}
    with pytest.raises(RuntimeError, match="shape mismatch"):
        load_pretrained(model, bad)
    for k, v in model.state_dict().items():  # nothing was loaded by the failing calls
        assert torch.equal(v, snapshot[k]), k
    path = tmp_path / "plain.pt"
    torch.save(plain, path)
    assert len(load_pretrained(model, path)) == 32


# ---------------------------------------------------------------------------------------------
# serialisation, dtype/device, modes
def test_pickle_and_deepcopy_roundtrip() -> None:
    model = attach(_build("tv_resnet18"), "cbam", identity_init=False)
    attach(model, Affine, position="after_block", stages=(4,))
    with torch.no_grad():
        y = model(X)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    clone = copy.deepcopy(model)
    for other in (loaded, clone, pickle.loads(pickle.dumps(model))):
        assert [(r.path, r.cls) for r in attached(other)] == [
            (r.path, r.cls) for r in attached(model)
        ]
        with torch.no_grad():
            assert torch.equal(other(X), y)
        assert type(other.layer1[0]).__name__ == type(model.layer1[0]).__name__
        detach(other)
        assert type(other.layer1[0]) is type(resnet18().layer1[0])


def test_dtype_mode_and_repr_follow_the_host() -> None:
    model = resnet18().double().eval()
    attach(model, "cbam")
    cbam = model.layer1[0].attention
    assert all(p.dtype == torch.float64 for p in cbam.parameters())
    assert not cbam.training
    assert model(X.double()).dtype == torch.float64
    assert isinstance(model.layer1[0], type(resnet18().layer1[0]))
    assert repr(model.layer1[0]).startswith("BasicBlock(")
    assert "(attention): CBAM(" in repr(model.layer1[0])


def test_attention_as_name_class_partial_and_preset() -> None:
    import functools

    cbam_cls = attnzoo.get("cbam")
    for attention, kwargs in (
        ("cbam", {"reduction": 8}),
        (cbam_cls, {"reduction": 8}),
        (functools.partial(cbam_cls, reduction=8), {}),
    ):
        model = attach(resnet18(), attention, **kwargs)
        n = sum(
            p.numel() for r in attached(model) for p in model.get_submodule(r.path).parameters()
        )
        assert n == sum(
            attnzoo.info("cbam").count_params(c, reduction=8)
            for c in [64] * 2 + [128] * 2 + [256] * 2 + [512] * 2
        )
    model = attach(resnet18(), "cbam", preset="yolov4-tiny")
    expected = attnzoo.create("cbam", 64, preset="yolov4-tiny")
    assert repr(model.layer1[0].attention) == repr(expected)


# ---------------------------------------------------------------------------------------------
# timm
def test_attach_into_timm_equals_timm_attn_layer() -> None:
    """attach() on a timm ResNet == timm's own attn_layer hook with the same module + weights."""
    from attnzoo.models import timm_attn_layer

    torch.manual_seed(0)
    theirs = timm.create_model(
        "resnet26", pretrained=False, block_args=dict(attn_layer=timm_attn_layer("cbam"))
    ).eval()
    ours = attach(timm.create_model("resnet26", pretrained=False), "cbam").eval()
    sd = theirs.state_dict()
    mapped = {k.replace(".se.", ".attention."): v for k, v in sd.items()}
    assert sorted(mapped) == sorted(ours.state_dict())
    ours.load_state_dict(mapped)
    with torch.no_grad():
        torch.testing.assert_close(ours(X), theirs(X), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["se", "cbam", "eca", "gc", "ca", "ema"])
def test_timm_attn_layer_hook_with_our_factory(name: str) -> None:
    from attnzoo.models import timm_attn_layer

    model = timm.create_model(
        "resnet18", pretrained=False, block_args=dict(attn_layer=timm_attn_layer(name))
    )
    assert type(model.layer1[0].se) is attnzoo.get(name)
    assert model.eval()(X[:1]).shape == (1, 1000)


@pytest.mark.parametrize("name", ["se", "cbam", "eca", "gc", "ca", "ema"])
def test_timm_attn_layer_hook_with_our_class(name: str) -> None:
    """timm calls ``attn_layer(channels, device=None, dtype=None)``: the classes must accept it."""
    model = timm.create_model(
        "resnet18", pretrained=False, block_args=dict(attn_layer=attnzoo.get(name))
    )
    assert type(model.layer1[0].se) is attnzoo.get(name)


# ---------------------------------------------------------------------------------------------
# compile and export
@pytest.mark.slow
def test_attached_model_compiles_fullgraph() -> None:
    model = attach(_build("tv_resnet18"), "cbam", identity_init=True)
    attach(model, "gc", position="after_block", stages=(4,))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_attached_model_exports_to_onnx(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = attach(_build("tv_resnet18"), "se")
    attach(model, "eca", after=["layer2"], example_input=(1, 3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    batch, h, w = torch.export.Dim("batch"), torch.export.Dim("h"), torch.export.Dim("w")
    path = tmp_path / "m.onnx"
    torch.onnx.export(
        model,
        (x,),
        path,
        dynamo=True,
        opset_version=18,
        dynamic_shapes={"x": {0: batch, 2: 32 * h, 3: 32 * w}},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in ((2, 3, 64, 64), (1, 3, 96, 64)):
        xi = torch.randn(shape)
        with torch.no_grad():
            ref = model(xi).numpy()
        out = session.run(None, {session.get_inputs()[0].name: xi.numpy()})[0]
        assert abs(out - ref).max() < 1e-4


def test_simam_official_placement_before_bn2() -> None:
    """SimAM's official ResNets apply it to conv2's output, before bn2 (BasicBlock and
    Bottleneck): one module per block, on conv2's width."""
    for name, widths in [
        ("tv_resnet18", [64] * 2 + [128] * 2 + [256] * 2 + [512] * 2),
        ("tv_resnet50", [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3),
    ]:
        model = _build(name)
        attach(model, "simam", position="after_conv3x3_pre_bn")
        rows = attached(model)
        assert [r.channels for r in rows] == widths
        assert rows[0].path == "layer1.0.attention_pre_bn" and rows[0].params == 0
        block = model.layer2[0]
        x = torch.randn(2, block.conv1.in_channels, 9, 7)
        seen = []
        block.bn2.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0]))
        with torch.no_grad():
            block(x)
            z = block.conv2(block.relu(block.bn1(block.conv1(x))))
        torch.testing.assert_close(seen[0], block.attention_pre_bn(z))


def test_bam_between_stages_on_non_square_maps() -> None:
    """BAM's placement (after layer1, 2, 3) through after_stage; the maps are non-square."""
    model = _build("tv_basic")
    attach(model, "bam", position="after_stage", stages=(1, 2, 3))
    rows = attached(model)
    assert [(r.path, r.channels) for r in rows] == [
        ("layer1.1.attention_out", 64),
        ("layer2.0.attention_out", 128),
        ("layer3.0.attention_out", 256),
    ]
    x = torch.randn(2, 3, 48, 80)
    seen = {}
    for name in ("layer1", "layer2"):
        model.get_submodule(name).register_forward_hook(
            lambda m, args, out, name=name: seen.__setitem__(name, out)
        )
    model.train()
    assert model(x).shape == (2, 1000)
    model.eval()
    with torch.no_grad():
        y = model(x)
        b, h = model.layer2[0], seen["layer1"]
        plain = torch.relu(b.bn2(b.conv2(torch.relu(b.bn1(b.conv1(h))))) + b.downsample(h))
    assert seen["layer2"].shape == (2, 128, 6, 10) and torch.isfinite(y).all()
    torch.testing.assert_close(seen["layer2"], b.attention_out(plain))
