"""NAM: reference formula (channel and spatial, train and eval, forward and gradients), the
official detached weights, parameter counts, errors, attention maps."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.modules.nam import NAM, nam_param_count
from conftest import assert_matches_reference, randomize_

EPS = 1e-5


def nam_reference(m: NAM, x, training):
    """Channel: sigmoid(|g| / sum|g| * BN(x)) * x; spatial: the same with a per-pixel norm over
    channels and its scale factors, applied to the channel output."""
    bn = m.bn
    if training:
        mean = x.mean((0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean((0, 2, 3), keepdim=True)
    else:
        mean, var = bn.running_mean.view(1, -1, 1, 1), bn.running_var.view(1, -1, 1, 1)
    z = (x - mean) / torch.sqrt(var + EPS) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    w = bn.weight.abs() / bn.weight.abs().sum()
    out = x / (1 + torch.exp(-(z * w.view(1, -1, 1, 1))))
    if m.pn is None:
        return out
    c = out.shape[1]
    mu = out.sum(1, keepdim=True) / c
    sd = torch.sqrt(((out - mu) ** 2).sum(1, keepdim=True) / c + EPS)
    lam, beta = m.pn.weight.view(1, -1, 1, 1), m.pn.bias.view(1, -1, 1, 1)
    p = ((out - mu) / sd * lam + beta) * (lam.abs() / lam.abs().sum())
    return out / (1 + torch.exp(-p))


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("spatial", [False, True])
def test_matches_reference_forward_and_gradients(spatial, train) -> None:
    m = randomize_(NAM(8, spatial=spatial)).double().train(train)
    x = torch.randn(3, 8, 5, 6, dtype=torch.float64)
    assert_matches_reference(m, lambda t: nam_reference(m, t, train), x)


def test_official_detached_weights_same_forward_other_gradient() -> None:
    """The official code reads ``bn.weight.data``: same output, no gradient through W_gamma."""
    ours = randomize_(NAM(8)).double()
    official = randomize_(attnzoo.create("nam", 8, preset="official-code")).double()
    official.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    y, y_off = ours(x), official(x)
    torch.testing.assert_close(y, y_off, rtol=0, atol=0)
    g = torch.randn_like(y)
    (gw,) = torch.autograd.grad(y, ours.bn.weight, g)
    (gw_off,) = torch.autograd.grad(y_off, official.bn.weight, g)
    assert not torch.allclose(gw, gw_off)
    with torch.no_grad():  # the official gradient: W_gamma held fixed
        w = official.bn.weight.abs() / official.bn.weight.abs().sum()
    bn = official.bn
    mean = x.mean((0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean((0, 2, 3), keepdim=True)
    gamma = bn.weight.detach().clone().requires_grad_()
    z = (x - mean) / torch.sqrt(var + EPS) * gamma.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    (want,) = torch.autograd.grad(x * torch.sigmoid(z * w.view(1, -1, 1, 1)), gamma, g)
    torch.testing.assert_close(gw_off, want, rtol=1e-10, atol=1e-12)


def test_official_batchnorm_and_presets() -> None:
    m = NAM(16)
    assert m.bn.affine and m.bn.momentum == 0.1 and m.bn.eps == 1e-5 and m.pn is None
    assert torch.equal(m.bn.weight, torch.ones(16))
    assert attnzoo.create("nam", 16, preset="spatial").pn is not None


@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("channels", [1, 64, 1024])
def test_param_count_closed_form(channels, spatial) -> None:
    expected = (4 if spatial else 2) * channels
    assert nam_param_count(channels, spatial=spatial) == expected
    assert sum(p.numel() for p in NAM(channels, spatial=spatial).parameters()) == expected


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"spatial": "yes"}, TypeError, r"NAM: spatial must be True or False"),
        ({"detach_weights": 0}, TypeError, r"NAM: detach_weights must be True or False"),
    ],
)
def test_bad_arguments(kwargs, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        NAM(8, **kwargs)


def test_spatial_map_needs_spatial() -> None:
    with pytest.raises(ValueError, match=r"NAM: spatial_map needs spatial=True"):
        NAM(4).spatial_map(torch.randn(1, 4, 2, 2))


def test_gate_hooks_and_attention_maps() -> None:
    m = randomize_(NAM(8, spatial=True)).eval()
    seen = {}
    m.gate.register_forward_hook(lambda mod, i, o: seen.setdefault("c", o))
    m.spatial_gate.register_forward_hook(lambda mod, i, o: seen.setdefault("s", o))
    x = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        y = m(x)
        maps = m.attention_maps(x)
    torch.testing.assert_close(y, x * seen["c"] * seen["s"])
    torch.testing.assert_close(maps["channel"], seen["c"].mean((2, 3)))
    torch.testing.assert_close(maps["spatial"], (seen["c"] * seen["s"]).mean(1))
