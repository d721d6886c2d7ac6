"""Channel-count rounding used by reduction layers (the "make divisible" rule of timm/MobileNet).

Modules whose official code reduces channels by plain integer division do not need this; it exists
so that keyword arguments can reproduce timm's rounding exactly (see each module's docstring).
"""

from __future__ import annotations

__all__ = ["make_divisible"]


def make_divisible(
    value: float, divisor: int, *, min_value: int | None = None, round_limit: float = 0.0
) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (halves round up).

    The result is at least ``min_value`` (``divisor`` when ``None``). When the rounded value lies
    below ``round_limit * value`` (it lost more than ``1 - round_limit`` of ``value``), one more
    ``divisor`` is added. ``round_limit=0`` never adds; timm's default is ``0.9``.

    Examples:
        >>> make_divisible(4.0, 8), make_divisible(12.0, 8), make_divisible(2.6, 1)
        (8, 16, 3)
    """
    floor = divisor if min_value is None else min_value
    rounded = max(floor, int(value + divisor / 2) // divisor * divisor)
    if rounded < round_limit * value:
        rounded += divisor
    return rounded
