"""scSE: reference formula (max and sum, forward and gradients), presets, counts, errors, maps."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.modules.scse import SpatialChannelSE, scse_param_count
from conftest import assert_matches_reference, randomize_


def scse_reference(x, w1, b1, w2, b2, wc, bc, combine):
    """cSE and sSE written out with loops over the batch; combined by max or sum."""
    out = torch.empty_like(x)
    for n in range(x.shape[0]):
        z = x[n].sum(dim=(1, 2)) / (x.shape[2] * x.shape[3])
        h = w1 @ z + b1
        h = torch.where(h > 0, h, torch.zeros_like(h))
        s_c = 1 / (1 + torch.exp(-(w2 @ h + b2)))  # (C,)
        s_s = 1 / (1 + torch.exp(-(torch.einsum("c,chw->hw", wc, x[n]) + bc)))  # (H, W)
        a, b = x[n] * s_c[:, None, None], x[n] * s_s[None]
        out[n] = torch.where(a >= b, a, b) if combine == "max" else a + b
    return out


def _weights(m: SpatialChannelSE):
    return (
        m.fc1.weight,
        m.fc1.bias,
        m.fc2.weight,
        m.fc2.bias,
        m.conv.weight[0, :, 0, 0],
        m.conv.bias[0],
    )


@pytest.mark.parametrize(
    "kwargs", [{}, {"combine": "sum"}, {"reduction": 16, "combine": "sum"}, {"reduction": 4}]
)
def test_matches_reference_forward_and_gradients(kwargs) -> None:
    m = randomize_(SpatialChannelSE(32, **kwargs)).double()
    x = torch.randn(3, 32, 5, 7, dtype=torch.float64)
    assert_matches_reference(m, lambda t: scse_reference(t, *_weights(m), m.combine), x)


def test_official_default_is_max_and_differs_from_sum() -> None:
    m = randomize_(SpatialChannelSE(16))
    assert m.combine == "max" and m.fc1.out_features == 8  # reduction 2
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        y_max = m(x)
        m.combine = "sum"
        y_sum = m(x)
    assert not torch.allclose(y_max, y_sum)


def test_smp_preset() -> None:
    m = attnzoo.create("scse", 64, preset="smp")
    assert m.fc1.out_features == 4 and m.combine == "sum"


@pytest.mark.parametrize("kwargs", [{}, {"reduction": 16}, {"reduction": 1}])
@pytest.mark.parametrize("channels", [1, 3, 64, 256])
def test_param_count_closed_form(channels, kwargs) -> None:
    m = SpatialChannelSE(channels, **kwargs)
    h = max(1, channels // kwargs.get("reduction", 2))
    expected = 2 * channels * h + h + channels + channels + 1
    assert scse_param_count(channels, **kwargs) == expected
    assert sum(p.numel() for p in m.parameters()) == expected


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"reduction": 0}, ValueError, r"SpatialChannelSE: reduction must be an integer >= 1"),
        ({"combine": "mul"}, ValueError, r"SpatialChannelSE: combine must be one of 'max', 'sum'"),
    ],
)
def test_bad_arguments(kwargs, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        SpatialChannelSE(8, **kwargs)


def test_gate_hooks_and_attention_maps() -> None:
    m = randomize_(SpatialChannelSE(8, combine="sum")).eval()
    seen = {}
    m.channel_gate.register_forward_hook(lambda mod, i, o: seen.setdefault("c", o))
    m.spatial_gate.register_forward_hook(lambda mod, i, o: seen.setdefault("s", o))
    x = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        y = m(x)
        maps = m.attention_maps(x)
    torch.testing.assert_close(y, x * seen["c"] + x * seen["s"])
    torch.testing.assert_close(maps["channel"], seen["c"].flatten(1))
    torch.testing.assert_close(maps["spatial"], seen["s"][:, 0])
