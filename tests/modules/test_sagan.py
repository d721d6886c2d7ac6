"""SAGAN self-attention: both variants equal a naive N x N formula (forward and gradients, float64),
identity at init, pooled keys on odd maps, no N x M tensor, argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pixel_pair_helpers import LargestTensor, assert_same_forward_and_grads

import attnzoo
from attnzoo.modules.sagan import SAGANSelfAttention, sagan_param_count
from conftest import randomize_


def naive_sagan(m: SAGANSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """The PyTorch port's form (``Self_Attn``) and, for ``tf``, the TF code's
    ``sn_non_local_block_sim`` without spectral norm: energy q^T k, softmax over keys, bmm."""
    B, C, H, W = x.shape
    q = F.conv2d(x, m.query_conv.weight, m.query_conv.bias)
    k = F.conv2d(x, m.key_conv.weight, m.key_conv.bias)
    v = F.conv2d(x, m.value_conv.weight, m.value_conv.bias)
    if m.variant == "tf":
        k = F.max_pool2d(k, 2, 2, ceil_mode=m.pool_ceil_mode)
        v = F.max_pool2d(v, 2, 2, ceil_mode=m.pool_ceil_mode)
    q = q.reshape(B, q.shape[1], -1).permute(0, 2, 1)  # B x N x d
    k = k.reshape(B, k.shape[1], -1)  # B x d x M
    attention = torch.softmax(torch.bmm(q, k), dim=-1)  # B x N x M
    v = v.reshape(B, v.shape[1], -1)  # B x Cv x M
    out = torch.bmm(v, attention.permute(0, 2, 1)).reshape(B, -1, H, W)
    if m.variant == "tf":
        out = F.conv2d(out, m.out_conv.weight)
    return m.gamma * out + x


def build(channels: int = 16, **kw) -> SAGANSelfAttention:
    torch.manual_seed(0)
    return randomize_(SAGANSelfAttention(channels, **kw)).double()


# floor pooling needs H, W >= 2 (see test_floor_pooling_explains); ceil_mode only matters for tf
CASES = (
    [("pytorch", s, True) for s in ((6, 8), (5, 7), (1, 1), (1, 6))]
    + [("tf", s, True) for s in ((6, 8), (5, 7), (1, 1), (1, 6))]
    + [("tf", s, False) for s in ((6, 8), (5, 7))]
)


@pytest.mark.parametrize(("variant", "spatial", "ceil"), CASES)
def test_matches_naive_formula_float64(variant: str, spatial: tuple[int, int], ceil: bool) -> None:
    m = build(variant=variant, pool_ceil_mode=ceil)
    x = torch.randn(2, 16, *spatial, dtype=torch.float64)
    assert_same_forward_and_grads(m, lambda t: naive_sagan(m, t), x)


@pytest.mark.parametrize("channels", [1, 3, 8, 12])
@pytest.mark.parametrize("variant", ["pytorch", "tf"])
def test_small_channel_counts(channels: int, variant: str) -> None:
    """C // 8 and C // 2 are guarded to at least 1."""
    m = build(channels, variant=variant)
    assert m.query_conv.out_channels == max(1, channels // 8)
    value_width = channels if variant == "pytorch" else max(1, channels // 2)
    assert m.value_conv.out_channels == value_width
    x = torch.randn(2, channels, 5, 4, dtype=torch.float64)
    assert_same_forward_and_grads(m, lambda t: naive_sagan(m, t), x)


def test_tf_variant_shapes_follow_the_tf_code() -> None:
    """brain-research/self-attention-gan non_local.py: theta/phi C/8, g C/2, both pooled 2x2,
    attn conv C/2 -> C, sigma 0, sn_conv1x1 has no bias."""
    m = SAGANSelfAttention(64, variant="tf")
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {
        "query_conv.weight": (8, 64, 1, 1),
        "key_conv.weight": (8, 64, 1, 1),
        "value_conv.weight": (32, 64, 1, 1),
        "out_conv.weight": (64, 32, 1, 1),
        "gamma": (1,),
    }
    x = torch.randn(1, 64, 8, 6)
    assert m.attention_map(x).shape == (1, 48, 12)  # keys pooled 2x2
    assert m.attention_map(torch.randn(1, 64, 7, 5)).shape == (1, 35, 4 * 3)  # ceil on odd maps


def test_pytorch_variant_shapes_follow_the_port() -> None:
    m = SAGANSelfAttention(64)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {
        "query_conv.weight": (8, 64, 1, 1),
        "query_conv.bias": (8,),
        "key_conv.weight": (8, 64, 1, 1),
        "key_conv.bias": (8,),
        "value_conv.weight": (64, 64, 1, 1),
        "value_conv.bias": (64,),
        "gamma": (1,),
    }


@pytest.mark.parametrize("variant", ["pytorch", "tf"])
def test_attention_map_rows_are_softmax(variant: str) -> None:
    m = build(variant=variant).eval()
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    a = m.attention_map(x)
    q = F.conv2d(x, m.query_conv.weight, m.query_conv.bias).flatten(2)
    k = F.conv2d(x, m.key_conv.weight, m.key_conv.bias)
    if variant == "tf":
        k = F.max_pool2d(k, 2, 2, ceil_mode=True)
    expected = torch.softmax(torch.einsum("bdn,bdm->bnm", q, k.flatten(2)), -1)
    torch.testing.assert_close(a, expected, atol=1e-12, rtol=1e-10)
    assert isinstance(m(x), torch.Tensor)  # forward returns a tensor, never (out, attention)


@pytest.mark.parametrize("variant", ["pytorch", "tf"])
def test_identity_at_init(variant: str) -> None:
    m = SAGANSelfAttention(16, variant=variant)
    assert m.gamma.item() == 0.0
    x = torch.randn(2, 16, 7, 5)
    with torch.no_grad():
        assert torch.equal(m(x), x)


@pytest.mark.parametrize("variant", ["pytorch", "tf"])
def test_no_pairwise_tensor_in_forward_and_backward(variant: str) -> None:
    m = randomize_(SAGANSelfAttention(16, variant=variant))
    h, w = 32, 32
    n = h * w
    keys = n if variant == "pytorch" else n // 4
    x = torch.randn(2, 16, h, w, requires_grad=True)
    with LargestTensor() as spy:
        m(x).square().sum().backward()
    assert spy.numel < 2 * n * keys // 8, f"{spy.op} produced {spy.numel} elements"


def test_floor_pooling_explains() -> None:
    m = SAGANSelfAttention(16, variant="tf", pool_ceil_mode=False)
    with pytest.raises(ValueError, match="SAGANSelfAttention.*pool_ceil_mode"):
        m(torch.randn(1, 16, 1, 5))


def test_presets_and_param_count() -> None:
    assert attnzoo.info("sagan").presets["tf"] == {"variant": "tf"}
    for channels in (1, 7, 64):
        for variant in ("pytorch", "tf"):
            m = SAGANSelfAttention(channels, variant=variant)
            assert sagan_param_count(channels, variant=variant) == sum(
                p.numel() for p in m.parameters()
            )


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"variant": "keras"}, ValueError, "SAGANSelfAttention: variant must be one of"),
        ({"reduction": 0}, ValueError, "SAGANSelfAttention: reduction must be an integer >= 1"),
        ({"reduction": 8.0}, TypeError, "SAGANSelfAttention: reduction"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        SAGANSelfAttention(16, **kwargs)
