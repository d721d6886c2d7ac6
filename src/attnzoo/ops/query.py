"""Query points of pixel-pair attention maps: validation, resolution on a grid, row reduction.

A pixel-pair module (non-local, SAGAN, DANet's PAM, criss-cross ...) has a ``(B, N, M)``
affinity: ``N`` query positions of its input, ``M`` key positions. Its ``attention_maps(x,
query=...)`` shows one row per image on the key grid:

* ``query="mean"``: the mean over all ``N`` query rows ("where do positions look on average").
  :func:`reduce_rows` computes it in chunks of query rows, so the ``N x M`` matrix is never held
  at once: at most :data:`QUERY_CHUNK_VALUES` values per chunk.
* ``query=(y, x)``: the row of that query position, as indices of the module's own input grid
  (``(l,)`` for 1-D, ``(t, y, x)`` for 3-D); out-of-range points raise ``ValueError``.
* ``query=(fy, fx)``: floats in ``[0, 1]``, the same as a fraction of the input size (index
  ``min(int(f * size), size - 1)``).

A module whose maps depend on ``query`` sets the class attribute ``attention_query = True``
(:data:`QUERY_ATTRIBUTE`); :func:`attnzoo.viz.attention_maps` then records the resolved point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "QUERY_ATTRIBUTE",
    "QUERY_CHUNK_VALUES",
    "Query",
    "RowsFn",
    "check_query",
    "flat_index",
    "pixel_pair_map",
    "reduce_rows",
    "resolve_query",
]

#: at most this many affinity values are held at once when averaging over query rows
QUERY_CHUNK_VALUES = 2**22

#: class attribute (``True``) of the modules whose ``attention_maps`` depend on ``query``
QUERY_ATTRIBUTE = "attention_query"

#: ``"mean"``, a point of grid indices, or a point of fractions in ``[0, 1]``
Query = str | Sequence[int] | Sequence[float]

#: query rows -> ``(B, n, M)`` affinity rows
RowsFn = Callable[[slice], Tensor]


def check_query(query: Any, where: str = "attnzoo.viz.attention_maps") -> None:
    """Raise ``ValueError``/``TypeError`` (prefixed by ``where``) unless ``query`` is ``"mean"``,
    a non-empty point of ints, or a non-empty point of floats in ``[0, 1]``."""
    if isinstance(query, str):
        if query != "mean":
            raise ValueError(
                f"{where}: query must be 'mean', a point of ints (y, x) or of floats (fy, fx) "
                f"in [0, 1]; got {query!r}"
            )
        return
    if not isinstance(query, Sequence) or len(query) == 0:
        raise TypeError(f"{where}: query must be 'mean' or a tuple such as (y, x); got {query!r}")
    ints = all(isinstance(q, int) and not isinstance(q, bool) for q in query)
    floats = all(isinstance(q, float) for q in query)
    if not (ints or floats):
        raise TypeError(
            f"{where}: query coordinates must be all ints (grid indices) or all floats "
            f"(fractions in [0, 1]); got {query!r}"
        )
    if floats and not all(0.0 <= q <= 1.0 for q in query):
        raise ValueError(f"{where}: fractional query coordinates must lie in [0, 1]; got {query!r}")


def resolve_query(query: Query, grid: Sequence[int], where: str) -> str | tuple[int, ...]:
    """``"mean"``, or the query point as indices of ``grid`` (the module's input grid).

    Checks ``query`` (:func:`check_query`); raises ``ValueError`` naming ``where`` when the point
    has the wrong number of coordinates or lies outside ``grid``.
    """
    check_query(query, where)
    if isinstance(query, str):
        return query
    grid = tuple(int(s) for s in grid)
    if len(query) != len(grid):
        raise ValueError(
            f"{where}: query {tuple(query)} has {len(query)} coordinates but the input grid "
            f"{grid} is {len(grid)}-D"
        )
    if isinstance(query[0], float):
        return tuple(min(int(f * s), s - 1) for f, s in zip(query, grid))
    points = tuple(int(q) for q in query)
    if not all(0 <= q < s for q, s in zip(points, grid)):
        raise ValueError(f"{where}: query {points} is outside the input grid {grid}")
    return points


def flat_index(point: Sequence[int], grid: Sequence[int]) -> int:
    """Row-major (C order) flat index of ``point`` in ``grid``."""
    index = 0
    for p, s in zip(point, grid):
        index = index * s + p
    return index


def reduce_rows(
    rows: RowsFn,
    n: int,
    m: int,
    batch: int,
    point: str | tuple[int, ...],
    grid: Sequence[int],
) -> Tensor:
    """One row per image ``(B, M)``: the row of ``point`` (a resolved query on ``grid``), or, for
    ``"mean"``, the mean over all ``n`` rows accumulated in float64 chunks of at most
    :data:`QUERY_CHUNK_VALUES` values."""
    if isinstance(point, tuple):
        i = flat_index(point, grid)
        return rows(slice(i, i + 1))[:, 0]
    chunk = max(1, QUERY_CHUNK_VALUES // max(1, batch * m))
    total: Tensor | None = None
    for start in range(0, n, chunk):
        part = rows(slice(start, min(n, start + chunk))).sum(1, dtype=torch.float64)
        total = part if total is None else total + part
    if total is None:
        raise ValueError(f"attnzoo.ops.query.reduce_rows: n must be positive; got {n}")
    return total / n


def pixel_pair_map(
    rows: RowsFn, keys: Sequence[int], x: Tensor, query: Query, where: str
) -> Tensor:
    """The reduced affinity of a pixel-pair module on its key grid, ``(B, *keys)``.

    Args:
        rows: the module's affinity rows on demand (``rows(slice) -> (B, n, M)``).
        keys: the key grid (``M = prod(keys)``).
        x: the module's input ``(B, C, *grid)``; the query grid is ``x.shape[2:]``.
        query: ``"mean"`` or a point, see the module docstring.
        where: prefix of error messages (the module's name).
    """
    grid = tuple(x.shape[2:])
    point = resolve_query(query, grid, where)
    row = reduce_rows(rows, math.prod(grid), math.prod(keys), x.shape[0], point, grid)
    return row.to(x.dtype).view(x.shape[0], *keys)
