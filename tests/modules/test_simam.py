"""SimAM: reference formula (forward and gradients), the H W = 1 guard, presets, errors, maps."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.modules.simam import SimAM, simam_param_count


def simam_reference(x: torch.Tensor, e_lambda: float) -> torch.Tensor:
    """The official formula written out per channel with explicit loops (n = H W - 1 >= 1)."""
    b, c, h, w = x.shape
    out = torch.empty_like(x)
    n = h * w - 1
    for i in range(b):
        for j in range(c):
            t = x[i, j]
            mu = t.sum() / (h * w)
            d = (t - mu) ** 2
            e_inv = d / (4 * (d.sum() / n + e_lambda)) + 0.5
            out[i, j] = t / (1 + torch.exp(-e_inv))
    return out


@pytest.mark.parametrize("e_lambda", [1e-4, 0.1])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 1, 6), (2, 2, 9, 1)])
def test_matches_reference_forward_and_gradients(e_lambda, shape) -> None:
    m = SimAM(shape[1], e_lambda=e_lambda)
    x = torch.randn(*shape, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, ref = m(x1), simam_reference(x2, e_lambda)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x1, g)
    (gr,) = torch.autograd.grad(ref, x2, g)
    torch.testing.assert_close(gx, gr, rtol=1e-10, atol=1e-12)


def test_one_by_one_map_is_guarded() -> None:
    """The official code divides 0 by n = 0 (NaN); here the weight is sigmoid(0.5)."""
    x = torch.randn(3, 8, 1, 1, dtype=torch.float64, requires_grad=True)
    official = x * torch.sigmoid(
        (x - x.mean((2, 3), keepdim=True)) ** 2
        / (4 * ((x - x.mean((2, 3), keepdim=True)) ** 2).sum((2, 3), keepdim=True) / 0 + 1e-4)
        + 0.5
    )
    assert torch.isnan(official).all()
    y = SimAM(8)(x)
    torch.testing.assert_close(y, x * torch.sigmoid(torch.tensor(0.5, dtype=torch.float64)))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_channels_last_and_large_outliers() -> None:
    x = torch.randn(2, 4, 6, 6)
    x[0, 0, 2, 3] = 50.0  # a distinctive neuron gets a weight near 1
    w = SimAM(4).attention_map(x)
    assert w[0, 0, 2, 3] > 0.99 and w.min() >= torch.sigmoid(torch.tensor(0.5)) - 1e-6
    y = SimAM(4)(x.contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_presets_and_param_count() -> None:
    assert attnzoo.create("simam", 64, preset="imagenet").e_lambda == 0.1
    assert attnzoo.create("simam", 64).e_lambda == 1e-4
    assert simam_param_count(64) == 0 == sum(p.numel() for p in SimAM(64).parameters())


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"e_lambda": 0.0}, ValueError, r"SimAM: e_lambda must be a positive number"),
        ({"e_lambda": "big"}, TypeError, r"SimAM: e_lambda must be a positive number"),
    ],
)
def test_bad_arguments(kwargs, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        SimAM(8, **kwargs)


def test_gate_hook_and_attention_maps() -> None:
    m = SimAM(6)
    seen = []
    m.gate.register_forward_hook(lambda mod, inp, out: seen.append(out))
    x = torch.randn(2, 6, 4, 5)
    y = m(x)
    torch.testing.assert_close(y, x * seen[0])
    maps = m.attention_maps(x, query=(1, 1))
    assert maps["spatial"].shape == (2, 4, 5) and maps["channel"].shape == (2, 6)
    torch.testing.assert_close(maps["weights"], seen[0])
    torch.testing.assert_close(maps["spatial"], seen[0].mean(1))
