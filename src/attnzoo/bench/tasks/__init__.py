"""The bench's task plug-ins, found by name: ``classify``, ``detect``, ``segment``.

Each lives in ``attnzoo.bench.tasks.<name>`` and exposes its :class:`~attnzoo.bench.tasks.base.Task`
as ``TASK``; the module is imported only when the task is asked for (:func:`get_task`).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from attnzoo.specs import TASKS

if TYPE_CHECKING:
    from attnzoo.bench.tasks.base import Task

__all__ = ["TASKS", "get_task"]


def get_task(name: str) -> Task:
    """The plug-in of task ``name`` (``ValueError`` for an unknown or not yet available one)."""
    if not isinstance(name, str) or name.strip().lower() not in TASKS:
        raise ValueError(f"bench: unknown --task {name!r}; choose from {', '.join(TASKS)}")
    name = name.strip().lower()
    module_name = f"{__name__}.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise  # a dependency of the plug-in is missing: say which
        raise ValueError(
            f"bench: --task {name} is not available in this version of attnzoo "
            f"({module_name} is missing); available: "
            f"{', '.join(t for t in TASKS if _exists(t))}"
        ) from None
    task = getattr(module, "TASK", None)
    if task is None:
        raise ValueError(
            f"bench: --task {name} is not available yet ({module_name} defines no TASK)"
        )
    return task


def _exists(name: str) -> bool:
    return importlib.util.find_spec(f"{__name__}.{name}") is not None
