"""DANet PAM, CAM and DualAttention: naive formulas (float64, forward and gradients), identity at
init, the rowmax trick, bf16 autocast accumulation, no N x N tensor, argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pixel_pair_helpers import LargestTensor, assert_same_forward_and_grads

import attnzoo
from attnzoo.modules.danet import (
    DANetChannelAttention,
    DANetPositionAttention,
    DualAttention,
    cam_param_count,
    dual_attention_param_count,
    pam_param_count,
)
from conftest import randomize_

SIZES = [(6, 8), (5, 7), (1, 1), (13, 2)]


def naive_pam_term(m: DANetPositionAttention, x: torch.Tensor) -> torch.Tensor:
    """PAM_Module of the official code without gamma/residual."""
    B, C, H, W = x.shape
    q = F.conv2d(x, m.query_conv.weight, m.query_conv.bias).reshape(B, -1, H * W).permute(0, 2, 1)
    k = F.conv2d(x, m.key_conv.weight, m.key_conv.bias).reshape(B, -1, H * W)
    attention = torch.softmax(torch.bmm(q, k), dim=-1)
    v = F.conv2d(x, m.value_conv.weight, m.value_conv.bias).reshape(B, -1, H * W)
    return torch.bmm(v, attention.permute(0, 2, 1)).reshape(B, C, H, W)


def naive_cam_term(m: DANetChannelAttention, x: torch.Tensor) -> torch.Tensor:
    """CAM_Module of the official code (with the rowmax(E) - E line) without gamma/residual."""
    B, C, H, W = x.shape
    query = x.reshape(B, C, -1)
    energy = torch.bmm(query, query.permute(0, 2, 1))
    if m.energy == "rowmax_minus":
        energy = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
    attention = torch.softmax(energy, dim=-1)
    return torch.bmm(attention, query).reshape(B, C, H, W)


def build(cls, channels: int = 16, **kw):
    torch.manual_seed(0)
    return randomize_(cls(channels, **kw)).double()


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("spatial", SIZES)
@pytest.mark.parametrize("reduction", [8, 3])
def test_pam_matches_naive_formula(spatial, reduction: int) -> None:
    m = build(DANetPositionAttention, reduction=reduction)
    x = rand(2, 16, *spatial)
    assert_same_forward_and_grads(m, lambda t: m.gamma * naive_pam_term(m, t) + t, x)


@pytest.mark.parametrize("spatial", SIZES)
@pytest.mark.parametrize("energy", ["rowmax_minus", "plain"])
def test_cam_matches_naive_formula(spatial, energy: str) -> None:
    m = build(DANetChannelAttention, energy=energy)
    # scaled input: keeps the plain softmax(E) from being numerically one-hot
    x = rand(2, 16, *spatial) * 0.3
    assert_same_forward_and_grads(m, lambda t: m.gamma * naive_cam_term(m, t) + t, x)


@pytest.mark.parametrize("fusion", ["residual", "sum"])
@pytest.mark.parametrize("spatial", [(6, 8), (5, 7)])
def test_dual_attention_matches_pam_plus_cam(fusion: str, spatial) -> None:
    m = build(DualAttention, fusion=fusion)

    def reference(t: torch.Tensor) -> torch.Tensor:
        pam = m.pam.gamma * naive_pam_term(m.pam, t) + t  # PAM(x)
        cam = m.cam.gamma * naive_cam_term(m.cam, t) + t  # CAM(x)
        return pam + cam - t if fusion == "residual" else pam + cam

    assert_same_forward_and_grads(m, reference, rand(2, 16, *spatial) * 0.3)


def test_rowmax_minus_is_softmax_of_negated_energy() -> None:
    """softmax is shift-invariant per row: the authors' rowmax(E) - E equals softmax(-E)."""
    m = DANetChannelAttention(16).double()
    x = rand(2, 16, 5, 5) * 0.3
    e = torch.einsum("bcn,bdn->bcd", x.flatten(2), x.flatten(2))
    torch.testing.assert_close(m.attention_map(x), torch.softmax(-e, -1), atol=1e-12, rtol=1e-10)
    plain = DANetChannelAttention(16, energy="plain").double()
    torch.testing.assert_close(plain.attention_map(x), torch.softmax(e, -1), atol=1e-12, rtol=1e-10)


def test_attention_maps() -> None:
    x = torch.randn(2, 16, 5, 7)
    pam, cam = DANetPositionAttention(16), DANetChannelAttention(16)
    dual = DualAttention(16)
    assert pam.attention_map(x).shape == (2, 35, 35)
    assert cam.attention_map(x).shape == (2, 16, 16)
    torch.testing.assert_close(pam.attention_map(x).sum(-1), torch.ones(2, 35))
    assert dual.attention_map(x).shape == (2, 35, 35)
    assert dual.cam.attention_map(x).shape == (2, 16, 16)


@pytest.mark.parametrize("name", ["pam", "cam", "dual_attention"])
@pytest.mark.parametrize("train", [False, True])
def test_identity_at_init(name: str, train: bool) -> None:
    m = attnzoo.create(name, 16).train(train)
    x = torch.randn(2, 16, 7, 5)
    with torch.no_grad():
        assert torch.equal(m(x), x)


def test_dual_sum_fusion_is_twice_the_input_at_init() -> None:
    m = DualAttention(16, fusion="sum")
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        assert torch.equal(m(x), 2 * x)


def test_cam_energy_accumulates_in_float32_under_autocast() -> None:
    """Under bf16 autocast, X X^T is still accumulated in float32: the attention equals the
    float32 one (rounding X itself to bf16 is the caller's choice, not done here)."""
    torch.manual_seed(0)
    m = randomize_(DANetChannelAttention(32)).eval()
    x = torch.randn(2, 32, 40, 40) + 1.0  # large positive energies (~ N): bf16 would round them
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = m(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["pam", "dual_attention"])
def test_no_pairwise_tensor_in_forward_and_backward(name: str) -> None:
    m = randomize_(attnzoo.create(name, 16))
    n = 32 * 32
    x = torch.randn(2, 16, 32, 32, requires_grad=True)
    with LargestTensor() as spy:
        m(x).square().sum().backward()
    assert spy.numel < 2 * n * n // 8, f"{spy.op} produced {spy.numel} elements"


def test_param_counts() -> None:
    for c in (1, 7, 64):
        assert pam_param_count(c) == sum(p.numel() for p in DANetPositionAttention(c).parameters())
        assert cam_param_count(c) == 1
        dual = DualAttention(c)
        assert dual_attention_param_count(c) == sum(p.numel() for p in dual.parameters())
    assert DANetPositionAttention(4).query_conv.out_channels == 1  # C // 8 guarded


@pytest.mark.parametrize(
    ("cls", "kwargs", "pattern"),
    [
        (DANetPositionAttention, {"reduction": 0}, "DANetPositionAttention: reduction"),
        (DANetChannelAttention, {"energy": "negated"}, "DANetChannelAttention: energy"),
        (DualAttention, {"fusion": "concat"}, "DualAttention: fusion"),
        (DualAttention, {"energy": "x"}, "DualAttention: energy"),
    ],
)
def test_bad_arguments(cls, kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        cls(16, **kwargs)


@pytest.mark.parametrize("name", ["cam", "dual_attention"])
def test_runs_on_the_meta_device_for_shape_inference(name):
    module = attnzoo.create(name, 16).to("meta")
    assert module(torch.empty(2, 16, 5, 3, device="meta")).shape == (2, 16, 5, 3)
