"""MultiSpectralAttention (FcaNet): the official formula (adaptive pooling only when the size
differs, DCT filter bank, bias-free MLP) in float64, forward and gradients; frequency selections;
parameter counts; errors; dynamic-size export."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.modules.fca import (
    FREQ_SEL_METHODS,
    MultiSpectralAttention,
    dct_filters,
    fca_param_count,
    frequency_indices,
)
from conftest import assert_matches_reference, randomize_


def dct_bank(channels: int, h: int, w: int, us: list[int], vs: list[int]) -> torch.Tensor:
    """2-D DCT-II basis images, orthonormal scaling, frequencies scaled from 7x7 to ``(h, w)``."""

    def basis(n: int, f: int) -> torch.Tensor:
        t = torch.arange(n, dtype=torch.float64)
        b = torch.cos(math.pi * f * (t + 0.5) / n) / math.sqrt(n)
        return b * (math.sqrt(2) if f else 1.0)

    part = channels // len(us)
    rows = [
        basis(h, u * (h // 7))[:, None] * basis(w, v * (w // 7))[None, :] for u, v in zip(us, vs)
    ]
    return torch.stack(rows).repeat_interleave(part, dim=0)


def fca_reference(m: MultiSpectralAttention, x: torch.Tensor) -> torch.Tensor:
    """Official forward: pool to (dct_h, dct_w) only if needed, DCT squeeze, FC-ReLU-FC-sigmoid."""
    h, w = m.dct_h, m.dct_w
    pooled = x if x.shape[2:] == (h, w) else F.adaptive_avg_pool2d(x, (h, w))
    us, vs = frequency_indices(m.freq_sel_method)
    bank = dct_bank(x.shape[1], h, w, us, vs).float().double()  # a float32 buffer, as official
    freq = (pooled * bank).sum((2, 3))
    z = torch.clamp_min(freq @ m.fc[0].weight.T, 0) @ m.fc[2].weight.T
    return x / (1 + torch.exp(-z))[:, :, None, None]


@pytest.mark.parametrize(
    ("method", "dct_size"), [("top16", 7), ("low4", 7), ("bot32", 7), ("top16", 14), ("top1", 7)]
)
def test_matches_reference_forward_and_gradients(method: str, dct_size: int) -> None:
    m = randomize_(MultiSpectralAttention(32, freq_sel_method=method, dct_size=dct_size)).double()
    for size in ((dct_size, dct_size), (5, 9), (1, 1), (16, 11)):
        x = torch.randn(2, 32, *size, dtype=torch.float64)
        assert_matches_reference(m, lambda t: fca_reference(m, t), x)


def test_filter_bank_and_official_selection() -> None:
    us, vs = frequency_indices("top16")
    assert list(zip(us, vs))[:4] == [(0, 0), (0, 1), (6, 0), (0, 5)]
    assert list(zip(*frequency_indices("low4"))) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert list(zip(*frequency_indices("bot1"))) == [(6, 6)]
    assert len(FREQ_SEL_METHODS) == 18
    bank = dct_filters(32, (7, 7), "top16").double()
    torch.testing.assert_close(bank, dct_bank(32, 7, 7, us, vs), rtol=1e-7, atol=1e-7)
    # orthonormal: the 49 basis images of a 7x7 DCT are orthonormal; (0, 0) is a scaled mean
    flat = dct_bank(49, 7, 7, [u for u in range(7) for _ in range(7)], list(range(7)) * 7)
    eye = torch.eye(49, dtype=torch.float64)
    torch.testing.assert_close(flat.flatten(1) @ flat.flatten(1).T, eye)
    mean_filter = torch.full((7, 7), 1 / 7, dtype=torch.float64)
    torch.testing.assert_close(bank[0], mean_filter, rtol=1e-7, atol=1e-7)


def test_top1_is_se_squeeze_up_to_scale() -> None:
    """With only frequency (0, 0) and a 7x7 input the squeeze is 7 x the mean (GAP)."""
    m = randomize_(MultiSpectralAttention(16, freq_sel_method="top1")).double()
    x = torch.randn(2, 16, 7, 7, dtype=torch.float64)
    z = torch.clamp_min(7 * x.mean((2, 3)) @ m.fc[0].weight.T, 0) @ m.fc[2].weight.T
    torch.testing.assert_close(m(x), x * torch.sigmoid(z)[:, :, None, None])


def test_official_names_and_buffer() -> None:
    m = MultiSpectralAttention(512, dct_size=7)  # FcaNet-50 stage 4: planes 512, 7x7
    assert set(m.state_dict()) == {"dct_layer.weight", "fc.0.weight", "fc.2.weight"}
    assert m.dct_layer.weight.shape == (512, 7, 7)
    assert not any(p is m.dct_layer.weight for p in m.parameters())
    assert m.fc[0].bias is None and m.fc[0].out_features == 32
    assert m.gate is m.fc[3]


@pytest.mark.parametrize("channels", [16, 64, 256, 2048])
def test_param_counts(channels: int) -> None:
    for kwargs in ({}, {"reduction": 4}, {"freq_sel_method": "low8", "dct_size": 14}):
        m = MultiSpectralAttention(channels, **kwargs)
        assert fca_param_count(channels, **kwargs) == sum(p.numel() for p in m.parameters())
    assert fca_param_count(channels) == 2 * channels * channels // 16


def test_attention_maps() -> None:
    m = randomize_(attnzoo.create("fca", 32)).eval()
    x = torch.randn(3, 32, 9, 4)
    maps = m.attention_maps(x, query=(0.5, 0.5))
    assert set(maps) == {"channel"} and maps["channel"].shape == (3, 32)
    torch.testing.assert_close(x * maps["channel"][:, :, None, None], m(x))


def test_export_at_the_dct_size_stays_dynamic() -> None:
    """Exported at 7x7 (where the official layer does not pool), the program still pools at other
    sizes: the pooling matrices are built from the input's size, there is no branch on it. (ONNX
    export with dynamic sizes is checked for every module by the contract tests.)"""
    m = randomize_(MultiSpectralAttention(16)).double().eval()
    dims = {0: torch.export.Dim("batch", min=1, max=8)}
    dims.update({i: torch.export.Dim(f"s{i}", min=1, max=256) for i in (2, 3)})
    x7 = torch.randn(2, 16, 7, 7, dtype=torch.float64)
    exported = torch.export.export(m, (x7,), dynamic_shapes=(dims,)).module()
    for size in ((7, 7), (13, 30), (3, 2), (1, 1)):
        x = torch.randn(1, 16, *size, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), fca_reference(m, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"freq_sel_method": "top3"}, "freq_sel_method"),
        ({"freq_sel_method": "mid16"}, "freq_sel_method"),
        ({"dct_size": 6}, "dct_size"),
        ({"dct_size": (7, 0)}, "dct_size"),
        ({"reduction": 0}, "reduction"),
    ],
)
def test_bad_arguments(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=rf"MultiSpectralAttention.*{argument}"):
        MultiSpectralAttention(64, **kwargs)


def test_channels_must_split_into_the_frequencies() -> None:
    with pytest.raises(
        ValueError,
        match=r"MultiSpectralAttention: channels \(40\) must be "
        r"divisible by the number of frequencies \(16\)",
    ):
        MultiSpectralAttention(40)
    assert MultiSpectralAttention(40, freq_sel_method="top8").channels == 40
