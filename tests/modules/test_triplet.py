"""TripletAttention: the official permute-based formula (forward and gradients, train and eval),
the 300-parameter count, no_spatial, errors, attention maps."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.modules.triplet import TripletAttention, triplet_param_count
from conftest import assert_matches_reference, randomize_

EPS = 1e-5


def conv_ref(inp, weight):
    """Zero-padded 'same' cross-correlation 2 -> 1 by explicit sums over the kernel."""
    b, cin, h, w = inp.shape
    k = weight.shape[-1]
    p = k // 2
    padded = torch.zeros(b, cin, h + 2 * p, w + 2 * p, dtype=inp.dtype)
    padded[:, :, p : p + h, p : p + w] = inp
    out = torch.zeros(b, 1, h, w, dtype=inp.dtype)
    for ci in range(cin):
        for u in range(k):
            for v in range(k):
                out[:, 0] = out[:, 0] + weight[0, ci, u, v] * padded[:, ci, u : u + h, v : v + w]
    return out


def gate_ref(x, gate, training):
    """The official AttentionGate on an already permuted input: x * sigmoid(BN(conv(ZPool)))."""
    zpool = torch.cat([x.max(1, keepdim=True).values, x.sum(1, keepdim=True) / x.shape[1]], 1)
    z = conv_ref(zpool, gate.conv.weight)
    if training:
        mean = z.mean()
        var = ((z - mean) ** 2).mean()
    else:
        mean, var = gate.bn.running_mean[0], gate.bn.running_var[0]
    z = (z - mean) / torch.sqrt(var + EPS) * gate.bn.weight[0] + gate.bn.bias[0]
    return x / (1 + torch.exp(-z))


def triplet_reference(m: TripletAttention, x, training):
    """The official forward: permute, gate, permute back, average."""
    out1 = gate_ref(x.permute(0, 2, 1, 3).contiguous(), m.cw, training).permute(0, 2, 1, 3)
    out2 = gate_ref(x.permute(0, 3, 2, 1).contiguous(), m.hc, training).permute(0, 3, 2, 1)
    if m.no_spatial:
        return 1 / 2 * (out1 + out2)
    return 1 / 3 * (gate_ref(x, m.hw, training) + out1 + out2)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("kwargs", [{}, {"no_spatial": True}, {"kernel_size": 3}])
def test_matches_official_formula_forward_and_gradients(kwargs, train) -> None:
    m = randomize_(TripletAttention(6, **kwargs)).double().train(train)
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64)  # C, H, W all different
    assert_matches_reference(m, lambda t: triplet_reference(m, t, train), x)


@pytest.mark.parametrize("channels", [1, 64, 2048])
def test_300_parameters_at_k7_whatever_c(channels) -> None:
    assert triplet_param_count(channels) == 300
    assert sum(p.numel() for p in TripletAttention(channels).parameters()) == 300
    assert sum(p.numel() for p in TripletAttention(channels, no_spatial=True).parameters()) == 200
    assert triplet_param_count(channels, kernel_size=3) == 3 * 20
    assert attnzoo.info("triplet").count_params(channels, no_spatial=True) == 200


def test_official_batchnorm_settings() -> None:
    m = TripletAttention(8)
    for gate in (m.cw, m.hc, m.hw):
        assert gate.bn.momentum == 0.01 and gate.bn.eps == 1e-5 and gate.bn.affine
        assert gate.conv.bias is None and gate.conv.padding == (3, 3)
        assert torch.equal(gate.bn.weight, torch.ones(1))


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"kernel_size": 4}, ValueError, r"TripletAttention: kernel_size must be a positive odd"),
        ({"no_spatial": 1}, TypeError, r"TripletAttention: no_spatial must be True or False"),
    ],
)
def test_bad_arguments(kwargs, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        TripletAttention(8, **kwargs)


def test_gate_hooks_and_attention_maps() -> None:
    m = randomize_(TripletAttention(6)).eval()
    seen = {}
    for key in ("cw", "hc", "hw"):
        m.get_submodule(key).gate.register_forward_hook(
            lambda mod, i, o, key=key: seen.setdefault(key, o)
        )
    x = torch.randn(2, 6, 5, 4)
    with torch.no_grad():
        y = m(x)
        maps = m.attention_maps(x)
        full = m.attention_map(x)
    assert seen["cw"].shape == (2, 1, 6, 4) and seen["hc"].shape == (2, 1, 5, 6)
    torch.testing.assert_close(y, x * full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(maps["cw"], seen["cw"][:, 0])
    torch.testing.assert_close(maps["hc"], seen["hc"][:, 0].transpose(1, 2))
    torch.testing.assert_close(maps["hw"], seen["hw"][:, 0])
    torch.testing.assert_close(maps["spatial"], full.mean(1))
    torch.testing.assert_close(maps["channel"], full.mean((2, 3)))
