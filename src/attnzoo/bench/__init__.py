"""Experiments and measurements: the training benchmark of attention modules (:func:`run`, one
engine with a plug-in per task: :mod:`attnzoo.bench.engine`, :mod:`attnzoo.bench.tasks`) and the
complexity profiler (:mod:`attnzoo.bench.profiling`: params, FLOPs, latency, memory)."""

from __future__ import annotations

from attnzoo.bench.profiling import ProfileRow, format_rows, profile, profile_model
from attnzoo.bench.run import BenchConfig, BenchResult, run

__all__ = [
    "BenchConfig",
    "BenchResult",
    "ProfileRow",
    "format_rows",
    "profile",
    "profile_model",
    "run",
]
