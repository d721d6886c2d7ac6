"""PolarizedSelfAttention: the three documented forms (paper, official PSA_p, official PSA_s)
written out in float64 (forward and gradients), their differences, parameter counts, errors."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.modules.psa import PolarizedSelfAttention, psa_param_count
from conftest import assert_matches_reference, randomize_


def _w(conv: torch.nn.Conv2d) -> torch.Tensor:
    return conv.weight[:, :, 0, 0]


def _softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max())
    return e / e.sum()


def _layer_norm(z: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mu = z.mean()
    var = (z - mu).square().mean()
    return (z - mu) / torch.sqrt(var + ln.eps) * ln.weight.flatten() + ln.bias.flatten()


def _transform(m: PolarizedSelfAttention, c: torch.Tensor) -> torch.Tensor:
    up = m.conv_up
    if isinstance(up, torch.nn.Conv2d):  # official PSA_p
        return _w(up) @ c
    if len(up) == 2:  # paper: W_z then LayerNorm
        return _layer_norm(_w(up[0]) @ c, up[1])
    h = _w(up[0]) @ c + up[0].bias  # official PSA_s: conv, LN, ReLU, conv
    h = torch.clamp_min(_layer_norm(h, up[1]), 0)
    return _w(up[3]) @ h + up[3].bias


def masks_reference(m: PolarizedSelfAttention, x: torch.Tensor) -> tuple:
    """Per image ``X`` ``(C, N)``: ``A_ch`` ``(C,)`` and ``A_sp`` ``(N,)`` by the equations."""
    a_ch = []
    a_sp = []
    for img in x.flatten(2):
        w = _softmax((_w(m.conv_q_right) @ img)[0])  # (N,)
        a_ch.append(torch.sigmoid(_transform(m, _w(m.conv_v_right) @ img @ w)))
        g = (_w(m.conv_q_left) @ img).mean(1)  # (C/2,)
        t = _w(m.conv_v_left) @ img  # (C/2, N)
        if m.spatial_softmax == "product":
            s = _softmax(g @ t)
        elif m.spatial_softmax == "value":
            s = g @ torch.stack([_softmax(row) for row in t])
        else:
            s = _softmax(g) @ t
        a_sp.append(torch.sigmoid(s))
    return torch.stack(a_ch), torch.stack(a_sp)


def psa_reference(m: PolarizedSelfAttention, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    a_ch, a_sp = masks_reference(m, x)
    if m.layout == "parallel":
        return x * a_ch.view(b, c, 1, 1) + x * a_sp.view(b, 1, h, w)
    z = x * a_ch.view(b, c, 1, 1)
    _, a_sp = masks_reference(m, z)
    return z * a_sp.view(b, 1, h, w)


CONFIGS = [
    ("official (PSA_p)", {}),
    ("official-sequential (PSA_s)", attnzoo.info("psa").presets["official-sequential"]),
    ("paper", attnzoo.info("psa").presets["paper"]),
    ("paper, sequential", {**attnzoo.info("psa").presets["paper"], "layout": "sequential"}),
    ("value softmax, parallel", {"spatial_softmax": "value"}),
]


@pytest.mark.parametrize(("label", "kwargs"), CONFIGS, ids=[c[0] for c in CONFIGS])
def test_matches_reference_forward_and_gradients(label: str, kwargs: dict) -> None:
    m = randomize_(PolarizedSelfAttention(16, **kwargs)).double()
    for size in ((3, 5), (1, 1)):
        x = torch.randn(2, 16, *size, dtype=torch.float64)
        assert_matches_reference(m, lambda t: psa_reference(m, t), x)


def test_the_three_spatial_forms_differ() -> None:
    """Same weights, three spatial masks: softmax of the products over positions (PSA_p),
    softmax of the values over positions (PSA_s), softmax of the pooled query over channels
    (paper). Only PSA_p's mask is a sigmoid of a distribution over positions."""
    base = randomize_(PolarizedSelfAttention(16)).double()
    x = torch.randn(2, 16, 4, 6, dtype=torch.float64)
    spatial = {}
    for form in ("product", "value", "channel"):
        m = PolarizedSelfAttention(16, spatial_softmax=form).double()
        m.load_state_dict(base.state_dict())
        spatial[form] = m.spatial_mask(x)
    assert not torch.allclose(spatial["product"], spatial["value"])
    assert not torch.allclose(spatial["product"], spatial["channel"])
    assert not torch.allclose(spatial["value"], spatial["channel"])
    logits = torch.logit(spatial["product"]).flatten(1)
    torch.testing.assert_close(logits.sum(1), torch.ones(2, dtype=torch.float64))


def test_official_structure_and_initialisation() -> None:
    p = PolarizedSelfAttention(64)
    assert isinstance(p.conv_up, torch.nn.Conv2d) and p.conv_up.bias is None  # no LayerNorm
    assert p.conv_v_right.out_channels == p.conv_q_left.out_channels == 32
    assert p.conv_q_right.out_channels == 1
    assert all(c.bias is None for c in (p.conv_q_right, p.conv_v_right, p.conv_q_left))
    s = attnzoo.create("psa", 64, preset="official-sequential")
    assert [type(t).__name__ for t in s.conv_up] == ["Conv2d", "LayerNorm", "ReLU", "Conv2d"]
    assert s.conv_up[0].out_channels == 8 and s.conv_up[0].bias is not None
    paper = attnzoo.create("psa", 64, preset="paper")
    assert isinstance(paper.conv_up[1], torch.nn.LayerNorm)
    assert paper.conv_up[1].normalized_shape == (64, 1, 1)
    # Kaiming-normal fan_in: std sqrt(2 / 64)
    torch.manual_seed(0)
    big = PolarizedSelfAttention(1024)
    assert abs(big.conv_v_left.weight.std().item() - (2 / 1024) ** 0.5) < 2e-3


@pytest.mark.parametrize("channels", [1, 2, 16, 64, 512])
@pytest.mark.parametrize("preset", sorted(attnzoo.info("psa").presets))
def test_param_counts(channels: int, preset: str) -> None:
    kwargs = attnzoo.info("psa").presets[preset]
    m = PolarizedSelfAttention(channels, **kwargs)
    assert psa_param_count(channels, **kwargs) == sum(p.numel() for p in m.parameters())


def test_param_count_values() -> None:
    # C = 512, i = 256: four convs 512 * (1 + 768); W_z 256 * 512
    assert psa_param_count(512) == 512 * 769 + 256 * 512
    # PSA_s bottleneck r = 64: 256 * 64 + 64 + 128 + 64 * 512 + 512
    assert psa_param_count(512, channel_transform="bottleneck") == 512 * 769 + 49856


def test_masks_and_attention_maps() -> None:
    for preset in ("official", "official-sequential"):
        m = randomize_(attnzoo.create("psa", 16, preset=preset)).eval()
        x = torch.randn(2, 16, 5, 3)
        a_ch, a_sp = m.masks(x)
        assert a_ch.shape == (2, 16, 1, 1) and a_sp.shape == (2, 1, 5, 3)
        if m.layout == "parallel":
            torch.testing.assert_close(m(x), x * a_ch + x * a_sp)
        else:
            torch.testing.assert_close(m(x), x * a_ch * a_sp)
        maps = m.attention_maps(x, query=(1, 1))
        torch.testing.assert_close(maps["spatial"], a_sp[:, 0])
        torch.testing.assert_close(maps["channel"], a_ch.flatten(1))


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"layout": "stacked"}, "layout"),
        ({"spatial_softmax": "pixel"}, "spatial_softmax"),
        ({"channel_transform": "mlp"}, "channel_transform"),
    ],
)
def test_bad_arguments(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=rf"PolarizedSelfAttention.*{argument}"):
        PolarizedSelfAttention(64, **kwargs)
