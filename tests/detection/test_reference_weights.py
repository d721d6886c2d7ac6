"""load_reference_weights: the reference's key layout, attention keys, class-count mismatches,
our own state dicts, identity-at-init after loading plain weights.

The reference's state-dict layout and forward pass below are written from bubbliiiing/
yolov4-tiny-pytorch (``nets/CSPdarknet53_tiny.py``: ``BasicConv`` = ``conv`` + ``bn`` +
LeakyReLU(0.1), ``Resblock_body`` ``conv1..conv4`` + max-pool, ``CSPDarkNet`` ``conv1, conv2,
resblock_body1..3, conv3``; ``nets/yolo.py``: ``conv_for_P5``, ``yolo_headP5``, ``upsample``
(``Upsample.upsample`` = BasicConv + nearest x2), ``yolo_headP4``, ``feat1_att``, ``feat2_att``,
``upsample_att``; ``nets/attention.py``: ``se_block``, ``cbam_block``, ``eca_block``, ``CA_Block``),
read with the code search tool. No weights are downloaded: the state dicts are random tensors in
that layout, and the functional forward is a literal, slow port used as the judge.
"""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from attnzoo.detection import LoadReport, YoloV4Tiny, load_reference_weights
from attnzoo.models import IdentityInit

torch.set_num_threads(2)

SLOTS = {"feat1_att": 256, "feat2_att": 512, "upsample_att": 128}


# ------------------------------------------------------------------------------------------------
# the reference's layout
def basic(prefix: str, c_in: int, c_out: int, k: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.conv.weight": (c_out, c_in, k, k),
        f"{prefix}.bn.weight": (c_out,),
        f"{prefix}.bn.bias": (c_out,),
        f"{prefix}.bn.running_mean": (c_out,),
        f"{prefix}.bn.running_var": (c_out,),
        f"{prefix}.bn.num_batches_tracked": (),
    }


def resblock(prefix: str, c_in: int, c: int) -> dict[str, tuple[int, ...]]:
    return {
        **basic(f"{prefix}.conv1", c_in, c, 3),
        **basic(f"{prefix}.conv2", c // 2, c // 2, 3),
        **basic(f"{prefix}.conv3", c // 2, c // 2, 3),
        **basic(f"{prefix}.conv4", c, c, 1),
    }


def attention_layout(phi: int, slot: str, c: int) -> dict[str, tuple[int, ...]]:
    if phi == 1:  # se_block(ratio=16): Linear layers without bias
        return {f"{slot}.fc.0.weight": (c // 16, c), f"{slot}.fc.2.weight": (c, c // 16)}
    if phi == 2:  # cbam_block(ratio=8, kernel_size=7): 1x1 convs without bias
        return {
            f"{slot}.channelattention.fc1.weight": (c // 8, c, 1, 1),
            f"{slot}.channelattention.fc2.weight": (c, c // 8, 1, 1),
            f"{slot}.spatialattention.conv1.weight": (1, 2, 7, 7),
        }
    if phi == 3:  # eca_block(b=1, gamma=2): k = 5 for 128, 256 and 512 channels
        return {f"{slot}.conv.weight": (1, 1, 5)}
    mip = c // 16  # CA_Block(reduction=16)
    bn = {f"{slot}.bn.{n}": (mip,) for n in ("weight", "bias", "running_mean", "running_var")}
    return {
        f"{slot}.conv_1x1.weight": (mip, c, 1, 1),
        **bn,
        f"{slot}.bn.num_batches_tracked": (),
        f"{slot}.F_h.weight": (c, mip, 1, 1),
        f"{slot}.F_w.weight": (c, mip, 1, 1),
    }


def reference_layout(num_classes: int, phi: int = 0) -> dict[str, tuple[int, ...]]:
    a = 3 * (5 + num_classes)
    layout = {
        **basic("backbone.conv1", 3, 32, 3),
        **basic("backbone.conv2", 32, 64, 3),
        **resblock("backbone.resblock_body1", 64, 64),
        **resblock("backbone.resblock_body2", 128, 128),
        **resblock("backbone.resblock_body3", 256, 256),
        **basic("backbone.conv3", 512, 512, 3),
        **basic("conv_for_P5", 512, 256, 1),
        **basic("yolo_headP5.0", 256, 512, 3),
        "yolo_headP5.1.weight": (a, 512, 1, 1),
        "yolo_headP5.1.bias": (a,),
        **basic("upsample.upsample.0", 256, 128, 1),
        **basic("yolo_headP4.0", 384, 256, 3),
        "yolo_headP4.1.weight": (a, 256, 1, 1),
        "yolo_headP4.1.bias": (a,),
    }
    if phi:
        for slot, c in SLOTS.items():
            layout.update(attention_layout(phi, slot, c))
    return layout


def reference_state_dict(num_classes: int, phi: int = 0, seed: int = 0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in reference_layout(num_classes, phi).items():
        if name.endswith("num_batches_tracked"):
            sd[name] = torch.randint(1, 1000, (), generator=gen)
        elif name.endswith("running_var"):
            sd[name] = torch.rand(shape, generator=gen) + 0.5
        elif name.endswith(("bn.weight", "bn.bias", "running_mean")):
            sd[name] = torch.randn(shape, generator=gen) * 0.2 + (1.0 if "weight" in name else 0)
        else:  # conv / linear weights, scaled so activations stay O(1) through the network
            fan_in = max(1, torch.Size(shape[1:]).numel())
            sd[name] = torch.randn(shape, generator=gen) / fan_in**0.5
    return sd


# ------------------------------------------------------------------------------------------------
# the reference's forward, eval mode, literal and functional
def f_basic(sd, prefix, x, stride=1):
    w = sd[f"{prefix}.conv.weight"]
    x = F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2)
    x = F.batch_norm(
        x,
        sd[f"{prefix}.bn.running_mean"],
        sd[f"{prefix}.bn.running_var"],
        sd[f"{prefix}.bn.weight"],
        sd[f"{prefix}.bn.bias"],
        False,
        0.0,
        1e-5,
    )
    return F.leaky_relu(x, 0.1)


def f_resblock(sd, prefix, x):
    x = f_basic(sd, f"{prefix}.conv1", x)
    route = x
    c = x.shape[1]
    x = torch.split(x, c // 2, dim=1)[1]
    x = f_basic(sd, f"{prefix}.conv2", x)
    route1 = x
    x = f_basic(sd, f"{prefix}.conv3", x)
    x = f_basic(sd, f"{prefix}.conv4", torch.cat([x, route1], 1))
    feat = x
    return F.max_pool2d(torch.cat([route, x], 1), 2, 2), feat


def f_attention(sd, phi, slot, x):
    p = f"{slot}."
    if phi == 1:
        y = x.mean((2, 3))
        y = F.linear(F.relu(F.linear(y, sd[p + "fc.0.weight"])), sd[p + "fc.2.weight"])
        y = torch.sigmoid(y)
        return x * y[:, :, None, None]
    if phi == 2:
        fc1, fc2 = sd[p + "channelattention.fc1.weight"], sd[p + "channelattention.fc2.weight"]

        def mlp(v):
            return F.conv2d(F.relu(F.conv2d(v, fc1)), fc2)

        x = x * torch.sigmoid(mlp(F.adaptive_avg_pool2d(x, 1)) + mlp(F.adaptive_max_pool2d(x, 1)))
        s = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return x * torch.sigmoid(F.conv2d(s, sd[p + "spatialattention.conv1.weight"], padding=3))
    if phi == 3:
        w = sd[p + "conv.weight"]
        y = F.adaptive_avg_pool2d(x, 1).squeeze(-1).transpose(-1, -2)  # (B, 1, C)
        y = F.conv1d(y, w, padding=(w.shape[-1] - 1) // 2).transpose(-1, -2).unsqueeze(-1)
        return x * torch.sigmoid(y)
    h, w = x.shape[2:]
    x_h = x.mean(3, keepdim=True).permute(0, 1, 3, 2)
    x_w = x.mean(2, keepdim=True)
    y = F.conv2d(torch.cat((x_h, x_w), 3), sd[p + "conv_1x1.weight"])
    y = F.relu(
        F.batch_norm(
            y,
            sd[p + "bn.running_mean"],
            sd[p + "bn.running_var"],
            sd[p + "bn.weight"],
            sd[p + "bn.bias"],
            False,
            0.0,
            1e-5,
        )
    )
    y_h, y_w = y.split([h, w], 3)
    s_h = torch.sigmoid(F.conv2d(y_h.permute(0, 1, 3, 2), sd[p + "F_h.weight"]))
    s_w = torch.sigmoid(F.conv2d(y_w, sd[p + "F_w.weight"]))
    return x * s_h * s_w


def reference_forward(sd, x, phi=0):
    x = f_basic(sd, "backbone.conv1", x, 2)
    x = f_basic(sd, "backbone.conv2", x, 2)
    x, _ = f_resblock(sd, "backbone.resblock_body1", x)
    x, _ = f_resblock(sd, "backbone.resblock_body2", x)
    x, feat1 = f_resblock(sd, "backbone.resblock_body3", x)
    feat2 = f_basic(sd, "backbone.conv3", x)
    if phi:
        feat1, feat2 = (
            f_attention(sd, phi, "feat1_att", feat1),
            f_attention(sd, phi, "feat2_att", feat2),
        )
    p5 = f_basic(sd, "conv_for_P5", feat2)
    out0 = F.conv2d(
        f_basic(sd, "yolo_headP5.0", p5), sd["yolo_headP5.1.weight"], sd["yolo_headP5.1.bias"]
    )
    up = F.interpolate(f_basic(sd, "upsample.upsample.0", p5), scale_factor=2, mode="nearest")
    if phi:
        up = f_attention(sd, phi, "upsample_att", up)
    out1 = F.conv2d(
        f_basic(sd, "yolo_headP4.0", torch.cat([up, feat1], 1)),
        sd["yolo_headP4.1.weight"],
        sd["yolo_headP4.1.bias"],
    )
    return out0, out1


def image(seed: int = 0, size: tuple[int, int] = (64, 96)) -> Tensor:
    return torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(seed))


def assert_outputs_close(got, expected, **tol):
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, **(tol or {"rtol": 1e-5, "atol": 1e-5}))


# ------------------------------------------------------------------------------------------------
def test_layout_matches_the_reference_parameter_count():
    """The synthetic layout has the reference's 5,918,006 parameters at 20 classes (BN running
    statistics and counters are buffers)."""
    n = sum(
        torch.Size(s).numel()
        for k, s in reference_layout(20).items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    assert n == 5_918_006


@pytest.mark.parametrize("phi", [0, 1, 2, 3, 4])
def test_reference_state_dict_reproduces_the_reference_forward(phi):
    """Every tensor lands in the right place: our model with the loaded weights computes the
    reference's forward on the reference's state dict (all attention variants included)."""
    sd = reference_state_dict(20, phi, seed=phi)
    model = YoloV4Tiny(20, phi=phi).eval()
    report = load_reference_weights(model, sd)
    assert isinstance(report, LoadReport)
    assert len(report.mapped) == len(sd) and not report.unexpected and not report.mismatched
    assert not report.missing
    assert sorted(report.mapped.values()) == sorted(model.state_dict())  # a bijection
    x = image(phi)
    with torch.no_grad():
        assert_outputs_close(model(x), reference_forward(sd, x, phi))


def test_values_land_by_name():
    sd = reference_state_dict(20, 2, seed=5)
    model = YoloV4Tiny(20, phi=2)
    load_reference_weights(model, sd)
    pairs = [
        ("backbone.conv1.conv.weight", model.backbone.stem1.conv.weight),
        ("backbone.conv2.bn.running_mean", model.backbone.stem2.bn.running_mean),
        (
            "backbone.resblock_body3.conv4.bn.running_var",
            model.backbone.block3.conv4.bn.running_var,
        ),
        ("backbone.resblock_body1.conv2.conv.weight", model.backbone.block1.conv2.conv.weight),
        ("backbone.conv3.bn.weight", model.backbone.conv.bn.weight),
        ("conv_for_P5.conv.weight", model.conv_for_p5.conv.weight),
        ("yolo_headP5.0.bn.bias", model.head_p5[0].bn.bias),
        ("yolo_headP5.1.bias", model.head_p5[1].bias),
        ("upsample.upsample.0.conv.weight", model.upsample[0].conv.weight),
        ("yolo_headP4.1.weight", model.head_p4[1].weight),
        ("feat2_att.spatialattention.conv1.weight", model.feat2_att.spatial.conv.weight),
    ]
    for key, tensor in pairs:
        assert torch.equal(tensor, sd[key]), key
    # the reference's 1x1-conv MLP weights become our linear weights
    assert torch.equal(
        model.upsample_att.channel.fc1.weight,
        sd["upsample_att.channelattention.fc1.weight"][:, :, 0, 0],
    )
    assert (
        model.backbone.block2.conv3.bn.num_batches_tracked
        == sd["backbone.resblock_body2.conv3.bn.num_batches_tracked"]
    )


@pytest.mark.parametrize("phi", [1, 2, 3, 4])
def test_plain_weights_into_attention_model_report_the_attention_as_missing(phi):
    sd = reference_state_dict(20, 0, seed=7)
    model = YoloV4Tiny(20, phi=phi)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.split(".")[0] in SLOTS}
    report = load_reference_weights(model, sd)
    assert sorted(report.missing) == sorted(before) and before
    assert not report.unexpected and not report.mismatched and len(report.mapped) == len(sd)
    for k, v in model.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), k  # untouched
    assert "missing" in str(report) and "feat1_att" in str(report)


def test_attention_weights_into_plain_model_are_unexpected():
    sd = reference_state_dict(20, 4, seed=8)
    report = load_reference_weights(YoloV4Tiny(20), sd)
    assert sorted(report.unexpected) == sorted(k for k in sd if k.split(".")[0] in SLOTS)
    assert not report.missing and not report.mismatched


def test_other_class_count_heads_are_skipped_and_reported():
    """COCO-trained reference weights (80 classes) into a 20-class detector."""
    sd = reference_state_dict(80, 0, seed=9)
    model = YoloV4Tiny(20)
    heads = {
        k: v.clone()
        for k, v in model.state_dict().items()
        if k.startswith(("head_p5.1", "head_p4.1"))
    }
    report = load_reference_weights(model, sd)
    assert sorted(report.mismatched) == sorted(
        [
            ("head_p5.1.weight", (255, 512, 1, 1), (75, 512, 1, 1)),
            ("head_p5.1.bias", (255,), (75,)),
            ("head_p4.1.weight", (255, 256, 1, 1), (75, 256, 1, 1)),
            ("head_p4.1.bias", (255,), (75,)),
        ]
    )
    assert not report.missing and not report.unexpected and len(report.mapped) == len(sd) - 4
    for k, v in heads.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert torch.equal(model.head_p4[0].conv.weight, sd["yolo_headP4.0.conv.weight"])
    assert "255" in str(report)


def test_own_state_dicts_and_identity_wrappers_both_ways():
    src = YoloV4Tiny(20, phi=1).eval()
    dst = YoloV4Tiny(20, phi=1).eval()
    report = load_reference_weights(dst, src.state_dict())
    assert all(k == v for k, v in report.mapped.items()) and not report.missing
    x = image(3)
    with torch.no_grad():
        assert_outputs_close(dst(x), src(x), rtol=0, atol=0)
    wrapped = YoloV4Tiny(20, phi=1, attention_init="identity")
    report = load_reference_weights(wrapped, src.state_dict())
    assert report.mapped["feat1_att.fc1.weight"] == "feat1_att.attn.fc1.weight"
    assert sorted(report.missing) == ["feat1_att.alpha", "feat2_att.alpha", "upsample_att.alpha"]
    assert torch.equal(wrapped.feat2_att.attn.fc2.weight, src.feat2_att.fc2.weight)
    back = YoloV4Tiny(20, phi=1)
    report = load_reference_weights(back, wrapped.state_dict())
    assert report.mapped["feat1_att.attn.fc1.weight"] == "feat1_att.fc1.weight"
    assert sorted(report.unexpected) == ["feat1_att.alpha", "feat2_att.alpha", "upsample_att.alpha"]


@pytest.fixture(scope="module")
def plain_reference():
    sd = reference_state_dict(20, 0, seed=11)
    plain = YoloV4Tiny(20).eval()
    load_reference_weights(plain, sd)
    return sd, plain


@pytest.mark.parametrize("phi", [1, 2, 3, 4])
def test_identity_init_starts_where_the_pretrained_detector_was(phi, plain_reference):
    """Plain reference weights + attention_init="identity": exactly the plain model's outputs;
    with the default init the outputs change."""
    sd, plain = plain_reference
    ours = YoloV4Tiny(20, phi=phi, attention_init="identity").eval()
    default = YoloV4Tiny(20, phi=phi).eval()
    for m in (ours, default):
        load_reference_weights(m, sd)
    assert all(isinstance(getattr(ours, s), IdentityInit) for s in SLOTS)
    x = image(12, (64, 64))
    with torch.no_grad():
        expected = plain(x)
        assert_outputs_close(ours(x), expected, rtol=0, atol=0)
        assert not torch.allclose(default(x)[0], expected[0])


def test_identity_init_in_train_mode_and_alpha_gradient(plain_reference):
    sd, plain = plain_reference
    ours = YoloV4Tiny(20, phi=4, attention_init="identity").train()
    load_reference_weights(ours, sd)
    x = image(13, (64, 64))
    with torch.no_grad():
        assert_outputs_close(ours(x), plain.train()(x), rtol=0, atol=0)
    plain.eval()
    sum(o.square().mean() for o in ours(x)).backward()
    assert all(getattr(ours, s).alpha.grad.abs() > 0 for s in SLOTS)


def test_from_a_path_weights_only_and_prefixes(tmp_path):
    sd = reference_state_dict(20, 3, seed=13)
    path = tmp_path / "yolov4_tiny.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)  # an nn.DataParallel save
    model = YoloV4Tiny(20, phi=3).eval()
    report = load_reference_weights(model, path)
    assert len(report.mapped) == len(sd) and not report.missing
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "ckpt.pth")
    report = load_reference_weights(YoloV4Tiny(20, phi=3), str(tmp_path / "ckpt.pth"))
    assert len(report.mapped) == len(sd)
    # weights_only=True: a pickle with arbitrary objects is refused, not executed
    torch.save(
        {"backbone.conv1.conv.weight": sd["backbone.conv1.conv.weight"], "extra": _NotATensor()},
        tmp_path / "unsafe.pth",
    )
    with pytest.raises(pickle.UnpicklingError):
        load_reference_weights(YoloV4Tiny(20), tmp_path / "unsafe.pth")


class _NotATensor:
    pass


def test_errors():
    with pytest.raises(TypeError, match="YoloV4Tiny"):
        load_reference_weights(torch.nn.Linear(2, 2), {})
    with pytest.raises(ValueError, match="no weights file"):
        load_reference_weights(YoloV4Tiny(20), "/nonexistent/w.pth")
    with pytest.raises(TypeError, match="state dict"):
        load_reference_weights(YoloV4Tiny(20), [1, 2])
    with pytest.raises(TypeError, match="str -> Tensor"):
        load_reference_weights(YoloV4Tiny(20), {"backbone.conv1.conv.weight": [1.0]})
    other = {"fc.weight": torch.zeros(3, 4), "layer1.0.conv1.weight": torch.zeros(2, 2, 1, 1)}
    with pytest.raises(ValueError, match="backbone/neck tensors"):
        load_reference_weights(YoloV4Tiny(20), other)
    report = load_reference_weights(YoloV4Tiny(20), other, strict_backbone=False)
    assert sorted(report.unexpected) == sorted(other) and not report.mapped
    sd = reference_state_dict(20, 0)
    sd["backbone.conv3.conv.weight"] = torch.zeros(512, 512, 1, 1)  # wrong shape in the backbone
    with pytest.raises(ValueError, match="backbone.conv.conv.weight"):
        load_reference_weights(YoloV4Tiny(20), sd)
    mixed = {**sd, "backbone.stem1.conv.weight": sd["backbone.conv1.conv.weight"]}
    with pytest.raises(ValueError, match="two source keys"):
        load_reference_weights(YoloV4Tiny(20), mixed)
