"""MobileNetV2 builder: the CA / EMA placements after the depthwise conv, and options."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import mobilenet_v2 as tv_mobilenet_v2

from attnzoo.models import HIDDEN_OVER_144, attached, mobilenet_v2

torch.set_num_threads(2)


def test_plain_is_torchvision() -> None:
    with torch.device("meta"):
        ours, theirs = mobilenet_v2(num_classes=10), tv_mobilenet_v2(num_classes=10)
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_ca_placement_expanded_blocks_only() -> None:
    model = mobilenet_v2(attention="ca", select="expanded")
    rows = attached(model)
    assert [r.path for r in rows] == [f"features.{i}.attention_dw" for i in range(2, 18)]
    assert rows[0].channels == 96 and rows[-1].channels == 960
    assert all(r.cls == "CoordinateAttention" for r in rows)
    model.eval()
    assert model(torch.randn(2, 3, 64, 48)).shape == (2, 1000)


def test_ema_placement_hidden_over_144() -> None:
    rows = attached(mobilenet_v2(attention="ema", select=HIDDEN_OVER_144))
    assert [r.channels for r in rows] == [192] * 3 + [384] * 4 + [576] * 3 + [960] * 3
    assert rows[0].path == "features.5.attention_dw"


def test_dw_attention_sees_the_depthwise_output() -> None:
    """The module at features.4 receives ReLU6(BN(dwconv(expand(x)))) on 144 channels."""
    model = mobilenet_v2(attention="se", stages=(3,)).eval()
    seen = []
    block = model.features[4]
    block.attention_dw.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    x = torch.randn(1, 24, 16, 16)
    with torch.no_grad():
        block(x)
        expected = block.conv[1](block.conv[0](x))
    assert seen and torch.equal(seen[0], expected) and expected.shape[1] == 144


def test_options() -> None:
    model = mobilenet_v2(attention="eca", model_kwargs={"width_mult": 0.5}, num_classes=3)
    assert attached(model)[0].channels == 16
    with pytest.raises(ValueError, match="select must be"):
        mobilenet_v2(attention="se", select="wide")
    rows = attached(mobilenet_v2(attention="se", position="before_add"))
    assert rows[0].channels == 16 and rows[-1].channels == 320
