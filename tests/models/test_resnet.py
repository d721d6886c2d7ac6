"""ResNet-family builders: structure, forward shapes, weights loading, SKNet-50's block."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

import attnzoo
from attnzoo.models import (
    SKBottleneck,
    attached,
    cifar_resnet18,
    resnet18,
    sknet50,
)
from attnzoo.models import resnet as builders

torch.set_num_threads(2)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "resnext50_32x4d",
        "resnext101_32x8d",
        "wide_resnet50_2",
        "wide_resnet101_2",
    ],
)
def test_plain_builders_are_torchvision(name: str) -> None:
    with torch.device("meta"):
        ours = getattr(builders, name)(num_classes=10)
        theirs = getattr(tv_resnet, name)(num_classes=10)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert n_params(ours) == n_params(theirs)


@pytest.mark.parametrize(
    ("name", "after_conv3x3"),
    [
        ("resnet34", [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3),
        ("resnext50_32x4d", [128] * 3 + [256] * 4 + [512] * 6 + [1024] * 3),
        ("wide_resnet50_2", [128] * 3 + [256] * 4 + [512] * 6 + [1024] * 3),
    ],
)
def test_builders_attach_in_every_block(name: str, after_conv3x3: list[int]) -> None:
    with torch.device("meta"):
        model = getattr(builders, name)(attention="se", position="after_conv3x3")
    assert [r.channels for r in attached(model)] == after_conv3x3


def test_forward_shapes_and_options() -> None:
    model = resnet18(attention="cbam", num_classes=7, reduction=8).eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    assert attnzoo.models.attached(model)[0].params == attnzoo.info("cbam").count_params(
        64, reduction=8
    )
    cifar = cifar_resnet18(attention="eca").eval()
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    assert cifar(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    z = resnet18(model_kwargs={"zero_init_residual": True})
    assert not z.layer1[0].bn2.weight.detach().any()
    with pytest.raises(ValueError, match="without attention="):
        resnet18(stages=(1,))
    with pytest.raises(ValueError, match="without attention="):
        resnet18(reduction=8)


def test_weights_argument_loads_plain_and_attached_checkpoints(tmp_path) -> None:
    torch.manual_seed(0)
    plain = tv_resnet.resnet18().state_dict()
    model = resnet18(attention="se", weights=plain)
    for k, v in plain.items():
        assert torch.equal(model.state_dict()[k], v)
    path = tmp_path / "se.pt"
    torch.save(model.state_dict(), path)
    again = resnet18(attention="se", weights=path)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)
    with pytest.raises(RuntimeError, match="does not match"):
        resnet18(attention="se", weights={**plain, "bogus": torch.zeros(1)})


def test_identity_init_builder_matches_plain() -> None:
    torch.manual_seed(0)
    plain = tv_resnet.resnet18().eval()
    model = resnet18(attention="cbam", identity_init=True, weights=plain.state_dict()).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


def _sk_block_ref(b: SKBottleneck, x: torch.Tensor) -> torch.Tensor:
    """Hand-written SK bottleneck: 1x1-BN-ReLU, SK unit, 1x1-BN, + shortcut, ReLU."""
    sk = b.conv2
    h = torch.relu(b.bn1(b.conv1(x)))
    u = [torch.relu(p[1](p[0](h))) for p in sk.paths]
    s = (u[0] + u[1]).mean((2, 3), keepdim=True)
    z = sk.act(sk.bn(sk.fc_reduce(s)))
    logits = sk.fc_select(z).reshape(x.shape[0], 2, -1, 1, 1)
    a = torch.softmax(logits, dim=1)
    v = a[:, 0] * u[0] + a[:, 1] * u[1]
    out = b.bn3(b.conv3(v))
    idt = x if b.downsample is None else b.downsample(x)
    return torch.relu(out + idt)


def test_sknet50_block_and_attach() -> None:
    torch.manual_seed(0)
    model = sknet50(num_classes=5).eval()
    assert isinstance(model.layer2[0], SKBottleneck)
    assert type(model.layer2[0].conv2) is attnzoo.get("sk")
    assert model.layer2[0].conv2.out_channels == 256
    for block in (model.layer1[1], model.layer2[0]):
        for m in block.modules():  # non-trivial BN statistics
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
        x = torch.randn(2, block.conv1.in_channels, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(block(x), _sk_block_ref(block, x), rtol=1e-5, atol=1e-5)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    plain = n_params(model)
    attnzoo.models.attach(model, "se")
    extra = sum(
        n * attnzoo.info("se").count_params(c)
        for c, n in ((256, 3), (512, 4), (1024, 6), (2048, 3))
    )
    assert n_params(model) == plain + extra
    attnzoo.models.attach(model, "eca", position="after_conv3x3")
    rows = [r for r in attached(model) if r.position == "after_conv3x3"]
    assert [r.channels for r in rows][:4] == [128, 128, 128, 256]
    with torch.device("meta"):
        assert n_params(sknet50(attention="se", num_classes=5)) == plain + extra
