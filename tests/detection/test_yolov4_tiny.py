"""YOLOv4-tiny with the attention neck: counts, shapes, phi mapping, placement, errors.

The reference parameter counts are derived from the layer shapes of bubbliiiing/
yolov4-tiny-pytorch (``nets/CSPdarknet53_tiny.py``: BasicConv = conv(no bias) + BN + LeakyReLU;
``Resblock_body``; ``nets/yolo.py``: ``conv_for_P5``, ``yolo_head``, ``Upsample``), read with the
code search tool; each term below is one of those layers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.detection import YoloV4Tiny

torch.set_num_threads(2)


def conv_bn(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + 2 * c_out


def csp_block(c_in: int, c: int) -> int:
    return conv_bn(c_in, c, 3) + 2 * conv_bn(c // 2, c // 2, 3) + conv_bn(c, c, 1)


def reference_params(num_classes: int) -> int:
    a = 3 * (5 + num_classes)
    backbone = (
        conv_bn(3, 32, 3)
        + conv_bn(32, 64, 3)
        + csp_block(64, 64)
        + csp_block(128, 128)
        + csp_block(256, 256)
        + conv_bn(512, 512, 3)
    )
    neck = conv_bn(512, 256, 1) + conv_bn(256, 128, 1)
    heads = conv_bn(256, 512, 3) + (512 * a + a) + conv_bn(384, 256, 3) + (256 * a + a)
    return backbone + neck + heads


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_reference_parameter_counts() -> None:
    assert reference_params(80) == 6_056_606
    assert reference_params(20) == 5_918_006
    assert n_params(YoloV4Tiny(80, phi=0)) == 6_056_606
    assert n_params(YoloV4Tiny(20)) == 5_918_006
    assert round(6_056_606 / 1e6, 2) == 6.06 and round(5_918_006 / 1e6, 2) == 5.92


@pytest.mark.parametrize(
    ("phi", "name", "preset"),
    [
        (1, "se", "yolov4-tiny"),
        (2, "cbam", "yolov4-tiny"),
        (3, "eca", "yolov4-tiny"),
        (4, "ca", "yolov4-tiny"),
    ],
)
def test_phi_maps_to_the_reference_variants(phi: int, name: str, preset: str | None) -> None:
    model = YoloV4Tiny(20, phi=phi)
    extra = sum(
        attnzoo.info(name).count_params(c, **attnzoo.info(name).presets[preset or "official"])
        for c in (256, 512, 128)
    )
    assert n_params(model) == 5_918_006 + extra
    for attr, channels in (("feat1_att", 256), ("feat2_att", 512), ("upsample_att", 128)):
        module = getattr(model, attr)
        assert type(module) is attnzoo.get(name)
        assert repr(module) == repr(attnzoo.create(name, channels, preset=preset))


def test_reference_module_variants_counts() -> None:
    """SE without FC bias (r16), CBAM r8 without bias/BN, ECA adaptive k, CA_Block (r16, no
    bias, BN, no floor on the hidden width): the reference's sizes (``nets/attention.py``)."""
    se = sum(2 * c * (c // 16) for c in (256, 512, 128))
    cbam = sum(2 * c * (c // 8) + 2 * 49 for c in (256, 512, 128))
    eca = 5 + 5 + 5  # k = int((log2 C + 1) / 2) = 4, 5, 4 for 256, 512, 128 -> odd: 5, 5, 5
    # CA_Block: conv_1x1 C -> C/16, BN(C/16) weight + bias, F_h and F_w C/16 -> C, no biases
    ca = sum(c * (c // 16) + 2 * (c // 16) + 2 * (c // 16) * c for c in (256, 512, 128))
    assert ca == 64_624
    assert n_params(YoloV4Tiny(20, phi=1)) - 5_918_006 == se
    assert n_params(YoloV4Tiny(20, phi=2)) - 5_918_006 == cbam
    assert n_params(YoloV4Tiny(20, phi=3)) - 5_918_006 == eca
    assert n_params(YoloV4Tiny(20, phi=4)) == 5_918_006 + ca == 5_982_630
    assert n_params(YoloV4Tiny(80, phi=4)) == 6_056_606 + ca == 6_121_230
    assert YoloV4Tiny(20, phi=4).upsample_att.mip == 8  # 128 // 16, no floor of 8 needed here


@pytest.mark.parametrize("phi", [0, 1, 2, 3, 4])
def test_output_shapes(phi: int) -> None:
    model = YoloV4Tiny(20, phi=phi).eval()
    with torch.no_grad():
        p5, p4 = model(torch.randn(1, 3, 416, 416))
    assert p5.shape == (1, 75, 13, 13) and p4.shape == (1, 75, 26, 26)
    with torch.no_grad():
        p5, p4 = model(torch.randn(2, 3, 64, 96))
    assert p5.shape == (2, 75, 2, 3) and p4.shape == (2, 75, 4, 6)


def test_attention_placement() -> None:
    """feat1 (256 ch, stride 16), feat2 (512, stride 32), upsampled P5 (128, stride 16)."""
    model = YoloV4Tiny(3, attention="se").eval()
    seen = {}
    for attr in ("feat1_att", "feat2_att", "upsample_att"):
        getattr(model, attr).register_forward_hook(
            lambda m, a, o, attr=attr: seen.__setitem__(attr, (a[0].shape, o))
        )
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        p5, p4 = model(x)
        feat1, feat2 = model.backbone(x)
        p5_ref = model.conv_for_p5(seen["feat2_att"][1])
        up = model.upsample(p5_ref)
        p4_ref = model.head_p4(torch.cat([seen["upsample_att"][1], seen["feat1_att"][1]], 1))
    assert seen["feat1_att"][0] == (1, 256, 8, 10) == feat1.shape
    assert seen["feat2_att"][0] == (1, 512, 4, 5) == feat2.shape
    assert seen["upsample_att"][0] == (1, 128, 8, 10) == up.shape
    assert torch.equal(p5, model.head_p5(p5_ref)) and torch.equal(p4, p4_ref)


def test_any_attention_and_kwargs() -> None:
    model = YoloV4Tiny(80, attention="cbam", reduction=8)
    assert model.feat2_att.__class__ is attnzoo.get("cbam")
    assert n_params(model) - 6_056_606 == sum(
        attnzoo.info("cbam").count_params(c, reduction=8) for c in (256, 512, 128)
    )
    assert isinstance(YoloV4Tiny(80).feat1_att, nn.Identity)


def test_attention_init_identity_wraps_the_inserted_modules() -> None:
    model = YoloV4Tiny(20, phi=2, attention_init="identity")
    for attr in ("feat1_att", "feat2_att", "upsample_att"):
        module = getattr(model, attr)
        assert isinstance(module, attnzoo.models.IdentityInit) and module.alpha.item() == 0.0
        assert type(module.attn) is attnzoo.get("cbam")
    assert n_params(model) == n_params(YoloV4Tiny(20, phi=2)) + 3
    assert isinstance(YoloV4Tiny(20, attention_init="identity").feat1_att, nn.Identity)
    # a module that already is the identity at initialisation (GC's zero-initialised last
    # conv) is left bare: the wrapper would freeze both alpha and the module
    gc = YoloV4Tiny(20, attention="gc", attention_init="identity")
    assert type(gc.feat1_att) is attnzoo.get("gc")


def test_errors() -> None:
    model = YoloV4Tiny(20).eval()
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 416, 400))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="phi must be one of"):
        YoloV4Tiny(20, phi=5)
    with pytest.raises(ValueError, match="not both"):
        YoloV4Tiny(20, attention="se", phi=1)
    with pytest.raises(ValueError, match="num_classes"):
        YoloV4Tiny(0)
    with pytest.raises(ValueError, match="without attention="):
        YoloV4Tiny(20, reduction=8)
    with pytest.raises(ValueError, match="attention_init must be one of"):
        YoloV4Tiny(20, phi=1, attention_init="zero")


def test_scratch_init_is_the_references_weights_init() -> None:
    torch.manual_seed(0)
    model = YoloV4Tiny(3, phi=2, init="scratch")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.numel() > 1000]
    assert convs and all(abs(float(m.weight.detach().std()) - 0.02) < 0.003 for m in convs)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(float(m.bias.detach().abs().max()) == 0 for m in bns)
    assert 0.995 < float(torch.cat([m.weight.detach() for m in bns]).mean()) < 1.005
    # the default keeps the backbone's N(0, sqrt(2 / (k*k*C_out))), much wider than 0.02
    wide = YoloV4Tiny(3, phi=2).backbone.stem1.conv.weight.detach()
    assert float(wide.std()) > 0.05
    with pytest.raises(ValueError, match="YoloV4Tiny: init"):
        YoloV4Tiny(3, init="xavier")


def test_cam_accepts_a_detector() -> None:
    from attnzoo.viz import cam, detector_cam

    torch.manual_seed(0)
    model, images = YoloV4Tiny(3).eval(), torch.rand(2, 3, 64, 64)
    maps = cam(model, images, method="eigencam")
    assert maps.shape == (2, 64, 64)
    torch.testing.assert_close(maps, detector_cam(model, images, method="eigencam"))
    with pytest.raises(ValueError, match="detector_cam"):
        cam(model, images, targets=1)
