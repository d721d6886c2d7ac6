"""DANet network: the official head's layers and parameter count, outputs, heads, presets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnzoo
from attnzoo.segmentation import (
    SEGMENTATION_MODELS,
    DANet,
    DANetHead,
    FCNAuxHead,
    danet_head_param_count,
)
from attnzoo.segmentation.danet import _Branch
from conftest import randomize_


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def official_head_params(cin: int, k: int) -> int:
    """junfu1115/DANet DANetHead(cin, k), layer by layer (weights + BN affine + biases)."""
    inter = cin // 4
    conv5a = conv5c = 3 * 3 * cin * inter + 2 * inter  # Conv3x3 no bias + BN
    sa = (inter * (inter // 8) + inter // 8) * 2 + (inter * inter + inter) + 1  # q, k, v, gamma
    sc = 1  # gamma
    conv51 = conv52 = 3 * 3 * inter * inter + 2 * inter
    conv6 = conv7 = conv8 = inter * k + k  # Dropout2d + Conv1x1 with bias
    return conv5a + conv5c + sa + sc + conv51 + conv52 + conv6 + conv7 + conv8


def test_official_head_parameter_count_exact():
    with torch.device("meta"):
        head = DANetHead(2048, 19)
    assert official_head_params(2048, 19) == 23_954_619
    assert n_params(head) == 23_954_619 == danet_head_param_count(2048, 19)


@pytest.mark.parametrize("cin,k,inter", [(2048, 150, None), (128, 11, None), (96, 5, 40)])
def test_head_param_count_formula(cin, k, inter):
    with torch.device("meta"):
        head = DANetHead(cin, k, inter_channels=inter)
    assert n_params(head) == danet_head_param_count(cin, k, inter_channels=inter)


def test_single_branch_heads_parameter_counts():
    cin, k = 256, 7
    i = cin // 4
    fcn = 9 * cin * i + 2 * i + 9 * i * i + 2 * i + i * k + k
    with torch.device("meta"):
        counts = {a: n_params(DANetHead(cin, k, attention=a)) for a in ("fcn", "pam", "cam")}
        counts["nonlocal2d"] = n_params(DANetHead(cin, k, attention="nonlocal2d"))
        counts[None] = n_params(DANetHead(cin, k, attention=None))
    assert counts["fcn"] == counts[None] == fcn
    assert counts["pam"] == fcn + attnzoo.info("pam").param_count(i)
    assert counts["cam"] == fcn + 1
    assert counts["nonlocal2d"] == fcn + attnzoo.info("nonlocal2d").param_count(i)


def test_mmseg_aux_head_parameter_count():
    with torch.device("meta"):
        aux = FCNAuxHead(1024, 19)
    assert n_params(aux) == 9 * 1024 * 256 + 2 * 256 + 256 * 19 + 19


def _naive_pam(pam: nn.Module, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    q = pam.query_conv(x).flatten(2).transpose(1, 2)  # (B, N, d)
    k = pam.key_conv(x).flatten(2)  # (B, d, N)
    v = pam.value_conv(x).flatten(2)  # (B, C, N)
    s = torch.softmax(q @ k, dim=-1)  # (B, N, N), s[j, i]
    return pam.gamma * (v @ s.transpose(1, 2)).view(b, c, h, w) + x


def _naive_cam(cam: nn.Module, x: torch.Tensor) -> torch.Tensor:
    f = x.flatten(2)
    e = f @ f.transpose(1, 2)
    a = torch.softmax(e.amax(-1, keepdim=True) - e, dim=-1)
    return cam.gamma * (a @ f).view_as(x) + x


def test_dual_head_matches_official_forward():
    torch.manual_seed(0)
    head = randomize_(DANetHead(64, 5)).eval()
    x = torch.randn(2, 64, 5, 7)
    pam, cam = head.branches["pam"], head.branches["cam"]
    with torch.no_grad():
        sa_conv = pam.refine(_naive_pam(pam.attention, pam.reduce(x)))
        sc_conv = cam.refine(_naive_cam(cam.attention, cam.reduce(x)))
        expected = head.classifier(sa_conv + sc_conv)
        head.train()  # training outputs, with BN on its running stats and no dropout
        for m in head.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.Dropout2d)):
                m.eval()
        out = head(x)
    torch.testing.assert_close(out["out"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["pam"], pam.classifier(sa_conv), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["cam"], cam.classifier(sc_conv), rtol=1e-4, atol=1e-5)
    head.eval()
    assert set(head(x)) == {"out"}


def test_resnet50_output_stride_8_and_output_size():
    with torch.device("meta"):  # shapes only: no real ResNet forward
        # attention="pam": CAM's autocast region needs a real device
        model = DANet(19, backbone="resnet50", attention="pam").eval()
        feats = []
        model.backbone.register_forward_hook(lambda m, i, o: feats.extend(o))
        out = model(torch.empty(1, 3, 96, 128))
    c3, c4 = feats
    assert tuple(c3.shape) == (1, 1024, 12, 16) and tuple(c4.shape) == (1, 2048, 12, 16)
    assert tuple(out["out"].shape) == (1, 19, 96, 128)
    l3, l4 = model.backbone.layer3, model.backbone.layer4
    # first block keeps the previous dilation, the others use the stage's (DANet, torchvision)
    assert [b.conv2.dilation[0] for b in l3] == [1] + [2] * (len(l3) - 1)
    assert [b.conv2.dilation[0] for b in l4] == [2, 4, 4]
    assert all(b.conv2.stride == (1, 1) for b in [*l3, *l4])


def test_resnet101_multi_grid_and_resnet50_output_stride_16():
    with torch.device("meta"):
        trunk = attnzoo.segmentation.dilated_resnet("resnet101", multi_grid=(4, 8, 16))
        c3, c4 = trunk(torch.empty(1, 3, 64, 64))
        os16 = attnzoo.segmentation.dilated_resnet("resnet50", output_stride=16)
        c4_16 = os16(torch.empty(1, 3, 64, 64))[1]
    assert tuple(c3.shape[-2:]) == tuple(c4.shape[-2:]) == (8, 8) and len(trunk.layer3) == 23
    assert [b.conv2.dilation[0] for b in trunk.layer4] == [4, 8, 16]
    assert [b.conv2.padding[0] for b in trunk.layer4] == [4, 8, 16]
    assert tuple(c4_16.shape[-2:]) == (4, 4)
    assert [b.conv2.dilation[0] for b in os16.layer4] == [1, 2, 2]


@pytest.mark.parametrize("os_,side", [(8, 4), (16, 2), (32, 1)])
def test_small_trunk_output_stride(os_, side):
    trunk = attnzoo.segmentation.dilated_resnet("small", output_stride=os_)
    c3, c4 = trunk(torch.randn(2, 3, 32, 32))
    assert c4.shape == (2, 128, side, side) and c3.shape[1] == 64
    if os_ == 8:
        assert [b.conv1.dilation[0] for b in trunk.layer4] == [2, 4]
        assert [b.conv2.dilation[0] for b in trunk.layer4] == [4, 4]


@pytest.mark.parametrize("preset,corners", [("official", True), ("mmseg", False)])
def test_outputs_at_input_size_and_align_corners(preset, corners):
    torch.manual_seed(0)
    model = SEGMENTATION_MODELS["danet_small"](3, preset=preset)
    assert model.align_corners is corners
    x = torch.randn(2, 3, 37, 45)
    out = model.train()(x)
    keys = {"out", "pam", "cam"} | ({"aux"} if preset == "mmseg" else set())
    assert set(out) == keys
    assert all(v.shape == (2, 3, 37, 45) for v in out.values())
    model.eval()
    with torch.no_grad():
        out = model(x)["out"]
        low = model.head(model.backbone(x)[1])["out"]
        for ac in (True, False):
            up = F.interpolate(low, size=(37, 45), mode="bilinear", align_corners=ac)
            assert torch.allclose(out, up) is (ac == corners)
    flipped = DANet(3, backbone="small", preset=preset, align_corners=not corners)
    assert flipped.align_corners is (not corners)


@pytest.mark.parametrize("attention", [None, "fcn", "pam", "cam", "dual_attention", "nonlocal2d"])
def test_heads_build_train_and_run(attention):
    torch.manual_seed(0)
    model = SEGMENTATION_MODELS["danet_small"](4, attention=attention)
    x = torch.randn(2, 3, 32, 40)
    out = model.train()(x)
    dual = attention == "dual_attention"
    assert set(out) == ({"out", "pam", "cam"} if dual else {"out"})
    sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is not None for p in model.head.parameters() if p.requires_grad)
    slot = model.head.branches["pam" if dual else "main"].attention
    expected = {None: nn.Identity, "fcn": nn.Identity, "dual_attention": attnzoo.get("pam")}
    assert isinstance(slot, expected.get(attention) or attnzoo.get(attention))
    assert set(model.eval()(x)) == {"out"}


def test_attention_input_gives_the_pam_and_its_input():
    model = SEGMENTATION_MODELS["danet_small"](4).eval()
    module, inp = model.attention_input(torch.randn(1, 3, 32, 48), "pam")
    assert isinstance(module, attnzoo.get("pam")) and inp.shape == (1, 32, 4, 6)
    torch.testing.assert_close(module.attention_map(inp).sum(-1), torch.ones(1, 24))
    with pytest.raises(ValueError, match="branch"):
        model.attention_input(torch.randn(1, 3, 32, 32), "main")


def test_branch_is_reduce_attention_refine():
    b = _Branch(16, 4, nn.Identity(), 3, 0.1)
    assert [type(m) for m in b.reduce] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert b.reduce[0].kernel_size == (3, 3) and b.reduce[0].bias is None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(preset="paper"), "preset"),
        (dict(attention="no_such_module"), "no_such_module"),
        (dict(attention_kwargs={"groups": 2}), "attention_kwargs"),
        (dict(output_stride=4), "output_stride"),
        (dict(multi_grid=(1, 2, 4)), "multi_grid"),
        (dict(backbone="vgg16"), "name must be one of"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises((ValueError, KeyError), match=match):
        DANet(5, **{"backbone": "small", **kwargs})


def test_builders():
    assert set(SEGMENTATION_MODELS) == {"danet_small", "danet_resnet50", "danet_resnet101"}
    with torch.device("meta"):
        m = SEGMENTATION_MODELS["danet_resnet50"](21, attention="cam", preset="mmseg")
    assert isinstance(m, DANet) and m.aux_head is not None and m.head.attention == "cam"


def test_backbone_weights_are_loaded_strictly():
    from torchvision.models import resnet50

    with torch.device("meta"):
        state = resnet50().state_dict()
        trunk = attnzoo.segmentation.dilated_resnet("resnet50", weights=state)
        assert trunk.conv1.weight.shape == state["conv1.weight"].shape
        with pytest.raises(RuntimeError, match="Missing key"):
            attnzoo.segmentation.dilated_resnet(
                "resnet50", weights={k: v for k, v in state.items() if k != "conv1.weight"}
            )
    with pytest.raises(ValueError, match="no pretrained weights"):
        attnzoo.segmentation.dilated_resnet("small", weights=state)
