"""The plug-in protocol of ``attnzoo bench``: what a task (classify, detect, segment) provides.

What the engine (:mod:`attnzoo.bench.engine`) does for every task, so a plug-in never repeats it:

* validates the shared options of :class:`~attnzoo.bench.engine.BenchConfig` (attentions and
  their keyword arguments, seeds, numbers, devices, the output folder), after filling the
  options left ``None`` from :attr:`Task.defaults`;
* resolves ``--model`` (:meth:`Task.resolve_model`; by default through
  :data:`attnzoo.models.BUILDERS`) and asks the task to build and probe one network per
  attention before any training;
* plans the runs (``out/runs/<attention>/seed<k>/``), fingerprints the settings (including
  :meth:`TaskData.describe`) and refuses to resume a run started with other settings;
* trains each (attention, seed) run with Lightning: ``seed_everything(seed)`` before the model is
  built, the atomic ``last.ckpt`` after every epoch, resume from it, the module's ``history``
  (and ``run_extras``) kept in the checkpoint, progress bars, DDP, quiet logs;
* profiles params / FLOPs / latency at :meth:`Task.input_shape`;
* computes the statistics: mean ± std over seeds and the paired 95 % CI against the baseline of
  the primary metric :attr:`Task.metric`, mean ± std of each :attr:`Task.secondary` metric;
* writes results.json / results.csv (every metric a fraction) and the report: generic tables and
  plots labelled with :attr:`Task.metric_label`, then the task's :class:`TaskReport`.

A task is a small object (usually stateless). Its module ``attnzoo.bench.tasks.<name>`` exposes
it as ``TASK``; :func:`attnzoo.bench.tasks.get_task` imports that module only when the task is
asked for, so a task's heavy dependencies load only when it runs. The classification plug-in
(:mod:`attnzoo.bench.tasks.classify`) is the worked example.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from attnzoo.specs import BASELINE

if TYPE_CHECKING:  # type hints only: the engine imports the tasks, never the reverse at run time
    from torch.utils.data import DataLoader

    from attnzoo.bench.engine import BenchConfig, BenchResult, RunPlan
    from attnzoo.bench.report import Block, Section
    from attnzoo.specs import AttentionSpec

__all__ = ["Task", "TaskData", "TaskReport", "call_builder"]


def call_builder(
    builder: Callable[..., nn.Module], spec: AttentionSpec, **kwargs: Any
) -> nn.Module:
    """``builder(attention=..., **kwargs, **spec.kwargs)``; ``none`` is ``attention=None``."""
    if spec.name == BASELINE:
        return builder(attention=None, **kwargs)
    return builder(attention=spec.name, **kwargs, **dict(spec.kwargs))


def broadcast_buffers(model: nn.Module) -> None:
    """Give every DDP rank rank 0's buffers (BatchNorm statistics), in place.

    DDP broadcasts buffers before each training forward, but each rank's last batch updated its
    own copy: called before evaluation, every rank evaluates exactly the model that the
    checkpoint stores. Does nothing outside a multi-process group.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


@runtime_checkable
class TaskData(Protocol):
    """What a task's data object tells the engine (train/test splits are the task's business)."""

    #: short name (``digits``, a folder path, ``voc:/data/VOC2007``)
    name: str
    #: one sentence for the report ("cluttered digits: 3000 train / 1000 test images ...")
    description: str
    #: class names, in label order
    classes: list[str]

    @property
    def n_train(self) -> int:
        """Training samples (the engine derives the steps per epoch from it)."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able facts that change the numbers (sizes, images per class, ...): part of the
        run fingerprint and of the report's configuration table."""
        ...


@dataclass
class ImageSplits:
    """A :class:`TaskData` of train and test datasets of images at ``image_size``: what the
    detect and segment tasks load (their subclasses say which datasets)."""

    name: str
    description: str
    classes: list[str]
    train: Any
    test: Any
    image_size: int
    note: str = ""

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict[str, Any]:
        return {
            "n_train": len(self.train),
            "n_test": len(self.test),
            "num_classes": self.num_classes,
            "split": self.note,
        }


@dataclass
class TaskReport:
    """The task's part of the report; the engine writes everything else.

    Attributes:
        setup: one sentence on the model, data and training setup; opens the "Result" section.
        notes: blocks shown in "Result" between the forest plot and the results table (e.g. the
            chance level and its warnings).
        flagged: attention label -> a mark appended to its metric cell (``"near chance"``); the
            forest plot draws these attentions in orange.
        reference: a level of the primary metric (fraction) drawn as a dashed line on the forest
            plot and named ``reference_label`` (``"the chance level"``); None: no line.
        forest_note: appended to the forest plot's caption (``"; orange: near chance"``).
        diffs: ``(key, name)`` of further scores with paired differences in the summary
            (``{key}_diff``, ``{key}_diff_low``, ``{key}_diff_high``): one forest panel each.
        run_columns: ``(header, key)`` of per-run values for the "Runs" table (floats are
            shown as percentages).
        how_to_read: task-specific bullet lines (``"- ..."``) for "How to read the numbers".
        sections: sections placed after "How to read the numbers" (per-class scores, panels,
            the data), in order.
    """

    setup: str = ""
    notes: list[Block] = field(default_factory=list)
    flagged: dict[str, str] = field(default_factory=dict)
    reference: float | None = None
    reference_label: str = ""
    forest_note: str = ""
    diffs: list[tuple[str, str]] = field(default_factory=list)
    run_columns: list[tuple[str, str]] = field(default_factory=list)
    how_to_read: str = ""
    sections: list[Section] = field(default_factory=list)


class Task(ABC):
    """One kind of problem the bench can compare attentions on.

    Metrics are **fractions** everywhere (``0.912``, not ``91.2``); the report shows them ×100
    with :attr:`metric_label`. A history row is a dict per epoch holding at least ``epoch``,
    ``train_loss``, ``lr``, ``seconds``, :attr:`metric` and the :attr:`secondary` keys.
    """

    #: ``classify``, ``detect`` or ``segment``
    name: ClassVar[str]
    #: key of the primary metric in history rows and results (``test_acc``, ``map50``)
    metric: ClassVar[str]
    #: how the report labels it (``"top-1 %"``, ``"mAP50 %"``)
    metric_label: ClassVar[str]
    #: other metric keys (fractions) summarised as mean ± std over seeds
    secondary: ClassVar[tuple[str, ...]] = ()
    #: values for the :class:`BenchConfig` fields left ``None``: ``attention``, ``model``,
    #: ``data``, ``epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``image_size``
    defaults: ClassVar[Mapping[str, Any]]
    #: extra keyword options this task accepts in ``BenchConfig.options`` (name -> default)
    options: ClassVar[Mapping[str, Any]] = {}
    #: ``(header, key)`` of further fractions in the results table, as mean ± std, when the
    #: summary has them (e.g. ``("mAP50-95 %", "map")``)
    columns: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: per-run keys written to results.csv after the metric columns
    csv_columns: ClassVar[tuple[str, ...]] = ()

    def defaults_for(self, model: Any) -> Mapping[str, Any]:
        """The defaults for ``--model`` ``model`` (as given, ``None`` for the task's default;
        possibly several models): :attr:`defaults` unless the task's model families differ."""
        return self.defaults

    # ---- validation ---------------------------------------------------------------------------
    def check_config(self, config: BenchConfig) -> None:  # noqa: B027 (optional hook)
        """Cheap, task-specific checks before anything is loaded (``ValueError`` naming the
        option). ``config.options`` has already been checked against :attr:`options`."""

    def check_data(self, config: BenchConfig) -> None:  # noqa: B027 (optional hook)
        """Cheap checks of ``config.data`` (existence, layout) before it is loaded."""

    def check_schedule(self, config: BenchConfig, steps_per_epoch: int) -> None:  # noqa: B027
        """Check that the optimiser schedule works for this many steps (``ValueError``)."""

    # ---- data and models ----------------------------------------------------------------------
    def resolve_model(
        self, model: str | Callable[..., nn.Module]
    ) -> tuple[str, Callable[..., nn.Module]]:
        """``(label, builder)`` for ``--model``: by default a name of
        :data:`attnzoo.models.BUILDERS` (with ``:key=value`` arguments) or a callable."""
        from attnzoo.models import resolve_builder

        return resolve_builder(model)

    @abstractmethod
    def load_data(self, config: BenchConfig) -> TaskData:
        """Load ``config.data`` (built-in or a user folder/format) into a :class:`TaskData`."""

    @abstractmethod
    def build_model(
        self, builder: Any, spec: AttentionSpec, data: TaskData, config: BenchConfig
    ) -> nn.Module:
        """Build the network for ``spec`` (``builder`` from ``--model``) and run a probe forward
        on a couple of test samples; raise ``ValueError`` saying what is wrong (the engine
        prefixes the model and attention). Called after ``seed_everything(seed)`` for training,
        so the initial weights depend on the seed only."""

    @abstractmethod
    def input_shape(self, data: TaskData, config: BenchConfig) -> tuple[int, ...]:
        """One sample's input shape for profiling, e.g. ``(3, 32, 32)``."""

    def model_for_run(
        self, builder: Callable[..., nn.Module], spec: AttentionSpec, meta: Mapping[str, Any]
    ) -> nn.Module:
        """The untrained network of a finished run, from its ``config.json`` (``meta``: the run
        settings and :meth:`run_meta`), for loading its checkpoint
        (:func:`attnzoo.bench.checkpoints.load_run_model`)."""
        return call_builder(builder, spec, num_classes=meta["num_classes"])

    def run_settings(self, config: BenchConfig) -> dict[str, Any]:
        """Task-specific settings that change the numbers (e.g. the optimiser's momentum,
        ``config.options``): fingerprinted with the engine's and shown in the report."""
        return dict(config.options)

    def run_meta(self, data: TaskData) -> dict[str, Any]:
        """Extra fields of a run's ``config.json`` needed to rebuild and use it later (class
        names, normalisation statistics ...)."""
        return {"num_classes": len(data.classes), "classes": list(data.classes)}

    # ---- training -----------------------------------------------------------------------------
    @abstractmethod
    def make_module(self, model: nn.Module, data: TaskData, config: BenchConfig) -> Any:
        """The ``LightningModule``: training step, optimiser, and an evaluation after every
        epoch that appends a history row to ``self.history`` (a list of dicts; the engine keeps
        it, and the optional dict ``self.run_extras``, in the checkpoint and restores both on
        resume). Evaluation must cover the whole test set once over all DDP ranks."""

    @abstractmethod
    def make_loaders(
        self, data: TaskData, config: BenchConfig, *, seed: int
    ) -> tuple[DataLoader, DataLoader]:
        """Train loader (order a pure function of ``(seed, epoch)``, sharded over DDP ranks:
        :class:`~attnzoo.bench.data.SeededSampler`) and evaluation loader."""

    def final_row(self, history: Sequence[dict[str, Any]], module: Any) -> dict[str, Any]:
        """The metrics of a finished run (from its last history row and the module): at least
        :attr:`metric` and :attr:`secondary`. The engine adds attention, seed, history, timing."""
        last = history[-1]
        keys = (self.metric, *self.secondary, "train_loss")
        return {k: last[k] for k in keys if k in last}

    # ---- after training -----------------------------------------------------------------------
    def localise(
        self, plan: Sequence[RunPlan], data: TaskData, config: BenchConfig
    ) -> dict[tuple[str, int], dict[str, Any]]:
        """Optional per-run scores computed from the trained runs (classification: pointing
        game and energy in box), ``{(label, seed): {...}}``; merged into the run rows."""
        return {}

    def summarize_extra(
        self,
        labels: Sequence[str],
        seeds: Sequence[int],
        per_run: Mapping[tuple[str, int], dict[str, Any]],
        baseline: str | None,
        data: TaskData,
    ) -> list[dict[str, Any]]:
        """Summary fields of :meth:`localise`'s scores, one dict per attention label (with its
        ``attention``); paired differences as ``{key}_diff``, ``{key}_diff_low/high``."""
        return []

    def report(
        self, result: BenchResult, data: TaskData, config: BenchConfig, plan: Sequence[RunPlan]
    ) -> TaskReport:
        """The task's part of the report (see :class:`TaskReport`)."""
        return TaskReport()
