"""CrissCrossAttention: the official criss-cross formula pixel by pixel (float64, forward and
gradients), recurrence, memory (never N x N), attention maps, parameter counts, errors."""

from __future__ import annotations

import pytest
import torch
from pixel_pair_helpers import LargestTensor, assert_same_forward_and_grads

import attnzoo
from attnzoo.modules.ccnet import CrissCrossAttention, cca_param_count
from conftest import randomize_


def _conv1x1(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x) + conv.bias.view(1, -1, 1, 1)


def cross_weights(m: CrissCrossAttention, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """Weights of pixel ``(i, j)``: ``[column keys h != i..., row keys w...]``, ``(B, H+W-1)``."""
    q, k = _conv1x1(m.query_conv, x), _conv1x1(m.key_conv, x)
    h = x.shape[2]
    column = [(q[:, :, i, j] * k[:, :, r, j]).sum(1) for r in range(h) if r != i]
    row = [(q[:, :, i, j] * k[:, :, i, c]).sum(1) for c in range(x.shape[3])]
    e = torch.stack(column + row, dim=1)
    e = torch.exp(e - e.max(1, keepdim=True).values)
    return e / e.sum(1, keepdim=True)


def one_pass(m: CrissCrossAttention, x: torch.Tensor) -> torch.Tensor:
    """``gamma * out + x`` with the criss-cross sum written out per pixel."""
    v = _conv1x1(m.value_conv, x)
    h, w = x.shape[2:]
    out = torch.zeros_like(x)
    for i in range(h):
        for j in range(w):
            a = cross_weights(m, x, i, j)
            keys = [v[:, :, r, j] for r in range(h) if r != i] + [v[:, :, i, c] for c in range(w)]
            out[:, :, i, j] = sum(a[:, n, None] * kv for n, kv in enumerate(keys))
    return m.gamma * out + x


def cca_reference(m: CrissCrossAttention, x: torch.Tensor) -> torch.Tensor:
    for _ in range(m.recurrence):
        x = one_pass(m, x)
    return x


@pytest.mark.parametrize("recurrence", [1, 2])
@pytest.mark.parametrize("size", [(3, 4), (1, 3), (3, 1), (1, 1)])
def test_matches_reference_forward_and_gradients(recurrence: int, size: tuple[int, int]) -> None:
    m = randomize_(CrissCrossAttention(16, recurrence=recurrence)).double()
    x = torch.randn(2, 16, *size, dtype=torch.float64)
    assert_same_forward_and_grads(m, lambda t: cca_reference(m, t), x)


def test_channels_last_matches() -> None:
    m = randomize_(CrissCrossAttention(16)).double()
    x = torch.randn(2, 16, 4, 3, dtype=torch.float64)
    y = m(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y, cca_reference(m, x), rtol=1e-10, atol=1e-12)


def test_identity_at_initialisation_and_official_names() -> None:
    m = CrissCrossAttention(64)
    assert m.gamma.item() == 0 and m.recurrence == 2
    assert {k.split(".")[0] for k in m.state_dict()} == {
        "query_conv",
        "key_conv",
        "value_conv",
        "gamma",
    }
    assert m.query_conv.out_channels == m.key_conv.out_channels == 8
    x = torch.randn(2, 64, 5, 4)
    assert torch.equal(m(x), x)


def test_memory_is_linear_in_rows_plus_columns() -> None:
    """The largest tensor of a forward and backward is O(N (H + W)), far below N^2."""
    m = randomize_(CrissCrossAttention(8))
    h, w = 16, 12
    n = h * w
    x = torch.randn(1, 8, h, w, requires_grad=True)
    with LargestTensor() as spy:
        m(x).square().sum().backward()
    assert spy.numel <= max(n * (h + w), 8 * n), f"{spy.op} produced {spy.numel} elements"
    assert spy.numel < n * n // 5


def test_attention_maps_point_and_mean() -> None:
    m = randomize_(CrissCrossAttention(16)).double().eval()
    x = torch.randn(2, 16, 4, 5, dtype=torch.float64)
    h, w = 4, 5
    # a point: its column (without itself) and its row, in place
    point = m.attention_maps(x, query=(1, 3))["spatial"]
    a = cross_weights(m, x, 1, 3)
    want = torch.zeros(2, h, w, dtype=torch.float64)
    want[:, [r for r in range(h) if r != 1], 3] = a[:, : h - 1]
    want[:, 1, :] += a[:, h - 1 :]
    torch.testing.assert_close(point, want)
    torch.testing.assert_close(point.sum((1, 2)), torch.ones(2, dtype=torch.float64))
    # fractions resolve to the same pixel as in attnzoo.ops.query
    frac = m.attention_maps(x, query=(0.3, 0.7))["spatial"]
    torch.testing.assert_close(frac, m.attention_maps(x, query=(1, 3))["spatial"])
    # mean over every query pixel
    maps = m.attention_maps(x)
    mean = sum(m.attention_maps(x, query=(i, j))["spatial"] for i in range(h) for j in range(w))
    torch.testing.assert_close(maps["spatial"], mean / (h * w))
    # the second pass, on the output of the first
    second = m.attention_maps(x, query=(2, 0))["spatial_r2"]
    r1 = CrissCrossAttention(16, recurrence=1)
    r1.load_state_dict(m.state_dict())
    x1 = r1.double()(x)
    torch.testing.assert_close(second, r1.attention_maps(x1, query=(2, 0))["spatial"])
    assert set(maps) == {"spatial", "spatial_r2"}
    with pytest.raises(ValueError, match="CrissCrossAttention.*outside"):
        m.attention_maps(x, query=(4, 0))


def test_attention_map_rows_sum_to_one_with_self_counted_once() -> None:
    m = randomize_(CrissCrossAttention(8)).eval()
    x = torch.randn(2, 8, 3, 4)
    a = m.attention_map(x)
    assert a.shape == (2, 3, 4, 3 + 4)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 3, 4))
    for i in range(3):  # the column entry of the pixel itself is exactly 0
        assert (a[:, i, :, i] == 0).all()


def test_param_counts_and_preset() -> None:
    for c in (1, 7, 64, 512):
        for r in (1, 2, 3):
            m = CrissCrossAttention(c, recurrence=r)
            assert cca_param_count(c, recurrence=r) == sum(p.numel() for p in m.parameters())
    # CCNet head: RCCA on the 512 channels after conva (2048 // 4): 2 (512 * 64 + 64) + 512^2 + 513
    assert cca_param_count(512) == 2 * (512 * 64 + 64) + 512 * 512 + 512 + 1
    assert attnzoo.create("cca", 64, preset="r1").recurrence == 1


@pytest.mark.parametrize(
    ("kwargs", "argument"), [({"reduction": 0}, "reduction"), ({"recurrence": 0}, "recurrence")]
)
def test_bad_arguments(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=rf"CrissCrossAttention.*{argument}"):
        CrissCrossAttention(64, **kwargs)
