"""attnzoo.ops.query: query points of pixel-pair maps (checked, resolved, rows reduced)."""

from __future__ import annotations

import pytest
import torch

from attnzoo.ops import query as query_mod
from attnzoo.ops.query import (
    check_query,
    flat_index,
    pixel_pair_map,
    reduce_rows,
    resolve_query,
)


@pytest.mark.parametrize("query", ["mean", (0, 1), (0.0, 1.0), (3,), (0.5, 0.5, 0.5)])
def test_check_query_accepts(query):
    check_query(query)


@pytest.mark.parametrize(
    "query, error",
    [
        ("max", ValueError),
        ((1.5, 0.2), ValueError),
        ((-0.1,), ValueError),
        ((1, 0.5), TypeError),
        ((True, 1), TypeError),
        ((), TypeError),
        (3, TypeError),
        (None, TypeError),
    ],
)
def test_check_query_rejects_naming_where(query, error):
    with pytest.raises(error, match=r"^MyModule\.attention_maps: .*query"):
        check_query(query, "MyModule.attention_maps")


def test_resolve_query_points_and_fractions():
    assert resolve_query("mean", (4, 5), "m") == "mean"
    assert resolve_query((3, 4), (4, 5), "m") == (3, 4)
    assert resolve_query((0.0, 0.5), (4, 5), "m") == (0, 2)
    assert resolve_query((1.0, 1.0), (4, 5), "m") == (3, 4)  # 1.0 -> the last index
    assert resolve_query((0.99,), (10,), "m") == (9,)
    assert resolve_query((0, 1, 2), torch.Size([1, 2, 3]), "m") == (0, 1, 2)


@pytest.mark.parametrize("query", [(4, 0), (0, 5), (-1, 0), (1, 2, 3), (1,), "max"])
def test_resolve_query_rejects_off_grid_points(query):
    with pytest.raises(ValueError, match=r"^where: query"):
        resolve_query(query, (4, 5), "where")


def test_flat_index_is_row_major():
    grid = (2, 3, 4)
    index = torch.arange(24).view(grid)
    for point in [(0, 0, 0), (1, 2, 3), (0, 1, 2), (1, 0, 3)]:
        assert flat_index(point, grid) == index[point]


def full_rows(b: int = 2, n: int = 12, m: int = 5) -> torch.Tensor:
    return torch.randn(b, n, m, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_reduce_rows_point_computes_one_row():
    a = full_rows()
    asked = []

    def rows(s: slice) -> torch.Tensor:
        asked.append(s)
        return a[:, s]

    got = reduce_rows(rows, 12, 5, 2, (2, 1), (3, 4))
    torch.testing.assert_close(got, a[:, 9], rtol=0, atol=0)
    assert asked == [slice(9, 10)]


def test_reduce_rows_mean_in_chunks(monkeypatch):
    a = full_rows()
    sizes = []

    def rows(s: slice) -> torch.Tensor:
        sizes.append(s.stop - s.start)
        return a[:, s]

    monkeypatch.setattr(query_mod, "QUERY_CHUNK_VALUES", 2 * 5 * 5)  # 5 query rows per chunk
    got = reduce_rows(rows, 12, 5, 2, "mean", (3, 4))
    torch.testing.assert_close(got, a.mean(1), rtol=0, atol=1e-12)
    assert sizes == [5, 5, 2]


def test_pixel_pair_map_shape_dtype_and_errors():
    a = full_rows(2, 12, 6).float()
    x = torch.zeros(2, 7, 3, 4)
    got = pixel_pair_map(lambda s: a[:, s], (2, 3), x, (1, 0), "M")
    assert got.shape == (2, 2, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got, a[:, 4].view(2, 2, 3))
    mean = pixel_pair_map(lambda s: a[:, s], (2, 3), x, "mean", "M")
    torch.testing.assert_close(mean, a.double().mean(1).float().view(2, 2, 3))
    with pytest.raises(ValueError, match=r"^M: query \(3, 0\) is outside"):
        pixel_pair_map(lambda s: a[:, s], (2, 3), x, (3, 0), "M")
