"""``attnzoo.bench.run``: train a network with each attention over several seeds, and report the
task's metric with its uncertainty next to params, FLOPs and CPU latency.

Layout of ``out`` (re-running the same command resumes; finished runs are skipped)::

    out/
      results.json, results.csv      every finished run and the summary (rewritten atomically)
      report.md, report.html         the report (HTML self-contained), figures/*.png
      runs/<attention>/seed<k>/      last.ckpt (each epoch), result.json (when done), logs/

The stages live in :mod:`attnzoo.bench.engine`, the tasks in :mod:`attnzoo.bench.tasks`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from attnzoo.bench.engine import BenchConfig, BenchResult, execute

__all__ = ["BenchConfig", "BenchResult", "run"]


def run(config: BenchConfig | str | Sequence[str] | None = None, **overrides: Any) -> BenchResult:
    """Train the task's model with each attention for each seed and write the report.

    ``run(BenchConfig(...))``, ``run("none,se,cbam", epochs=4, out="bench-out")`` (a first
    argument that is not a :class:`BenchConfig` is the attention list) and
    ``run(config, seeds=5)`` (``overrides`` replace fields of ``config``) all work; the options
    are the fields of :class:`~attnzoo.bench.engine.BenchConfig` (``attnzoo bench --help``
    describes each). Everything is validated before the first training step (names, keyword
    arguments, data, output folder, numbers). Re-running with the same ``out`` resumes unfinished
    runs from their last epoch checkpoint and skips finished ones; a run's settings must match
    those it was started with.

    Examples of options: ``task`` (``classify``, ``detect``, ``segment``), ``attention``
    (``"none,se,cbam:reduction=8"``), ``baseline`` (the attention the paired differences are
    computed against; default ``none`` when listed, else no Δ), ``model`` (a builder name or a
    callable ``builder(attention=..., num_classes=..., **kwargs)``), ``data``, ``seeds`` (an
    int ``n`` means ``0..n-1``), ``n_train``/``n_test`` (built-in data: sizes; other data:
    stratified subsets), ``localise`` (classification: Grad-CAM localisation scores and panels),
    ``extra_sections`` (``f(result, data) -> [Section]`` appended to the report), ``options``
    (task-specific options).
    """
    if config is None:
        config = BenchConfig()
    elif not isinstance(config, BenchConfig):
        config = BenchConfig(attention=config)
    fields = {f.name for f in dataclasses.fields(BenchConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(
            f"bench.run: unknown option(s) {', '.join(map(repr, unknown))}; the "
            f"options are the fields of BenchConfig: {', '.join(sorted(fields))}"
        )
    return execute(dataclasses.replace(config, **overrides))
