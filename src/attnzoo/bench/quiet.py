"""A quiet terminal for ``attnzoo bench``: what the frameworks print that is not for the user.

* :func:`quiet_lightning` — during a training run: Lightning's informational messages (which
  devices exist, the "Tip" advertising its logger, ``Trainer.fit`` stopped...) are dropped, as
  are its warnings that only concern unused hardware or small data; everything a run prints to
  ``stdout`` (the progress bars) goes to ``stderr``, so that ``stdout`` keeps the results only.
* :func:`filtered_native_stderr` — around the profiler: the PyTorch profiler's C++ traces
  (``USDT:``/``STAGE:`` lines, ``gpuGetDeviceCount failed`` on machines without a GPU) and torch's
  "No CUDA runtime is found" warning are written straight to file descriptor 2, below Python. The
  descriptor is captured to a temporary file for the duration of the block and every line that is
  not one of those is written back afterwards, also when the block raises: real errors are never
  hidden.

``verbose=True`` turns both off (everything is shown as the frameworks print it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator

__all__ = ["NATIVE_NOISE", "filtered_native_stderr", "quiet_lightning"]

#: lines of native (C++) or import-time output dropped by :func:`filtered_native_stderr`
NATIVE_NOISE = re.compile(r"^(USDT|STAGE):|gpuGetDeviceCount failed|No CUDA runtime is found")

_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")

# Lightning warnings that concern hardware the user did not ask for, or our deliberate choices
_LIGHTNING_WARNINGS = (
    r".*(GPU|TPU|HPU|MPS) available but not used.*",
    r".*does not have many workers.*",
    r".*number of training batches.*",
    r".*Checkpoint directory .* exists.*",
    r".*Experiment logs directory .* exists.*",
    r".*isinstance\(treespec, LeafSpec\).*",
    # the epoch values we log are computed by torchmetrics, already summed over ranks
    r".*It is recommended to use `self.log\(.*",
)


@contextlib.contextmanager
def quiet_lightning(verbose: bool = False) -> Iterator[None]:
    """Training-run context: Lightning's info messages and known harmless warnings dropped
    (unless ``verbose``), and ``sys.stdout`` sent to ``sys.stderr`` (always)."""
    with contextlib.redirect_stdout(sys.stderr):
        if verbose:
            yield
            return
        # importing lightning sets its loggers to INFO: import first, then lower them
        import lightning.pytorch  # noqa: F401

        loggers = [logging.getLogger(n) for n in _LIGHTNING_LOGGERS]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            with warnings.catch_warnings():
                for pattern in _LIGHTNING_WARNINGS:
                    warnings.filterwarnings("ignore", message=pattern)
                yield
        finally:
            for lg, lvl in zip(loggers, levels):
                lg.setLevel(lvl)


@contextlib.contextmanager
def filtered_native_stderr(verbose: bool = False) -> Iterator[None]:
    """Capture file descriptor 2 during the block and write back every line that does not match
    :data:`NATIVE_NOISE` (everything when ``verbose``), also when the block raises."""
    if verbose:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable descriptor 2: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [
                ln
                for ln in tmp.read().decode(errors="replace").splitlines(keepends=True)
                if not NATIVE_NOISE.search(ln)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
