"""attnzoo.viz.cam: the grad-cam wrapper (range, size, target layer, targets, no side effects,
and that the maps localise on hand-built models with a known answer)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v2 as tv_mobilenet_v2
from torchvision.models import resnet18 as tv_resnet18

from attnzoo.models import SmallResNet, cifar_resnet8, cifar_resnet18, mobilenet_v2
from attnzoo.viz import CAM_METHODS, cam, default_target_layer, energy_in_box, pointing_game
from conftest import randomize_

pytest.importorskip("pytorch_grad_cam")
torch.set_num_threads(2)


def net8(attention: str | None = "se", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cifar_resnet8(attention).eval()


def images(b: int = 2, h: int = 32, w: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# default target layer
def test_default_target_layers():
    m8 = net8()
    assert default_target_layer(m8) is m8.layer3
    small4 = SmallResNet(widths=(8, 8, 8, 8), blocks=(1, 1, 1, 1), strides=(1, 2, 2, 2))
    assert default_target_layer(small4) is small4.layer4
    tv = tv_resnet18()
    assert default_target_layer(tv) is tv.layer4
    c18 = cifar_resnet18("cbam")
    assert default_target_layer(c18) is c18.layer4
    mb = mobilenet_v2("ca", num_classes=10)
    assert default_target_layer(mb) is mb.features[-1]
    assert default_target_layer(tv_mobilenet_v2()) is not None


def test_default_target_layer_timm_resnet():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    assert default_target_layer(model) is model.layer4


def test_unknown_model_needs_target_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match="target_layer"):
        default_target_layer(model)
    with pytest.raises(ValueError, match="target_layer"):
        cam(model, images())


# ---------------------------------------------------------------------------------------------
# range and size
CASES = [
    ("cifar_resnet8", "gradcam"),
    ("cifar_resnet8", "GradCAM++"),
    ("cifar_resnet8", "eigencam"),
    ("cifar_resnet8", "layercam"),
    ("cifar_resnet8", "xgradcam"),
    ("cifar_resnet8", "hirescam"),
    ("resnet18", "gradcam"),
    ("resnet18", "gradcam++"),
    ("resnet18", "eigencam"),
    ("mobilenet_v2", "gradcam"),
    ("mobilenet_v2", "layercam"),
    ("mobilenet_v2", "eigencam"),
]


def build(kind: str) -> tuple[nn.Module, torch.Tensor]:
    # randomize_: well-scaled random weights and BN statistics. (The default initialisation of
    # a deep MobileNetV2 in eval mode gives logits ~1e-14, whose CAMs are so small that
    # grad-cam's min-max scaling, ``cam / (max + 1e-7)``, peaks well below 1.)
    torch.manual_seed(0)
    if kind == "cifar_resnet8":
        model, x = cifar_resnet8("cbam"), images(2, 32, 40)  # non-square catches H/W swaps
    elif kind == "resnet18":  # layer4 at stride 32: 2 x 3 cells
        model, x = tv_resnet18(num_classes=10), images(2, 64, 96)
    else:
        model, x = mobilenet_v2("ca", num_classes=10), images(2, 64, 96)
    return randomize_(model).eval(), x


@pytest.mark.parametrize("kind, method", CASES)
def test_cam_range_and_image_size(kind, method):
    model, x = build(kind)
    out = cam(model, x, method=method)
    assert out.shape == (2, *x.shape[-2:]) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # min-max scaled per image: each map spans [0, 1] (a flat or zero map would not)
    torch.testing.assert_close(out.flatten(1).amax(1), torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.flatten(1).amin(1), torch.zeros(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_every_method_runs_on_cifar_resnet8(method):
    model = net8("eca")
    out = cam(model, images(1), method=method)
    assert out.shape == (1, 32, 32) and 0.0 <= float(out.min()) <= float(out.max()) <= 1.0
    assert float(out.max()) > 0.99


def test_unknown_method_lists_the_choices():
    with pytest.raises(ValueError, match="gradcam.*scorecam"):
        cam(net8(), images(), method="gradkam")


# ---------------------------------------------------------------------------------------------
# target layers and targets
def test_string_and_module_layers_agree_and_layers_differ():
    model, x = net8(), images()
    by_module = cam(model, x, target_layer=model.layer2)
    by_path = cam(model, x, target_layer="layer2")
    torch.testing.assert_close(by_module, by_path, rtol=0, atol=0)
    default = cam(model, x)
    torch.testing.assert_close(default, cam(model, x, target_layer="layer3"), rtol=0, atol=0)
    assert (by_module - default).abs().max() > 0.1
    dotted = cam(model, x, target_layer="layer2.0.attention")
    assert dotted.shape == (2, 32, 32)


def test_bad_layers():
    model = net8()
    with pytest.raises(ValueError, match="no module 'layer9'"):
        cam(model, images(), target_layer="layer9")
    with pytest.raises(ValueError, match="not part of the model"):
        cam(model, images(), target_layer=nn.ReLU())
    with pytest.raises(TypeError, match="target_layer"):
        cam(model, images(), target_layer=3)


def test_targets_honoured():
    model, x = net8(), images(3)
    with torch.no_grad():
        pred = model(x).argmax(1)
    predicted = cam(model, x)
    torch.testing.assert_close(predicted, cam(model, x, targets=pred), rtol=0, atol=0)
    torch.testing.assert_close(predicted, cam(model, x, targets=pred.tolist()), rtol=0, atol=0)
    a, b = cam(model, x, targets=0), cam(model, x, targets=[1, 1, 1])
    assert (a - b).abs().amax((1, 2)).min() > 0.05  # every image's map changes with the class
    mixed = cam(model, x, targets=torch.tensor([0, 1, 0]))
    torch.testing.assert_close(mixed[0], a[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], b[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "targets, error",
    [
        ([0, 1], ValueError),
        (torch.tensor([[0, 1, 2]]), ValueError),
        (torch.tensor([0.0, 1.0, 2.0]), ValueError),
        ([0, -1, 0], ValueError),
        ("1", TypeError),
        ([0, True, 1], TypeError),
    ],
)
def test_bad_targets(targets, error):
    with pytest.raises(error, match="targets|target"):
        cam(net8(), images(3), targets=targets)


# ---------------------------------------------------------------------------------------------
# no side effects
def test_model_state_restored():
    model = net8("cbam").train()
    model.layer1.eval()  # mixed modes survive
    model.conv1.weight.requires_grad_(False)
    model.fc.weight.grad = torch.full_like(model.fc.weight, 7.0)
    grad_ref = model.fc.weight.grad
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = images()
    x_before = x.clone()
    cam(model, x, method="gradcam++")
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.fc.weight.grad is grad_ref and bool((grad_ref == 7.0).all())
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc.weight")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # eval mode inside: no BN statistics update
    for n, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks, n
    assert torch.equal(x, x_before) and not x.requires_grad


@pytest.mark.parametrize(
    "x, targets, error",
    [
        (torch.randn(2, 4, 32, 32), None, "channels"),  # wrong channel count: the forward fails
        # a class index beyond the logits: grad-cam's context manager would swallow the IndexError
        (torch.randn(2, 3, 32, 32), 10, "gradcam failed: IndexError"),
    ],
)
def test_restored_on_error(x, targets, error):
    model = net8().train()
    with pytest.raises(RuntimeError, match=error):
        cam(model, x, targets=targets)
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    for n, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, n


def test_works_under_no_grad():
    model, x = net8(), images()
    want = cam(model, x)
    with torch.no_grad():
        torch.testing.assert_close(cam(model, x), want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# the maps localise on models with a known answer
class PatchNet(nn.Module):
    """Logit 0 grows with the (positive) image intensity; the target layer is 4x coarser."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.act = nn.ReLU()
        self.pool = nn.AvgPool2d(4)
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 3)
            self.conv.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[1.0] * 4, [-1.0] * 4]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.pool(self.act(self.conv(x))).mean((2, 3)))


def test_gradcam_localises_a_bright_patch_after_upsampling():
    x = torch.zeros(2, 3, 32, 48)
    boxes = torch.tensor([[20, 4, 28, 12], [4, 20, 12, 28]])  # (x0, y0, x1, y1)
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        x[i, :, y0:y1, x0:x1] = 1.0
    model = PatchNet()
    out = cam(model, x, target_layer="pool", targets=0)  # 8 x 12 cells upsampled to 32 x 48
    assert out.shape == (2, 32, 48)
    assert pointing_game(out, boxes).all()
    assert (energy_in_box(out, boxes) > 0.5).all()
    # swapped boxes (the other image's patch) are missed: the maps are not in the same place
    assert not pointing_game(out, boxes.flip(0)).any()


class RegionNet(nn.Module):
    """The logits depend on the features inside ``region`` only."""

    def __init__(self, region: tuple[int, int, int, int]) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(6, 2)
        mask = torch.zeros(1, 1, 32, 32)
        x0, y0, x1, y1 = region
        mask[..., y0:y1, x0:x1] = 1.0
        self.register_buffer("mask", mask)

    def forward(self, x):
        return self.fc((self.act(self.conv(x)) * self.mask).sum((2, 3)))


@pytest.mark.parametrize("method", ["hirescam", "layercam"])
def test_elementwise_cams_put_all_mass_in_the_region_the_logit_reads(method):
    region = (18, 3, 27, 10)
    model = RegionNet(region)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) + 0.1
    boxes = torch.tensor([region, region])
    out = cam(model, x, method=method, target_layer=model.act)
    assert pointing_game(out, boxes).all()
    torch.testing.assert_close(energy_in_box(out, boxes), torch.ones(2))
    # the same maps against another region: no mass there
    assert (energy_in_box(out, torch.tensor([[0, 16, 16, 32]] * 2)) == 0).all()


# ---------------------------------------------------------------------------------------------
# optional dependency
def test_missing_grad_cam_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)
    with pytest.raises(ImportError, match=r'pip install "attnzoo\[viz\]"'):
        cam(net8(), images())


def test_importing_attnzoo_and_viz_imports_no_optional_dependency():
    code = (
        "import sys, attnzoo, attnzoo.viz; "
        "bad = [m for m in ('pytorch_grad_cam', 'matplotlib', 'cv2') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
