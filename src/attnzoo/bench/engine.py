"""The engine of ``attnzoo bench``: one pipeline of small stages shared by every task.

:func:`execute` runs the stages in order; each is a function of the :class:`Bench` built so far:

1. :func:`validate` — every option of :class:`BenchConfig` (task defaults filled in), nothing
   loaded yet;
2. :func:`build` — the data, the optimiser schedule check, one probed network per arm;
3. :func:`plan` — run folders, the settings' fingerprint, the resume check;
4. :func:`train` — each (arm, seed) run through Lightning (:mod:`attnzoo.bench.train`),
   finished runs reused;
5. :func:`localise` — the task's optional per-run scores (classification: Grad-CAM localisation);
6. :func:`profile` — params, FLOPs, latency at the task's input shape;
7. :func:`statistics` and :func:`write_results` — summaries, paired CIs, results.json / .csv;
8. :func:`report` — report.md / report.html.

What differs between tasks (data, networks, the LightningModule, metrics, report sections) comes
from the task plug-in (:class:`attnzoo.bench.tasks.base.Task`).

An *arm* is one network compared: an attention on the model. ``--model`` may list several models
(``faster_rcnn_small,cascade_rcnn_small``); the arms are then every (model, attention) pair,
labelled ``model/attention`` (:class:`ArmSpec`), run in ``runs/<model>/<attention>/seed<k>/``, and
the baseline is the first model with the baseline attention, so that the differences compare
models as well as attentions. With one model the arms are the attentions, labelled by them.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnzoo.bench import report as rep
from attnzoo.bench.quiet import filtered_native_stderr
from attnzoo.bench.stats import paired_difference, summarize
from attnzoo.bench.tasks import get_task
from attnzoo.bench.tasks.base import Task, TaskReport
from attnzoo.bench.train import steps_per_epoch, train_one
from attnzoo.specs import BASELINE, AttentionSpec, parse_attentions, validate_attentions

__all__ = [
    "ArmSpec",
    "Bench",
    "BenchConfig",
    "BenchResult",
    "RunPlan",
    "build",
    "check_devices",
    "environment",
    "execute",
    "plan",
    "profile",
    "report",
    "resolve_baseline",
    "split_models",
    "statistics",
    "train",
    "validate",
    "write_results",
]


# ---------------------------------------------------------------------------------------------
# configuration
@dataclass
class BenchConfig:
    """Every option of a bench. ``None`` fields take the task's default
    (:attr:`attnzoo.bench.tasks.base.Task.defaults`; for ``classify``: attentions
    ``none,se,cbam,eca,gc,ca,ema``, ``cifar_resnet8``, ``digits``, 8 epochs, batch 64, lr 0.1,
    weight decay 5e-4, 32 px). See ``attnzoo bench --help`` for each option."""

    attention: str | Sequence[str] | None = None
    task: str = "classify"
    #: one model, or several (a comma list or a sequence): every model x every attention
    model: str | Callable[..., nn.Module] | Sequence[str | Callable[..., nn.Module]] | None = None
    data: str | None = None
    epochs: int | None = None
    seeds: Iterable[int] | int = (0, 1, 2)
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    out: str | os.PathLike = "bench-out"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    accelerator: str = "cpu"
    precision: str | None = None
    image_size: int | None = None
    n_train: int | None = None
    n_test: int | None = None
    data_seed: int = 0
    num_workers: int = 0
    progress: bool = True
    verbose: bool = False
    profile: bool = True
    #: classification: Grad-CAM localisation scores and panels (needs ``attnzoo[viz]``)
    localise: bool = True
    cam_method: str = "gradcam"
    panel_images: int = 6
    report: bool = True
    #: the attention the paired differences are computed against (default ``none`` if listed)
    baseline: str | None = None
    #: the command shown in the report (default: this call, spelled out)
    command: str | None = None
    #: ``f(result, data) -> [Section]`` appended to the report
    extra_sections: Callable[[BenchResult, Any], Sequence[rep.Section]] | None = None
    #: task-specific options (``Task.options`` names them, with their defaults)
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ArmSpec(AttentionSpec):
    """An attention on one of several models: labelled ``model/attention``, run folder
    ``<model>/<attention>``. ``name`` and ``kwargs`` are the attention's, as in
    :class:`~attnzoo.specs.AttentionSpec`, so builders receive it unchanged."""

    model: str = ""

    @property
    def attention(self) -> AttentionSpec:
        return AttentionSpec(self.name, self.kwargs)

    @property
    def label(self) -> str:
        return f"{self.model}/{self.attention.label}"

    @property
    def dirname(self) -> str:
        return f"{AttentionSpec(self.model).dirname}/{self.attention.dirname}"


def _arm_model(spec: AttentionSpec) -> str | None:
    return spec.model if isinstance(spec, ArmSpec) else None


@dataclass(frozen=True)
class RunPlan:
    """One (arm, seed) run and its folder."""

    spec: AttentionSpec
    seed: int
    run_dir: Path


@dataclass
class Bench:
    """What the stages share: the validated config, the task, and what each stage adds."""

    config: BenchConfig
    task: Task
    specs: list[AttentionSpec]
    baseline: str | None
    model_name: str
    builder: Callable[..., nn.Module]
    out: Path
    #: model label -> builder (several models: one arm per model and attention)
    builders: dict[str, Callable[..., nn.Module]] = field(default_factory=dict)
    data: Any = None
    models: dict[str, nn.Module] = field(default_factory=dict)
    run_config: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    runs: list[RunPlan] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return list(self.config.seeds)  # type: ignore[arg-type]

    def model_for(self, spec: AttentionSpec) -> nn.Module:
        """A freshly built network for ``spec`` (the task's builder and probe)."""
        model = _arm_model(spec)
        builder = self.builder if model is None else self.builders[model]
        return self.task.build_model(builder, spec, self.data, self.config)

    def arm_config(self, spec: AttentionSpec) -> dict[str, Any]:
        """The fingerprinted settings of ``spec``'s runs: :attr:`run_config` with the arm's own
        model (so adding a model to the list keeps the other models' runs resumable)."""
        model = _arm_model(spec)
        return self.run_config if model is None else {**self.run_config, "model": model}


@dataclass
class BenchResult:
    """What :func:`attnzoo.bench.run` returns: per-run rows, the summary per attention, and the
    report paths.

    Units: every metric, difference and localisation score in ``runs``, ``summary``,
    ``results.json`` and ``results.csv`` is a **fraction** (``test_acc`` 0.912,
    ``diff_vs_baseline`` 0.012 with ``diff_low``/``diff_high``); the printed tables and the
    report show the same numbers ×100, as percentages and percentage points (``+1.20``).
    Every run and summary row also holds the primary metric as ``metric`` (``metric_std``).
    """

    out: Path
    runs: list[dict]
    summary: list[dict]
    report_md: Path | None = None
    report_html: Path | None = None
    wall_seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)
    #: the attention the differences are computed against (None: no baseline, no Δ)
    baseline: str | None = BASELINE
    task: str = "classify"
    #: key and label of the primary metric
    metric: str = "test_acc"
    metric_label: str = "top-1 %"
    #: ``(header, key)`` of further fractions shown as mean ± std when the summary has them
    columns: tuple[tuple[str, str], ...] = (
        ("pointing game %", "pointing_game"),
        ("energy in box %", "energy_in_box"),
    )
    #: the settings of the runs (model, data, epochs ...)
    config: dict[str, Any] = field(default_factory=dict)

    def table(self) -> tuple[list[str], list[list[str]]]:
        """The results table: metric (mean ± std), Δ with its CI and verdict, the extra
        columns, then params, MFLOPs, elementwise MFLOPs and latency."""
        shown = [(h, k) for h, k in self.columns if any(k in s for s in self.summary)]
        headers = ["attention", f"{self.metric_label} (mean ± std)"]
        if self.baseline is not None:
            headers += [f"Δ vs {self.baseline} [95% CI]", "verdict"]
        headers += [h for h, _ in shown] + ["params", "MFLOPs", "+elementwise", "latency ms"]
        rows = []
        for s in self.summary:
            diff = (
                []
                if self.baseline is None
                else [
                    "baseline"
                    if s.get("diff_vs_baseline") is None
                    else rep.fmt_diff(s["diff_vs_baseline"], s["diff_low"], s["diff_high"]),
                    s.get("verdict", ""),
                ]
            )
            extra = [rep.fmt_pct(s[k], s.get(f"{k}_std")) if k in s else "" for _, k in shown]
            rows.append(
                [
                    s["attention"],
                    rep.fmt_pct(s[self.metric], s[f"{self.metric}_std"]),
                    *diff,
                    *extra,
                    f"{s['params']:,}" if s.get("params") else "",
                    f"{s['flops'] / 1e6:.2f}" if s.get("flops") else "",
                    f"{s['extra_flops'] / 1e6:.2f}" if s.get("extra_flops") else "",
                    f"{s['latency_ms']:.3f}" if s.get("latency_ms") else "",
                ]
            )
        return headers, rows


# ---------------------------------------------------------------------------------------------
# 1. validate
def _check_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"bench: {name} must be an integer >= {low}; got {value!r}")
    return value


_ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")


def check_devices(accelerator: str, devices: Any) -> None:
    """Raise ``ValueError`` for a device request this machine cannot meet (no GPU for
    ``--accelerator gpu``, ``--devices 4`` with fewer GPUs, a GPU index that does not exist),
    before any work. ``devices`` is a count, a list of indices, ``-1`` or ``"auto"``."""
    acc = str(accelerator).lower()
    if acc not in _ACCELERATORS:
        raise ValueError(
            f"bench: --accelerator must be one of {', '.join(_ACCELERATORS)}; got {accelerator!r}"
        )
    if devices in ("auto", -1, "-1"):
        return
    if isinstance(devices, (list, tuple)):
        if not devices or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices
        ):
            raise ValueError(f"bench: --devices must list device indices >= 0; got {devices!r}")
        if acc == "cpu":
            raise ValueError(
                f"bench: --devices {','.join(map(str, devices))} lists device "
                "indices, which CPUs do not have; give a number of processes "
                "(e.g. --devices 2) or --accelerator gpu"
            )
        wanted = max(devices) + 1
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        wanted = devices
    else:
        raise ValueError(
            f"bench: --devices must be a number >= 1, a list of indices (0,1) or "
            f"auto; got {devices!r}"
        )
    if acc in ("cpu", "auto"):
        return
    if acc == "mps":
        found, kind = int(torch.backends.mps.is_available()), "Apple MPS device"
    else:
        found, kind = torch.cuda.device_count(), "CUDA GPU"
    if found == 0:
        raise ValueError(
            f"bench: --accelerator {accelerator} asks for a {kind}, but this machine "
            f"has none (torch {torch.__version__}); use --accelerator cpu"
        )
    if wanted > found:
        asked = (
            f"--devices {devices}"
            if isinstance(devices, int)
            else (f"--devices {','.join(map(str, devices))} (index {wanted - 1})")
        )
        raise ValueError(f"bench: {asked} needs {wanted} {kind}(s), but this machine has {found}")


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"bench: --out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"bench: --out {out} is not writable ({err.strerror or err})") from None


def _check_seeds(seeds: Iterable[int] | int) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        return list(range(_check_int("--seeds", seeds)))
    listed = list(seeds)  # type: ignore[arg-type]
    if not listed:
        raise ValueError("bench: --seeds is empty")
    for s in listed:
        _check_int("every seed", s, 0)
    if len(set(listed)) != len(listed):
        raise ValueError(f"bench: --seeds has duplicates: {listed}")
    return listed


def _check_rate(name: str, value: Any, *, zero_ok: bool) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not zero_ok)
    ):
        raise ValueError(
            f"bench: {name} must be a finite number > 0 (>= 0 for weight decay); got {value!r}"
        )
    return float(value)


def _with_defaults(config: BenchConfig, task: Task) -> BenchConfig:
    defaults = task.defaults_for(config.model)
    filled = {
        f.name: defaults[f.name]
        for f in dataclasses.fields(config)
        if getattr(config, f.name) is None and f.name in defaults
    }
    unknown = sorted(set(config.options) - set(task.options))
    if unknown:
        known = ", ".join(sorted(task.options)) or "none"
        raise ValueError(
            f"bench: --task {task.name} takes no option "
            f"{', '.join(map(repr, unknown))}; its options: {known}"
        )
    filled["options"] = {**task.options, **config.options}
    return dataclasses.replace(config, **filled)


def resolve_baseline(specs: Sequence[AttentionSpec], baseline: str | None) -> str | None:
    """The label of the baseline: ``baseline`` (one of ``specs``), else ``none`` when listed,
    else None (no baseline: no differences are computed)."""
    labels = [s.label for s in specs]
    if baseline is None:
        return BASELINE if BASELINE in labels else None
    if not isinstance(baseline, str) or not baseline.strip():
        raise ValueError(
            f"bench: --baseline must be one of the attentions ({', '.join(labels)}); "
            f"got {baseline!r}"
        )
    parsed = parse_attentions(baseline)
    label = parsed[0].label
    if len(parsed) != 1 or label not in labels:
        raise ValueError(
            f"bench: --baseline {baseline!r} is not among the attentions "
            f"({', '.join(labels)}); add it to --attention or choose one of them"
        )
    return label


def split_models(model: Any) -> list[Any]:
    """``"a,b:k=(1, 2)"`` -> ``["a", "b:k=(1, 2)"]``: commas inside brackets or quotes belong to a
    model's arguments; a sequence is returned as a list, anything else as ``[model]``."""
    if isinstance(model, (list, tuple)):
        if not model:
            raise ValueError("bench: --model is empty")
        return list(model)
    if not isinstance(model, str):
        return [model]
    parts, depth, quote, cur = [], 0, "", ""
    for ch in model:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        cur += ch
    parts.append(cur.strip())
    if len(parts) > 1 and not all(parts):
        raise ValueError(f"bench: --model {model!r} has an empty entry")
    return parts


def _arms(
    specs: list[AttentionSpec], models: list[str], given: str | None
) -> tuple[list[AttentionSpec], str | None]:
    """Every (model, attention) arm and the baseline arm's label: ``--baseline`` as
    ``model/attention`` or an attention (on the first model); default the first model's
    ``none`` when listed."""
    arms: list[AttentionSpec] = [ArmSpec(s.name, s.kwargs, model=m) for m in models for s in specs]
    model, att = models[0], given
    if isinstance(given, str) and "/" in given:
        model, _, att = given.strip().partition("/")
        if model not in models:
            raise ValueError(
                f"bench: --baseline {given!r} names no model of --model ({', '.join(models)})"
            )
    baseline = resolve_baseline(specs, att)
    return arms, None if baseline is None else f"{model}/{baseline}"


def validate(config: BenchConfig) -> Bench:
    """Check every option (``ValueError`` naming it) without loading anything heavy; the
    returned :class:`Bench` holds the config with the task's defaults filled in."""
    if not isinstance(config, BenchConfig):
        raise TypeError(f"bench: expected a BenchConfig; got {type(config).__name__}")
    task = get_task(config.task)
    c = _with_defaults(config, task)
    c.epochs = _check_int("--epochs", c.epochs)
    c.batch_size = _check_int("--batch-size", c.batch_size)
    c.num_nodes = _check_int("--num-nodes", c.num_nodes)
    c.image_size = _check_int("--image-size", c.image_size, 8)
    _check_int("--num-workers", c.num_workers, 0)
    _check_int("--panel-images", c.panel_images, 0)
    _check_int("--data-seed", c.data_seed, 0)
    check_devices(c.accelerator, c.devices)
    for name, v in (("n_train", c.n_train), ("n_test", c.n_test)):
        if v is not None:
            _check_int(name, v)
    c.seeds = _check_seeds(c.seeds)
    c.lr = _check_rate("--lr", c.lr, zero_ok=False)
    c.weight_decay = _check_rate("--weight-decay", c.weight_decay, zero_ok=True)
    specs = parse_attentions(c.attention)  # type: ignore[arg-type]
    validate_attentions(specs)
    task.check_config(c)
    resolved = [task.resolve_model(m) for m in split_models(c.model)]
    names = [name for name, _ in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"bench: --model lists a model twice: {', '.join(names)}")
    if len(resolved) == 1:
        baseline = resolve_baseline(specs, c.baseline)
    else:
        specs, baseline = _arms(specs, names, c.baseline)
    task.check_data(c)
    out = Path(c.out)
    _check_out_dir(out)
    return Bench(
        config=c,
        task=task,
        specs=specs,
        baseline=baseline,
        model_name=",".join(names),
        builder=resolved[0][1],
        out=out,
        builders=dict(resolved),
    )


# ---------------------------------------------------------------------------------------------
# 2. build
def _world_size(devices: Any, num_nodes: int) -> int:
    """Processes of a run as far as known before Lightning starts (1 for ``"auto"``)."""
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices * num_nodes
    if isinstance(devices, (list, tuple)):
        return max(len(devices), 1) * num_nodes
    return num_nodes


def build(bench: Bench) -> None:
    """Load the data, check the optimiser schedule, and build and probe one network per
    arm (kept for profiling)."""
    c = bench.config
    bench.data = bench.task.load_data(c)
    steps = steps_per_epoch(
        bench.data.n_train,
        c.batch_size,  # type: ignore[arg-type]
        _world_size(c.devices, c.num_nodes),
    )
    bench.task.check_schedule(c, steps)
    for spec in bench.specs:
        torch.manual_seed(0)
        try:
            bench.models[spec.label] = bench.model_for(spec)
        except (ValueError, TypeError, RuntimeError) as err:
            model = _arm_model(spec) or bench.model_name
            att = spec.attention.label if isinstance(spec, ArmSpec) else spec.label
            raise ValueError(f"bench: cannot build {model} with {att}: {err}") from None


# ---------------------------------------------------------------------------------------------
# 3. plan
def _fingerprint(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_run_dir(run_dir: Path, fingerprint: str, run_config: dict) -> None:
    cfg_file = run_dir / "config.json"
    if not cfg_file.is_file():
        return
    try:
        old = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError):
        return
    if old.get("fingerprint") != fingerprint:
        diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in run_config.items() if old.get(k) != v]
        raise ValueError(
            f"bench: {run_dir} holds a run started with other settings ({'; '.join(diff)}). "
            "Use another --out, or delete that folder to start it again."
        )


def plan(bench: Bench) -> list[RunPlan]:
    """The settings that change the numbers (fingerprinted; per model when there are several)
    and one :class:`RunPlan` per (arm, seed); a folder holding a run with other settings is an
    error."""
    c = bench.config
    bench.run_config = {
        "task": bench.task.name,
        "model": bench.model_name,
        "data": c.data,
        "data_seed": c.data_seed,
        "image_size": c.image_size,
        **bench.data.describe(),
        "epochs": c.epochs,
        "batch_size": c.batch_size,
        "lr": c.lr,
        "weight_decay": c.weight_decay,
        **bench.task.run_settings(c),
        "precision": c.precision,
        "accelerator": c.accelerator,
        "devices": str(c.devices),
        "num_nodes": c.num_nodes,
        "strategy": c.strategy,
    }
    bench.fingerprint = _fingerprint(bench.run_config)
    bench.runs = []
    for spec in bench.specs:
        arm = bench.arm_config(spec)
        for seed in bench.seeds:
            run_dir = bench.out / "runs" / spec.dirname / f"seed{seed}"
            _check_run_dir(run_dir, _fingerprint(arm), arm)
            bench.runs.append(RunPlan(spec, seed, run_dir))
    return bench.runs


# ---------------------------------------------------------------------------------------------
# 4. train
def _say(bench: Bench, text: str) -> None:
    if bench.config.progress:
        print(f"[attnzoo bench] {text}", file=sys.stderr, flush=True)


def train_run(bench: Bench, run: RunPlan) -> tuple[dict[str, Any], bool]:
    """Train one run (resuming from its checkpoint); its result row and whether this process
    is rank 0 (the one that writes)."""
    c, task = bench.config, bench.task
    assert c.epochs is not None  # validated
    arm = bench.arm_config(run.spec)
    fingerprint = _fingerprint(arm)
    model = _arm_model(run.spec)
    attention = run.spec.attention if isinstance(run.spec, ArmSpec) else run.spec
    rep.write_json(
        run.run_dir / "config.json",
        {
            "fingerprint": fingerprint,
            **arm,
            "attention": attention.label,
            **({"arm": run.spec.label} if model else {}),
            "seed": run.seed,
            **task.run_meta(bench.data),
        },
    )
    _say(bench, f"{run.spec.label} seed {run.seed}")
    outcome = train_one(
        lambda: task.make_module(bench.model_for(run.spec), bench.data, c),
        lambda: task.make_loaders(bench.data, c, seed=run.seed),
        epochs=c.epochs,
        seed=run.seed,
        run_dir=run.run_dir,
        accelerator=c.accelerator,
        devices=c.devices,
        num_nodes=c.num_nodes,
        strategy=c.strategy,
        precision=c.precision,
        progress=c.progress,
        verbose=c.verbose,
    )
    if len(outcome.history) != c.epochs:  # never record an interrupted run as finished
        raise RuntimeError(
            f"bench: {run.spec.label} seed {run.seed} stopped after {len(outcome.history)} of "
            f"{c.epochs} epochs; re-run the same command to resume from {run.run_dir}"
        )
    metrics = task.final_row(outcome.history, outcome.module)
    row = {
        "attention": run.spec.label,
        **({"model": model, "attention_name": attention.label} if model else {}),
        "name": run.spec.name,
        "kwargs": dict(run.spec.kwargs),
        "seed": run.seed,
        "metric": metrics[task.metric],
        **metrics,
        "epochs": len(outcome.history),
        "history": outcome.history,
        "train_seconds": outcome.train_seconds,
        "resumed_from_epoch": outcome.resumed_from_epoch,
        "fingerprint": fingerprint,
    }
    return row, outcome.is_global_zero


def train(bench: Bench, command: str) -> tuple[dict[tuple[str, int], dict], list[str], bool]:
    """Every planned run: finished ones read back, the others trained (results.json is
    rewritten after each). Returns the rows by ``(label, seed)``, the reused runs, and whether
    this process is rank 0."""
    results: dict[tuple[str, int], dict] = {}
    skipped: list[str] = []
    is_zero = True
    for run in bench.runs:
        done = run.run_dir / "result.json"
        if done.is_file():
            results[(run.spec.label, run.seed)] = json.loads(done.read_text())
            skipped.append(f"{run.spec.label}/seed{run.seed}")
            continue
        row, is_zero = train_run(bench, run)
        results[(run.spec.label, run.seed)] = row
        if is_zero:
            rep.write_json(done, row)
            runs, summary = statistics(bench, results)
            write_results(bench, runs, summary, command, partial=True)
    return results, skipped, is_zero


# ---------------------------------------------------------------------------------------------
# 5. localise, 6. profile
def localise(bench: Bench) -> dict[tuple[str, int], dict]:
    """The task's per-run scores of the trained runs (``{}`` when it has none)."""
    return bench.task.localise(bench.runs, bench.data, bench.config)


def profile_attention_model(
    model: nn.Module, input_shape: tuple[int, ...], *, min_run_time: float = 0.5
) -> dict[str, Any]:
    """Params, FLOPs, CPU latency (batch 1, ms) and peak activation memory of ``model`` at
    ``(1, *input_shape)``, measured by :mod:`attnzoo.bench.profiling`."""
    from attnzoo.bench import profiling

    model = model.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((1, *input_shape), generator=gen)
    row = profiling.profile_model(model, x, memory=True, min_run_time=min_run_time)
    return {
        "params": int(row.params),
        "flops": int(row.flops),
        "extra_flops": int(row.extra_flops),
        "latency_ms": row.latency_ms,
        "peak_mb": row.peak_mb,
        "profiler": "attnzoo.bench.profiling",
    }


def profile(bench: Bench) -> dict[str, dict]:
    """Cost of each attention's network at the task's input shape."""
    _say(bench, "profiling")
    shape = bench.task.input_shape(bench.data, bench.config)
    with filtered_native_stderr(bench.config.verbose):  # the profiler's C++ traces
        return {label: profile_attention_model(m, shape) for label, m in bench.models.items()}


# ---------------------------------------------------------------------------------------------
# 7. statistics
def statistics(
    bench: Bench,
    results: Mapping[tuple[str, int], dict],
    prof: Mapping[str, dict] | None = None,
    scores: Mapping[tuple[str, int], dict] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Run rows (with the task's per-run ``scores``) and one summary row per attention: the
    primary metric's mean ± std over seeds and paired difference to the baseline (95 % CI over
    the shared seeds), the secondary metrics' mean ± std, the profile, the scores' summary."""
    task, baseline, seeds = bench.task, bench.baseline, bench.seeds
    key, prof, scores = task.metric, prof or {}, scores or {}
    runs = [
        {**results[(s.label, seed)], **scores.get((s.label, seed), {})}
        for s in bench.specs
        for seed in seeds
        if (s.label, seed) in results
    ]
    base = (
        {}
        if baseline is None
        else {seed: results[(baseline, seed)][key] for seed in seeds if (baseline, seed) in results}
    )
    summary = []
    for s in bench.specs:
        got = {seed: results[(s.label, seed)] for seed in seeds if (s.label, seed) in results}
        if not got:
            continue
        st = summarize([r[key] for r in got.values()])
        row: dict[str, Any] = {
            "attention": s.label,
            "n_seeds": st.n,
            key: st.mean,
            f"{key}_std": st.std,
            "metric": st.mean,
            "metric_std": st.std,
        }
        for k in task.secondary:
            vals = [r[k] for r in got.values() if r.get(k) is not None]
            if vals:
                sk = summarize(vals)
                row.update({k: sk.mean, f"{k}_std": sk.std})
        row.update(prof.get(s.label, {}))
        if baseline is not None:
            row["baseline"] = baseline
        if s.label != baseline and base and set(got) & set(base):
            d = paired_difference({seed: r[key] for seed, r in got.items()}, base)
            row.update(
                diff_vs_baseline=d.mean,
                diff_std=d.std,
                diff_low=d.low,
                diff_high=d.high,
                diff_seeds=list(d.seeds),
                verdict=d.verdict,
                detectable=d.detectable,
            )
            if baseline == BASELINE:  # the name used before other baselines were possible
                row["diff_vs_none"] = d.mean
        elif s.label == baseline:
            row["verdict"] = "baseline"
        summary.append(row)
    if scores:
        extra = {
            r["attention"]: r
            for r in task.summarize_extra(
                [s.label for s in bench.specs], seeds, scores, baseline, bench.data
            )
        }
        for row in summary:
            more = extra.get(row["attention"], {})
            row.update({k: v for k, v in more.items() if k not in ("attention", "n_seeds")})
    return runs, summary


def environment() -> dict[str, Any]:
    """Versions and hardware, for the report."""
    import importlib.metadata as md

    import attnzoo

    def ver(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    return {
        "attnzoo": attnzoo.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": ver("lightning"),
        "torchmetrics": ver("torchmetrics"),
        "numpy": ver("numpy"),
        "scikit-learn": ver("scikit-learn"),
        "matplotlib": ver("matplotlib"),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


def write_results(
    bench: Bench, runs: Sequence[dict], summary: Sequence[dict], command: str, *, partial: bool
) -> None:
    """``results.json`` (everything, fractions) and ``results.csv`` (one line per run, then
    one per attention), each written atomically."""
    task = bench.task
    payload = {
        "attnzoo_bench": 1,
        "complete": not partial,
        "task": task.name,
        "metric": task.metric,
        "metric_label": task.metric_label,
        "command": command,
        "config": bench.run_config,
        "seeds": bench.seeds,
        "attentions": [s.label for s in bench.specs],
        "baseline": bench.baseline,
        "environment": environment(),
        "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "summary": list(summary),
        "runs": list(runs),
    }
    rep.write_json(bench.out / "results.json", payload)
    rep.write_results_csv(
        bench.out / "results.csv",
        [
            {"task": task.name, **r, "train_seconds": round(r.get("train_seconds", 0.0), 2)}
            for r in runs
        ],
        [
            {"task": task.name, **s, "diff_vs_baseline": s.get("diff_vs_baseline", ""), "seed": ""}
            for s in summary
        ],
        rep.csv_columns(task.metric, task.csv_columns),
    )


# ---------------------------------------------------------------------------------------------
# 8. report
def report(bench: Bench, result: BenchResult, command: str) -> None:
    """report.md and report.html: the engine's sections around the task's
    (:class:`~attnzoo.bench.tasks.base.TaskReport`), then ``extra_sections``."""
    c = bench.config
    task_part: TaskReport = bench.task.report(result, bench.data, c, bench.runs)
    sections = rep.build_sections(
        result, bench.data, bench.run_config, environment(), command, task_part
    )
    extra = list(c.extra_sections(result, bench.data)) if c.extra_sections else []
    result.report_md, result.report_html = rep.write_report(
        bench.out, "attnzoo bench report", sections, extra
    )


# ---------------------------------------------------------------------------------------------
def python_command(config: BenchConfig) -> str:
    """``attnzoo.bench.run(...)`` with every option of ``config`` (callables by name)."""
    parts = []
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if f.name == "command":
            continue
        if f.name == "attention":
            parts.append(repr(v if isinstance(v, str) else ",".join(v)))
        elif callable(v):
            parts.append(f"{f.name}={getattr(v, '__name__', repr(v))}")
        elif f.name == "options" and not v:
            continue
        else:
            parts.append(f"{f.name}={str(v) if isinstance(v, os.PathLike) else v!r}")
    return "attnzoo.bench.run(" + ", ".join(parts) + ")"


def execute(config: BenchConfig) -> BenchResult:
    """All stages in order (see the module docstring); validation and building finish before
    the first training step, so a bad option never costs a run."""
    t0 = time.perf_counter()
    bench = validate(config)
    build(bench)
    plan(bench)
    c, task = bench.config, bench.task
    command = c.command or python_command(c)
    results, skipped, is_zero = train(bench, command)
    result = BenchResult(
        out=bench.out,
        runs=[],
        summary=[],
        skipped=skipped,
        baseline=bench.baseline,
        task=task.name,
        metric=task.metric,
        metric_label=task.metric_label,
        columns=task.columns,
        config=bench.run_config,
    )
    if not is_zero:  # a DDP worker: rank 0 writes the results and the report
        return result
    scores = localise(bench)
    prof = profile(bench) if c.profile else {}
    result.runs, result.summary = statistics(bench, results, prof, scores)
    write_results(bench, result.runs, result.summary, command, partial=False)
    result.wall_seconds = time.perf_counter() - t0
    if c.report:
        report(bench, result, command)
    return result
