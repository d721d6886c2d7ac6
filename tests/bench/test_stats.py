"""Statistics of the bench: summaries, t quantiles, paired differences and the verdict."""

from __future__ import annotations

import math

import pytest

from attnzoo.bench.stats import paired_difference, summarize, t_quantile


def test_summarize_matches_hand_computation() -> None:
    s = summarize([0.90, 0.92, 0.97])
    mean = (0.90 + 0.92 + 0.97) / 3
    var = ((0.90 - mean) ** 2 + (0.92 - mean) ** 2 + (0.97 - mean) ** 2) / 2
    assert s.n == 3
    assert s.mean == pytest.approx(mean, abs=1e-15)
    assert s.std == pytest.approx(math.sqrt(var), abs=1e-15)


def test_summarize_single_value_has_zero_std_and_empty_fails() -> None:
    assert summarize([0.5]).std == 0.0
    with pytest.raises(ValueError, match="no values"):
        summarize([])


@pytest.mark.parametrize(
    "df,expected", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)]
)
def test_t_quantile_agrees_with_published_values(df: int, expected: float) -> None:
    assert t_quantile(df) == pytest.approx(expected, abs=5e-4)


def test_t_quantile_large_df_approaches_the_normal_and_checks_its_arguments() -> None:
    assert t_quantile(100_000) == pytest.approx(1.960, abs=5e-4)
    assert t_quantile(4, 0.90) == pytest.approx(2.132, abs=5e-4)  # published t_{0.95, 4}
    with pytest.raises(ValueError, match="df"):
        t_quantile(0)
    with pytest.raises(ValueError, match="confidence"):
        t_quantile(3, 1.5)


def test_paired_difference_interval_by_hand() -> None:
    base = {0: 0.80, 1: 0.82, 2: 0.78}
    cand = {0: 0.83, 1: 0.86, 2: 0.80}
    d = paired_difference(cand, base)
    diffs = [0.03, 0.04, 0.02]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t_{0.975, 2}
    assert d.mean == pytest.approx(mean, abs=1e-12)
    assert d.low == pytest.approx(mean - half, abs=1e-9)
    assert d.high == pytest.approx(mean + half, abs=1e-9)
    assert d.detectable is True and d.verdict == "better than baseline"


def test_interval_containing_zero_is_no_detectable_effect() -> None:
    base = {0: 0.80, 1: 0.82, 2: 0.78}
    cand = {0: 0.81, 1: 0.80, 2: 0.79}  # differences +1, -2, +1 points
    d = paired_difference(cand, base)
    assert d.low < 0 < d.high
    assert d.detectable is False and d.verdict == "no detectable effect"


def test_worse_than_baseline_and_pairing_uses_common_seeds_only() -> None:
    base = {0: 0.9, 1: 0.91, 2: 0.92, 5: 0.5}
    cand = {0: 0.8, 1: 0.82, 2: 0.81, 7: 0.99}
    d = paired_difference(cand, base)
    assert d.seeds == (0, 1, 2)
    assert d.verdict == "worse than baseline"
    assert d.high < 0


def test_pairing_is_by_seed_not_by_position() -> None:
    # unpaired (Welch-like) reasoning would see no effect; paired differences are all +1 point
    base = {0: 0.70, 1: 0.80, 2: 0.90}
    cand = {2: 0.91, 0: 0.71, 1: 0.81}
    d = paired_difference(cand, base)
    assert d.mean == pytest.approx(0.01)
    assert d.std == pytest.approx(0.0, abs=1e-12)
    assert d.detectable is True


def test_one_seed_gives_no_interval() -> None:
    d = paired_difference({0: 0.9}, {0: 0.8})
    assert math.isnan(d.low) and math.isnan(d.high)
    assert d.detectable is None and d.verdict.startswith("n/a")


def test_no_common_seed_is_an_error() -> None:
    with pytest.raises(ValueError, match="share no seed"):
        paired_difference({0: 0.9}, {1: 0.8})
