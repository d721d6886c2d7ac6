"""``attnzoo.bench.run``: train a backbone with each attention module over several seeds, and
report accuracy with its uncertainty next to params, FLOPs and CPU latency.

Layout of ``out`` (re-running the same command resumes; finished runs are skipped)::

    out/
      results.json, results.csv      every finished run and the summary (rewritten atomically)
      report.md, report.html         the report (HTML self-contained), figures/*.png
      runs/<attention>/seed<k>/      last.ckpt (each epoch), result.json (when done), logs/
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnzoo.bench import report as rep
from attnzoo.bench.data import BenchData, check_data_spec, load_data
from attnzoo.bench.quiet import filtered_native_stderr
from attnzoo.bench.stats import paired_difference, summarize
from attnzoo.bench.train import TrainConfig, check_lr_schedule, steps_per_epoch, train_one
from attnzoo.models import resolve_builder
from attnzoo.specs import (
    BASELINE,
    DEFAULT_ATTENTIONS,
    DEFAULT_MODEL,
    AttentionSpec,
    parse_attentions,
    validate_attentions,
)

__all__ = [
    "DEFAULT_ATTENTIONS",
    "DEFAULT_MODEL",
    "AttentionSpec",
    "BenchResult",
    "load_run_model",
    "parse_attentions",
    "resolve_builder",
    "run",
]


# ---------------------------------------------------------------------------------------------
# models (names and the name:key=value syntax: attnzoo.specs)
def _model_factory(builder: Callable[..., nn.Module], spec: AttentionSpec,
                   num_classes: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        if spec.name == BASELINE:
            return builder(attention=None, num_classes=num_classes)
        return builder(attention=spec.name, num_classes=num_classes, **dict(spec.kwargs))

    return build


# ---------------------------------------------------------------------------------------------
def _check_positive_int(name: str, value: Any, low: int = 1) -> int:
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
        raise ValueError(f"bench: --accelerator must be one of {', '.join(_ACCELERATORS)}; "
                         f"got {accelerator!r}")
    if devices in ("auto", -1, "-1"):
        return
    if isinstance(devices, (list, tuple)):
        if not devices or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                  for d in devices):
            raise ValueError(f"bench: --devices must list device indices >= 0; got {devices!r}")
        if acc == "cpu":
            raise ValueError(f"bench: --devices {','.join(map(str, devices))} lists device "
                             "indices, which CPUs do not have; give a number of processes "
                             "(e.g. --devices 2) or --accelerator gpu")
        wanted = max(devices) + 1
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        wanted = devices
    else:
        raise ValueError(f"bench: --devices must be a number >= 1, a list of indices (0,1) or "
                         f"auto; got {devices!r}")
    if acc in ("cpu", "auto"):
        return
    if acc == "mps":
        found = int(torch.backends.mps.is_available())
        kind = "Apple MPS device"
    else:
        found = torch.cuda.device_count()
        kind = "CUDA GPU"
    if found == 0:
        raise ValueError(f"bench: --accelerator {accelerator} asks for a {kind}, but this machine "
                         f"has none (torch {torch.__version__}); use --accelerator cpu")
    if wanted > found:
        asked = f"--devices {devices}" if isinstance(devices, int) else (
            f"--devices {','.join(map(str, devices))} (index {wanted - 1})")
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


def _fingerprint(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    env = {
        "attnzoo": attnzoo.__version__, "python": platform.python_version(),
        "torch": torch.__version__, "lightning": ver("lightning"),
        "torchmetrics": ver("torchmetrics"), "numpy": ver("numpy"),
        "scikit-learn": ver("scikit-learn"), "matplotlib": ver("matplotlib"),
        "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    return env


# ---------------------------------------------------------------------------------------------
# profiling
def profile_attention_model(model: nn.Module, input_shape: tuple[int, ...], *,
                            min_run_time: float = 0.5) -> dict[str, Any]:
    """Params, FLOPs, CPU latency (batch 1, ms) and peak activation memory of ``model`` at
    ``(1, *input_shape)``, measured by :mod:`attnzoo.bench.profiling`."""
    from attnzoo.bench import profiling

    model = model.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((1, *input_shape), generator=gen)
    row = profiling.profile_model(model, x, memory=True, min_run_time=min_run_time)
    return {"params": int(row.params), "flops": int(row.flops),
            "extra_flops": int(row.extra_flops), "latency_ms": row.latency_ms,
            "peak_mb": row.peak_mb, "profiler": "attnzoo.bench.profiling"}


# ---------------------------------------------------------------------------------------------
@dataclass
class BenchResult:
    """What :func:`run` returns: per-run rows, the summary per attention, and the report paths.

    Units: every accuracy, difference and localisation score in ``runs``, ``summary``,
    ``results.json`` and ``results.csv`` is a **fraction** (``test_acc`` 0.912,
    ``diff_vs_baseline`` 0.012 with ``diff_low``/``diff_high``); the printed tables and the
    report show the same numbers ×100, as percentages and percentage points (``+1.20``).
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

    def table(self) -> tuple[list[str], list[list[str]]]:
        localised = any("pointing_game" in s for s in self.summary)
        headers = ["attention", "top-1 % (mean ± std)"]
        if self.baseline is not None:
            headers += [f"Δ vs {self.baseline} [95% CI]", "verdict"]
        if localised:
            headers += ["pointing game %", "energy in box %"]
        headers += ["params", "MFLOPs", "+elementwise", "latency ms"]
        rows = []
        for s in self.summary:
            loc = [rep.fmt_pct(s["pointing_game"], s["pointing_game_std"]),
                   rep.fmt_pct(s["energy_in_box"], s["energy_in_box_std"])
                   ] if "pointing_game" in s else ["", ""]
            diff = [] if self.baseline is None else [
                "baseline" if s.get("diff_vs_baseline") is None
                else rep.fmt_diff(s["diff_vs_baseline"], s["diff_low"], s["diff_high"]),
                s.get("verdict", "")]
            rows.append([
                s["attention"], rep.fmt_pct(s["test_acc"], s["test_acc_std"]), *diff,
                *(loc if localised else []),
                f"{s['params']:,}" if s.get("params") else "",
                f"{s['flops'] / 1e6:.2f}" if s.get("flops") else "",
                f"{s['extra_flops'] / 1e6:.2f}" if s.get("extra_flops") else "",
                f"{s['latency_ms']:.3f}" if s.get("latency_ms") else ""])
        return headers, rows


def run(
    attention: str | Sequence[str] = DEFAULT_ATTENTIONS,
    *,
    model: str | Callable[..., nn.Module] = DEFAULT_MODEL,
    data: str = "digits",
    epochs: int = 8,
    seeds: Iterable[int] | int = (0, 1, 2),
    batch_size: int = 64,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    out: str | os.PathLike = "bench-out",
    devices: Any = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    accelerator: str = "cpu",
    precision: str | None = None,
    image_size: int = 32,
    n_train: int | None = None,
    n_test: int | None = None,
    data_seed: int = 0,
    num_workers: int = 0,
    progress: bool = True,
    verbose: bool = False,
    profile: bool = True,
    localise: bool = True,
    cam_method: str = "gradcam",
    panel_images: int = 6,
    report: bool = True,
    command: str | None = None,
    extra_sections: Callable[[BenchResult, BenchData], Sequence[rep.Section]] | None = None,
    baseline: str | None = None,
) -> BenchResult:
    """Train ``model`` with each attention for each seed on ``data`` and write the report.

    Everything is validated before the first training step (names, keyword arguments, data,
    output folder, numbers). Re-running with the same ``out`` resumes unfinished runs from their
    last epoch checkpoint and skips finished ones; a run's settings must match those it was
    started with. See ``attnzoo bench --help`` and the README for the options.

    Args:
        attention: comma-separated specs or a list (``"none,se,cbam:reduction=8"``).
        baseline: the attention the paired differences (Δ) are computed against, one of
            ``attention`` (e.g. ``"se"`` to ask whether CBAM adds anything over SE). Default:
            ``none`` when it is in the list; otherwise there is no baseline, and the results and
            report show no Δ (they say so).
        model: a builder name (default :func:`~attnzoo.bench.small_models.cifar_resnet8`) or a
            callable ``builder(attention=..., num_classes=..., **kwargs)``.
        data: ``digits`` (built-in), a folder of class sub-folders, or ``cifar10:/path`` /
            ``cifar100:/path``.
        seeds: seeds (an int ``n`` means ``0..n-1``).
        n_train, n_test: sizes of the built-in data; for other data, stratified subsets (the
            same share of each class, drawn with ``data_seed``; the counts per class used are
            ``results.json``'s ``config.class_counts``).
        localise: Grad-CAM panels of ``panel_images`` test images in the report and, on data
            with boxes (the built-in digits), the pointing game and energy-in-box scores of every
            run (:mod:`attnzoo.bench.localisation`); needs ``grad-cam`` (``attnzoo[viz]``).
        cam_method: the CAM method for both (``attnzoo.viz.CAM_METHODS``).
        extra_sections: ``f(result, data) -> [Section]`` appended to the report.
        progress, verbose: progress bars and status lines (on ``stderr``); ``verbose`` also shows
            what Lightning and the profiler print (:mod:`attnzoo.bench.quiet`).
    """
    t0 = time.perf_counter()
    call = _python_command(dict(locals()))
    # ---- validate everything first ----------------------------------------------------------
    epochs = _check_positive_int("--epochs", epochs)
    batch_size = _check_positive_int("--batch-size", batch_size)
    num_nodes = _check_positive_int("--num-nodes", num_nodes)
    image_size = _check_positive_int("--image-size", image_size, 8)
    _check_positive_int("--num-workers", num_workers, 0)
    check_devices(accelerator, devices)
    for name, v in (("n_train", n_train), ("n_test", n_test)):
        if v is not None:
            _check_positive_int(name, v)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(_check_positive_int("--seeds", seeds)))
    seeds = list(seeds)
    if not seeds:
        raise ValueError("bench: --seeds is empty")
    for s in seeds:
        _check_positive_int("every seed", s, 0)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"bench: --seeds has duplicates: {seeds}")
    for name, v in (("--lr", lr), ("--weight-decay", weight_decay)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (
                v < 0) or (name == "--lr" and v == 0):
            raise ValueError(f"bench: {name} must be a finite number > 0 (>= 0 for weight "
                             f"decay); got {v!r}")
    specs = parse_attentions(attention)
    validate_attentions(specs)
    base_label = _resolve_baseline(specs, baseline)
    if localise:
        from attnzoo.bench.localisation import check_localisation_available
        from attnzoo.viz import CAM_METHODS

        check_localisation_available()
        if str(cam_method).lower() not in CAM_METHODS:
            raise ValueError(f"bench: unknown --cam-method {cam_method!r}; choose from "
                             f"{', '.join(CAM_METHODS)}")
        _check_positive_int("--panel-images", panel_images, 0)
    model_name, builder = resolve_builder(model)
    check_data_spec(data)
    out = Path(out)
    _check_out_dir(out)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=float(lr),
                      weight_decay=float(weight_decay))
    bench_data = load_data(data, image_size=image_size, seed=data_seed, n_train=n_train,
                           n_test=n_test)
    check_lr_schedule(cfg, steps_per_epoch(len(bench_data.train), batch_size,
                                           _world_size(devices, num_nodes)))
    probe = bench_data.test.images[:2]
    models: dict[str, nn.Module] = {}
    for spec in specs:
        torch.manual_seed(0)
        try:
            m = _model_factory(builder, spec, bench_data.num_classes)()
            with torch.no_grad():
                y = m.eval()(probe)
        except (ValueError, TypeError, RuntimeError) as err:
            raise ValueError(f"bench: cannot build {model_name} with {spec.label}: {err}") from None
        if tuple(y.shape) != (probe.shape[0], bench_data.num_classes):
            raise ValueError(f"bench: {model_name} with {spec.label} returns shape "
                             f"{tuple(y.shape)}, expected (B, {bench_data.num_classes})")
        models[spec.label] = m

    run_config = {
        "model": model_name, "data": data, "data_seed": data_seed, "image_size": image_size,
        "n_train": len(bench_data.train), "n_test": len(bench_data.test),
        "class_counts": bench_data.class_counts,
        "epochs": epochs, "batch_size": batch_size, "lr": float(lr),
        "weight_decay": float(weight_decay), "momentum": cfg.momentum,
        "precision": precision, "accelerator": accelerator, "devices": str(devices),
        "num_nodes": num_nodes, "strategy": strategy,
    }
    fingerprint = _fingerprint(run_config)
    plan = []
    for spec in specs:
        for seed in seeds:
            run_dir = out / "runs" / spec.dirname / f"seed{seed}"
            _check_run_dir(run_dir, fingerprint, run_config)
            plan.append((spec, seed, run_dir))

    # ---- train ---------------------------------------------------------------------------------
    results: dict[tuple[str, int], dict] = {}
    skipped = []
    is_zero = True
    for spec, seed, run_dir in plan:
        done = run_dir / "result.json"
        if done.is_file():
            results[(spec.label, seed)] = json.loads(done.read_text())
            skipped.append(f"{spec.label}/seed{seed}")
            continue
        rep.write_json(run_dir / "config.json", {"fingerprint": fingerprint, **run_config,
                                                 "attention": spec.label, "seed": seed,
                                                 "num_classes": bench_data.num_classes,
                                                 "classes": list(bench_data.classes),
                                                 "mean": list(bench_data.mean),
                                                 "std": list(bench_data.std)})
        if progress:
            print(f"[attnzoo bench] {spec.label} seed {seed}", file=sys.stderr, flush=True)
        outcome = train_one(
            _model_factory(builder, spec, bench_data.num_classes), bench_data.train,
            bench_data.test, bench_data.num_classes, cfg, seed=seed, run_dir=run_dir,
            accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
            precision=precision, progress=progress, num_workers=num_workers, verbose=verbose)
        is_zero = outcome.is_global_zero
        if len(outcome.history) != epochs:  # never record an interrupted run as finished
            raise RuntimeError(
                f"bench: {spec.label} seed {seed} stopped after {len(outcome.history)} of "
                f"{epochs} epochs; re-run the same command to resume from {run_dir}")
        last = outcome.history[-1]
        row = {"attention": spec.label, "name": spec.name, "kwargs": dict(spec.kwargs),
               "seed": seed, "test_acc": last["test_acc"], "test_n": last["test_n"],
               "test_loss": last["test_loss"], "train_acc": last["train_acc"],
               "train_loss": last["train_loss"], "epochs": len(outcome.history),
               "history": outcome.history, "train_seconds": outcome.train_seconds,
               "resumed_from_epoch": outcome.resumed_from_epoch, "fingerprint": fingerprint,
               "confusion": outcome.confusion}
        results[(spec.label, seed)] = row
        if is_zero:
            rep.write_json(done, row)
            _write_results(out, specs, seeds, results, {}, run_config, command or call,
                           partial=True, baseline=base_label)
    result = BenchResult(out=out, runs=[], summary=[], skipped=skipped, baseline=base_label)
    if not is_zero:
        return result

    # ---- localisation, profile, statistics, report -----------------------------------------
    loc: dict[tuple[str, int], dict] = {}
    if localise and bench_data.test.boxes is not None:
        from attnzoo.bench.localisation import localise_run

        for spec, seed, run_dir in plan:
            if progress:
                print(f"[attnzoo bench] localisation ({cam_method}) {spec.label} seed {seed}",
                      file=sys.stderr, flush=True)
            loc[(spec.label, seed)] = localise_run(run_dir, bench_data, method=cam_method)
    prof: dict[str, dict] = {}
    if profile:
        if progress:
            print("[attnzoo bench] profiling", file=sys.stderr, flush=True)
        with filtered_native_stderr(verbose):  # the profiler's C++ traces
            for spec in specs:
                prof[spec.label] = profile_attention_model(models[spec.label],
                                                           bench_data.input_shape)
    runs, summary = _write_results(out, specs, seeds, results, prof, run_config, command or call,
                                   partial=False, loc=loc, baseline=base_label)
    result.runs, result.summary = runs, summary
    result.wall_seconds = time.perf_counter() - t0
    if report:
        looks: list[rep.Section] = []
        if localise and panel_images:
            from attnzoo.bench.localisation import report_sections

            looks = report_sections(result, bench_data, plan, seeds, cam_method, panel_images)
        sections = rep.build_sections(result, bench_data, run_config, environment(),
                                      command or call, looks=looks)
        extra = list(extra_sections(result, bench_data)) if extra_sections else []
        result.report_md, result.report_html = rep.write_report(
            out, "attnzoo bench report", sections, extra)
    return result


def _world_size(devices: Any, num_nodes: int) -> int:
    """Processes of a run as far as known before Lightning starts (1 for ``"auto"``)."""
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices * num_nodes
    if isinstance(devices, (list, tuple)):
        return max(len(devices), 1) * num_nodes
    return num_nodes


def _resolve_baseline(specs: Sequence[AttentionSpec], baseline: str | None) -> str | None:
    """The label of the baseline: ``baseline`` (one of ``specs``), else ``none`` when listed,
    else None (no baseline: no differences are computed)."""
    labels = [s.label for s in specs]
    if baseline is None:
        return BASELINE if BASELINE in labels else None
    if not isinstance(baseline, str) or not baseline.strip():
        raise ValueError(f"bench: --baseline must be one of the attentions ({', '.join(labels)}); "
                         f"got {baseline!r}")
    parsed = parse_attentions(baseline)
    label = parsed[0].label
    if len(parsed) != 1 or label not in labels:
        raise ValueError(f"bench: --baseline {baseline!r} is not among the attentions "
                         f"({', '.join(labels)}); add it to --attention or choose one of them")
    return label


def _python_command(scope: dict) -> str:
    """``attnzoo.bench.run(...)`` with every argument spelled out (callables by name)."""
    parts = []
    for k, v in scope.items():
        if k == "t0":
            continue
        if callable(v):
            v = getattr(v, "__name__", repr(v))
            parts.append(f"{k}={v}")
        elif k == "attention":
            parts.append(repr(v if isinstance(v, str) else ",".join(v)))
        else:
            parts.append(f"{k}={str(v) if isinstance(v, os.PathLike) else v!r}")
    return "attnzoo.bench.run(" + ", ".join(parts) + ")"


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
            "Use another --out, or delete that folder to start it again.")


def _write_results(out: Path, specs: Sequence[AttentionSpec], seeds: Sequence[int],
                   results: dict[tuple[str, int], dict], prof: dict[str, dict], run_config: dict,
                   command: str | None, *, partial: bool,
                   loc: dict[tuple[str, int], dict] | None = None,
                   baseline: str | None = BASELINE) -> tuple[list[dict], list[dict]]:
    loc = loc or {}
    runs = [{**results[(s.label, seed)], **_loc_fields(loc.get((s.label, seed)))}
            for s in specs for seed in seeds if (s.label, seed) in results]
    base = {seed: results[(baseline, seed)]["test_acc"] for seed in seeds
            if (baseline, seed) in results}
    summary = []
    for s in specs:
        per_seed = {seed: results[(s.label, seed)]["test_acc"] for seed in seeds
                    if (s.label, seed) in results}
        if not per_seed:
            continue
        st = summarize(list(per_seed.values()))
        row: dict[str, Any] = {"attention": s.label, "n_seeds": st.n, "test_acc": st.mean,
                               "test_acc_std": st.std, **prof.get(s.label, {})}
        if baseline is not None:
            row["baseline"] = baseline
        if s.label != baseline and base and set(per_seed) & set(base):
            d = paired_difference(per_seed, base)
            row.update(diff_vs_baseline=d.mean, diff_std=d.std, diff_low=d.low,
                       diff_high=d.high, diff_seeds=list(d.seeds), verdict=d.verdict,
                       detectable=d.detectable)
            if baseline == BASELINE:  # the name used before other baselines were possible
                row["diff_vs_none"] = d.mean
        elif s.label == baseline:
            row["verdict"] = "baseline"
        summary.append(row)
    if loc:
        from attnzoo.bench.localisation import summarize_localisation

        by_label = {r["attention"]: r for r in summarize_localisation(
            [s.label for s in specs], seeds, loc, baseline=baseline)}
        for row in summary:
            extra = by_label.get(row["attention"], {})
            row.update({k: v for k, v in extra.items() if k not in ("attention", "n_seeds")})
    payload = {"attnzoo_bench": 1, "complete": not partial, "command": command,
               "config": run_config, "seeds": list(seeds),
               "attentions": [s.label for s in specs], "baseline": baseline,
               "environment": environment(),
               "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "summary": summary, "runs": runs}
    rep.write_json(out / "results.json", payload)
    rep.write_results_csv(out / "results.csv", [
        {**r, "train_seconds": round(r.get("train_seconds", 0.0), 2)} for r in runs],
        [{**s, "diff_vs_baseline": s.get("diff_vs_baseline", ""), "seed": ""}
         for s in summary])
    return runs, summary


def _loc_fields(scores: dict | None) -> dict[str, Any]:
    if not scores:
        return {}
    return {"pointing_game": scores["pointing_game"], "energy_in_box": scores["energy_in_box"],
            "cam_method": scores["method"]}


def cli_command(argv: Sequence[str]) -> str:
    """The exact command line as a copy-pasteable string."""
    return "attnzoo " + shlex.join(list(argv))


def load_run_model(run_dir: str | os.PathLike) -> tuple[nn.Module, dict]:
    """The trained network of one run folder (``out/runs/<attention>/seed<k>``) in eval mode,
    and its ``config.json`` (model, data, attention, seed...). Weights come from ``last.ckpt``
    loaded with ``weights_only=True``. For Grad-CAM panels and attention maps of a bench."""
    run_dir = Path(run_dir)
    cfg_file, ckpt_file = run_dir / "config.json", run_dir / "last.ckpt"
    for f in (cfg_file, ckpt_file):
        if not f.is_file():
            raise ValueError(f"bench: {run_dir} is not a bench run folder ({f.name} is missing)")
    cfg = json.loads(cfg_file.read_text())
    spec = parse_attentions(cfg["attention"])[0]
    _, builder = resolve_builder(cfg["model"])
    ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=True)
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    num_classes = cfg.get("num_classes")
    if num_classes is None:  # the classifier is the last 2-D weight of the builders' networks
        num_classes = [v for v in state.values() if v.ndim == 2][-1].shape[0]
    model = _model_factory(builder, spec, num_classes)()
    model.load_state_dict(state)
    return model.eval(), cfg
