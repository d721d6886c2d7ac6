"""``attnzoo.bench.run``: train a backbone with each attention module over several seeds, and
report accuracy with its uncertainty next to params, FLOPs and CPU latency.

Layout of ``out`` (re-running the same command resumes; finished runs are skipped)::

    out/
      results.json, results.csv      every finished run and the summary (rewritten atomically)
      report.md, report.html         the report (HTML self-contained), figures/*.png
      runs/<attention>/seed<k>/      last.ckpt (each epoch), result.json (when done), logs/
"""

from __future__ import annotations

import ast
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
from attnzoo.bench.stats import paired_difference, summarize
from attnzoo.bench.train import TrainConfig, train_one

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

DEFAULT_ATTENTIONS = ("none", "se", "cbam", "eca", "gc", "ca", "ema")
DEFAULT_MODEL = "cifar_resnet8"
BASELINE = "none"


# ---------------------------------------------------------------------------------------------
# attention specs
@dataclass(frozen=True)
class AttentionSpec:
    """A registry name (or ``none``) with keyword arguments, e.g. ``cbam:reduction=8``."""

    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        if not self.kwargs:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                                          for k, v in self.kwargs)

    @property
    def dirname(self) -> str:
        safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in self.label)
        if safe == self.label:
            return safe
        return f"{safe}-{hashlib.sha1(self.label.encode()).hexdigest()[:6]}"


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_attentions(spec: str | Sequence[str]) -> list[AttentionSpec]:
    """Parse ``"none,se,cbam:reduction=8,kernel_size=3,eca"``.

    Entries are separated by commas; ``name:key=value`` adds keyword arguments, and a following
    ``key=value`` entry without a name belongs to the previous module. Values are Python literals
    (``8``, ``0.5``, ``True``, ``'att'``) or plain strings.
    """
    tokens: list[str] = []
    for part in [spec] if isinstance(spec, str) else list(spec):
        tokens += [t.strip() for t in str(part).split(",")]
    if not any(tokens):
        raise ValueError("bench: --attention is empty; give e.g. none,se,cbam")
    specs: list[tuple[str, dict[str, Any]]] = []
    for tok in tokens:
        if not tok:
            continue
        if ":" not in tok and "=" in tok:
            if not specs:
                raise ValueError(f"bench: --attention entry {tok!r} has no module name before it")
            key, _, val = tok.partition("=")
            specs[-1][1][key.strip()] = _value(val.strip())
            continue
        name, _, rest = tok.partition(":")
        kwargs: dict[str, Any] = {}
        for kv in filter(None, (s.strip() for s in rest.split(":"))):
            key, eq, val = kv.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"bench: cannot read {kv!r} in --attention {tok!r}; "
                                 "expected name:key=value")
            kwargs[key.strip()] = _value(val.strip())
        specs.append((name.strip().lower(), kwargs))
    out = [AttentionSpec(n, tuple(sorted(k.items()))) for n, k in specs]
    labels = [s.label for s in out]
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise ValueError(f"bench: --attention lists {', '.join(dup)} more than once")
    return out


def validate_attentions(specs: Sequence[AttentionSpec]) -> None:
    """Unknown names (with the available list), non-2-D modules, unknown keyword arguments."""
    import inspect

    import attnzoo

    avail = attnzoo.available()
    unknown = [s.name for s in specs if s.name != BASELINE and s.name not in avail]
    if unknown:
        raise ValueError(f"bench: unknown attention {', '.join(map(repr, unknown))}. Available: "
                         f"{BASELINE} (the baseline), {', '.join(avail)}")
    for s in specs:
        if s.name == BASELINE:
            if s.kwargs:
                raise ValueError(f"bench: {BASELINE} (no attention) takes no arguments; got "
                                 f"{s.label}")
            continue
        meta = attnzoo.info(s.name)
        if meta.spatial_dims != 2:
            raise ValueError(f"bench: {s.name} works on {meta.spatial_dims}-D feature maps; the "
                             "bench's networks need a 2-D module (B, C, H, W)")
        params = inspect.signature(meta.cls.__init__).parameters
        takes_var = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        allowed = {k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        allowed.add("preset")
        bad = [k for k, _ in s.kwargs if k not in allowed]
        if bad and not takes_var:
            raise ValueError(f"bench: {meta.cls.__name__} ({s.name}) takes no argument "
                             f"{', '.join(map(repr, bad))}; it takes: "
                             f"{', '.join(sorted(allowed - {'preset'})) or 'none'}")


# ---------------------------------------------------------------------------------------------
# models
def _builders() -> dict[str, Callable[..., nn.Module]]:
    from attnzoo.bench.small_models import SMALL_BUILDERS

    found: dict[str, Callable[..., nn.Module]] = {}
    try:
        from attnzoo.models import BUILDERS
    except ImportError:
        BUILDERS = {}
    found.update(BUILDERS)
    found.update(SMALL_BUILDERS)
    return found


def resolve_builder(model: str | Callable[..., nn.Module]) -> tuple[str, Callable[..., nn.Module]]:
    """A builder name (``cifar_resnet8``, ``resnet18``...) or a callable
    ``builder(attention=None|name, num_classes=..., **attention_kwargs) -> nn.Module``."""
    if callable(model):
        return getattr(model, "__name__", repr(model)), model
    builders = _builders()
    if model not in builders:
        raise ValueError(f"bench: unknown --model {model!r}. Available: "
                         f"{', '.join(sorted(builders))}")
    return model, builders[model]


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
# profiling (issue 4's attnzoo.bench.profiling when available, else a small fallback)
def profile_attention_model(model: nn.Module, input_shape: tuple[int, ...], *,
                            min_run_time: float = 0.5) -> dict[str, Any]:
    """Params, FLOPs, CPU latency (batch 1, ms) and peak activation memory of ``model`` at
    ``(1, *input_shape)``, with issue 4's :mod:`attnzoo.bench.profiling` (a small local fallback
    when it is missing)."""
    model = model.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((1, *input_shape), generator=gen)
    try:
        from attnzoo.bench import profiling
    except ImportError:
        return _fallback_profile(model, x)
    row = profiling.profile_model(model, x, memory=True, min_run_time=min_run_time)
    return {"params": int(row.params), "flops": int(row.flops),
            "extra_flops": int(row.extra_flops), "latency_ms": row.latency_ms,
            "peak_mb": row.peak_mb, "profiler": "attnzoo.bench.profiling"}


def _fallback_profile(model: nn.Module, x: torch.Tensor, repeats: int = 30) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    from attnzoo.ops import kernels

    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with kernels.disabled(), counter:  # the counter sees torch ops only
            model(x)
        flops = counter.get_total_flops()
        for _ in range(5):
            model(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    times.sort()
    return {"params": int(params), "flops": float(flops),
            "latency_ms": 1000 * times[len(times) // 2], "profiler": "fallback (flop_counter)"}


# ---------------------------------------------------------------------------------------------
@dataclass
class BenchResult:
    """What :func:`run` returns: per-run rows, the summary per attention, and the report paths."""

    out: Path
    runs: list[dict]
    summary: list[dict]
    report_md: Path | None = None
    report_html: Path | None = None
    wall_seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)

    def table(self) -> tuple[list[str], list[list[str]]]:
        localised = any("pointing_game" in s for s in self.summary)
        headers = ["attention", "top-1 % (mean ± std)", "Δ vs none [95% CI]", "verdict"]
        if localised:
            headers += ["pointing game %", "energy in box %"]
        headers += ["params", "MFLOPs", "+elementwise", "latency ms"]
        rows = []
        for s in self.summary:
            loc = [rep.fmt_pct(s["pointing_game"], s["pointing_game_std"]),
                   rep.fmt_pct(s["energy_in_box"], s["energy_in_box_std"])
                   ] if "pointing_game" in s else ["", ""]
            rows.append([
                s["attention"], rep.fmt_pct(s["test_acc"], s["test_acc_std"]),
                "baseline" if s["attention"] == BASELINE or s.get("diff_vs_none") is None
                else rep.fmt_diff(s["diff_vs_none"], s["diff_low"], s["diff_high"]),
                s.get("verdict", ""), *(loc if localised else []),
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
    profile: bool = True,
    localise: bool = True,
    cam_method: str = "gradcam",
    panel_images: int = 6,
    report: bool = True,
    command: str | None = None,
    extra_sections: Callable[[BenchResult, BenchData], Sequence[rep.Section]] | None = None,
) -> BenchResult:
    """Train ``model`` with each attention for each seed on ``data`` and write the report.

    Everything is validated before the first training step (names, keyword arguments, data,
    output folder, numbers). Re-running with the same ``out`` resumes unfinished runs from their
    last epoch checkpoint and skips finished ones; a run's settings must match those it was
    started with. See ``attnzoo bench --help`` and the README for the options.

    Args:
        attention: comma-separated specs or a list (``"none,se,cbam:reduction=8"``); ``none`` is
            the baseline that the differences are computed against.
        model: a builder name (default :func:`~attnzoo.bench.small_models.cifar_resnet8`) or a
            callable ``builder(attention=..., num_classes=..., **kwargs)``.
        data: ``digits`` (built-in), a folder of class sub-folders, or ``cifar10:/path`` /
            ``cifar100:/path``.
        seeds: seeds (an int ``n`` means ``0..n-1``).
        n_train, n_test: sizes of the built-in data (or cut-offs for other data).
        localise: Grad-CAM panels of ``panel_images`` test images in the report and, on data
            with boxes (the built-in digits), the pointing game and energy-in-box scores of every
            run (:mod:`attnzoo.bench.localisation`); needs ``grad-cam`` (``attnzoo[viz]``).
        cam_method: the CAM method for both (``attnzoo.viz.CAM_METHODS``).
        extra_sections: ``f(result, data) -> [Section]`` appended to the report.
    """
    t0 = time.perf_counter()
    call = _python_command(dict(locals()))
    # ---- validate everything first ----------------------------------------------------------
    epochs = _check_positive_int("--epochs", epochs)
    batch_size = _check_positive_int("--batch-size", batch_size)
    num_nodes = _check_positive_int("--num-nodes", num_nodes)
    image_size = _check_positive_int("--image-size", image_size, 8)
    _check_positive_int("--num-workers", num_workers, 0)
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
                                                 "mean": list(bench_data.mean),
                                                 "std": list(bench_data.std)})
        if progress:
            print(f"[attnzoo bench] {spec.label} seed {seed}", file=sys.stderr, flush=True)
        outcome = train_one(
            _model_factory(builder, spec, bench_data.num_classes), bench_data.train,
            bench_data.test, bench_data.num_classes, cfg, seed=seed, run_dir=run_dir,
            accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
            precision=precision, progress=progress, num_workers=num_workers)
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
               "resumed_from_epoch": outcome.resumed_from_epoch, "fingerprint": fingerprint}
        results[(spec.label, seed)] = row
        if is_zero:
            rep.write_json(done, row)
            _write_results(out, specs, seeds, results, {}, run_config, command or call,
                           partial=True)
    result = BenchResult(out=out, runs=[], summary=[], skipped=skipped)
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
        for spec in specs:
            prof[spec.label] = profile_attention_model(models[spec.label],
                                                       bench_data.input_shape)
    runs, summary = _write_results(out, specs, seeds, results, prof, run_config, command or call,
                                   partial=False, loc=loc)
    result.runs, result.summary = runs, summary
    result.wall_seconds = time.perf_counter() - t0
    if report:
        sections = rep.build_sections(result, bench_data, run_config, environment(),
                                  command or call)
        if localise and panel_images:
            from attnzoo.bench.localisation import report_section

            sections.insert(1, report_section(result, bench_data, plan, seeds, cam_method,
                                              panel_images))
        extra = list(extra_sections(result, bench_data)) if extra_sections else []
        result.report_md, result.report_html = rep.write_report(
            out, "attnzoo bench report", sections, extra)
    return result


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
                   loc: dict[tuple[str, int], dict] | None = None
                   ) -> tuple[list[dict], list[dict]]:
    loc = loc or {}
    runs = [{**results[(s.label, seed)], **_loc_fields(loc.get((s.label, seed)))}
            for s in specs for seed in seeds if (s.label, seed) in results]
    base = {seed: results[(BASELINE, seed)]["test_acc"] for seed in seeds
            if (BASELINE, seed) in results}
    summary = []
    for s in specs:
        per_seed = {seed: results[(s.label, seed)]["test_acc"] for seed in seeds
                    if (s.label, seed) in results}
        if not per_seed:
            continue
        st = summarize(list(per_seed.values()))
        row: dict[str, Any] = {"attention": s.label, "n_seeds": st.n, "test_acc": st.mean,
                               "test_acc_std": st.std, **prof.get(s.label, {})}
        if s.name != BASELINE and base and set(per_seed) & set(base):
            d = paired_difference(per_seed, base)
            row.update(diff_vs_none=d.mean, diff_std=d.std, diff_low=d.low, diff_high=d.high,
                       diff_seeds=list(d.seeds), verdict=d.verdict, detectable=d.detectable)
        elif s.name == BASELINE:
            row["verdict"] = "baseline"
        summary.append(row)
    if loc:
        from attnzoo.bench.localisation import summarize_localisation

        by_label = {r["attention"]: r for r in summarize_localisation(
            [s.label for s in specs], seeds, loc, baseline=BASELINE)}
        for row in summary:
            extra = by_label.get(row["attention"], {})
            row.update({k: v for k, v in extra.items() if k not in ("attention", "n_seeds")})
    payload = {"attnzoo_bench": 1, "complete": not partial, "command": command,
               "config": run_config, "seeds": list(seeds),
               "attentions": [s.label for s in specs], "environment": environment(),
               "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "summary": summary, "runs": runs}
    rep.write_json(out / "results.json", payload)
    rep.write_results_csv(out / "results.csv", [
        {**r, "train_seconds": round(r.get("train_seconds", 0.0), 2)} for r in runs],
        [{**s, "diff_vs_none": s.get("diff_vs_none", ""), "seed": ""} for s in summary])
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
