"""``BenchResult.summary`` holds fractions; its table prints them x100 (percentages and
percentage points), so ``100 * summary[...]`` is what the table shows."""

from __future__ import annotations

from pathlib import Path

from attnzoo.bench.engine import BenchResult


def test_summary_fractions_and_table_percentage_points() -> None:
    summary = [
        {"attention": "none", "test_acc": 0.9, "test_acc_std": 0.005, "verdict": "baseline"},
        {
            "attention": "se",
            "test_acc": 0.912,
            "test_acc_std": 0.004,
            "diff_vs_baseline": 0.012,
            "diff_low": -0.001,
            "diff_high": 0.025,
            "verdict": "no detectable difference",
        },
    ]
    result = BenchResult(out=Path("x"), runs=[], summary=summary)
    headers, rows = result.table()
    acc = headers.index("top-1 % (mean ± std)")
    diff = next(i for i, h in enumerate(headers) if h.startswith("Δ vs none"))
    assert rows[1][acc] == "91.20 ± 0.40"
    assert rows[1][diff] == "+1.20 [-0.10, +2.50]"
    for s, row in zip(summary, rows):
        assert row[acc].startswith(f"{100 * s['test_acc']:.2f}")
