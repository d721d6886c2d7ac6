"""Statistics of ``attnzoo bench``: mean ± std over seeds and paired differences to a baseline.

For an attention ``a`` and the baseline ``none`` trained with the same seeds ``s = 1..n`` (same
initial data order, same data), the per-seed differences ``d_s = acc_a(s) - acc_none(s)`` remove
the seed-to-seed variation both runs share. Their mean ``d̄`` with the 95 % Student-t interval

    d̄ ± t_{0.975, n-1} · sd(d) / √n

estimates the effect of the module on this data. When the interval contains 0 the bench says
"no detectable effect": with these seeds the data cannot tell the module from the baseline (it
does *not* prove the effect is zero). With one seed no interval exists (reported as n/a).

The t quantile is SciPy's (``scipy.stats.t``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

__all__ = ["PairedDifference", "Summary", "paired_difference", "summarize", "t_quantile"]


def t_quantile(df: int, confidence: float = 0.95) -> float:
    """Two-sided critical value ``t_{(1+confidence)/2, df}`` of Student's t distribution
    (SciPy's, a dependency of the bench through scikit-learn)."""
    from scipy.stats import t

    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"t_quantile: df must be an integer >= 1; got {df!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"t_quantile: confidence must be in (0, 1); got {confidence!r}")
    return float(t.ppf(0.5 + confidence / 2.0, df))


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (ddof=1; 0 for one value) and count."""

    mean: float
    std: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def summarize(values: Sequence[float]) -> Summary:
    """Mean ± sample std of ``values`` (at least one)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("summarize: no values")
    n = len(vals)
    mean = math.fsum(vals) / n
    var = math.fsum((v - mean) ** 2 for v in vals) / (n - 1) if n > 1 else 0.0
    return Summary(mean, math.sqrt(var), n)


@dataclass(frozen=True)
class PairedDifference:
    """Paired difference ``candidate - baseline`` over common seeds, with its t interval.

    ``low``/``high`` are ``nan`` when fewer than 2 seeds pair up; ``detectable`` is then ``None``.
    """

    mean: float
    std: float
    n: int
    low: float
    high: float
    confidence: float
    seeds: tuple[int, ...]

    @property
    def detectable(self) -> bool | None:
        """True if the interval excludes 0, False if it contains 0, None without an interval."""
        if self.n < 2:
            return None
        return not (self.low <= 0.0 <= self.high)

    @property
    def verdict(self) -> str:
        d = self.detectable
        if d is None:
            return "n/a (needs >= 2 seeds)"
        if not d:
            return "no detectable effect"
        return "better than baseline" if self.mean > 0 else "worse than baseline"

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["seeds"] = list(self.seeds)
        out["detectable"] = self.detectable
        out["verdict"] = self.verdict
        return out


def paired_difference(
    candidate: Mapping[int, float], baseline: Mapping[int, float], *, confidence: float = 0.95
) -> PairedDifference:
    """Paired difference of per-seed values; only seeds present in both are used."""
    seeds = tuple(sorted(set(candidate) & set(baseline)))
    if not seeds:
        raise ValueError("paired_difference: the candidate and the baseline share no seed")
    diffs = [float(candidate[s]) - float(baseline[s]) for s in seeds]
    s = summarize(diffs)
    if s.n < 2:
        low = high = float("nan")
    else:
        half = t_quantile(s.n - 1, confidence) * s.std / math.sqrt(s.n)
        low, high = s.mean - half, s.mean + half
    return PairedDifference(s.mean, s.std, s.n, low, high, confidence, seeds)
