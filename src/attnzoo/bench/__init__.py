"""Experiments and measurements: training benchmarks (``run``, ``train``, ``report``...) and the
complexity profiler (:mod:`attnzoo.bench.profiling`: params, FLOPs, latency, memory)."""

from __future__ import annotations

from attnzoo.bench.profiling import ProfileRow, format_rows, profile, profile_model

__all__ = ["ProfileRow", "format_rows", "profile", "profile_model"]

# attnzoo bench: training benchmark of attention modules with reports
from attnzoo.bench.run import BenchResult, run  # noqa: E402

__all__ += ["BenchResult", "run"]
