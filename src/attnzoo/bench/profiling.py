"""Complexity of a backbone with different attention modules: params, FLOPs, latency, memory.

This is the papers' complexity table (params / GFLOPs / speed) reproduced on the user's machine:
``profile("resnet50", ["none", "se", "cbam", "eca", "gc"])`` returns one :class:`ProfileRow` per
attention, and :func:`format_rows` prints them as a table, CSV, JSON or Markdown.

Columns
-------
``params``
    Trainable and non-trainable parameters (``p.numel()`` summed).
``flops``
    ``torch.utils.flop_counter.FlopCounterMode`` on one forward: convolutions, matmul/bmm/
    linear and scaled-dot-product attention, **2 FLOPs per multiply-add** (the papers' "GFLOPs"
    are multiply-adds, i.e. ``flops / 2``; the column ``gmacs`` gives that).
``extra_flops``
    The ops that counter ignores, counted by :class:`ElementwiseCounter` with these rules:
    pointwise ops (add, mul, sigmoid, ReLU/ReLU6, h-swish, ...) 1 per output element; BatchNorm,
    LayerNorm, GroupNorm 2 per element (scale and shift; mean/var too when computed); reductions
    (mean, sum, amax, max, var) 1 per input element; softmax / log-softmax 3 per element (max-
    subtract-exp, sum, divide); max/avg pooling 1 per window element per output (adaptive pools
    1 per input element); upsampling 1 per output element. For gating attention this column
    is where the cost is: an SE block is ~2 C^2/r multiply-adds in the FCs but ~3 passes over
    the C x H x W map.
``latency_ms``
    Median CPU wall time of one forward in eval mode under ``torch.no_grad()``
    (``torch.utils.benchmark.Timer.blocked_autorange``), with ``threads`` intra-op threads.
``peak_mb``
    Peak of live tensor memory during that forward *above what was live before it* (the
    activations and workspaces; weights and input excluded), from the PyTorch profiler's
    memory timeline. ``None`` when the profiler cannot provide it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "ElementwiseCounter",
    "ProfileRow",
    "count_flops",
    "format_rows",
    "peak_memory_mb",
    "profile",
    "profile_model",
]

aten = torch.ops.aten


def _numel(t: Any) -> int:
    return t.numel() if isinstance(t, Tensor) else 0


def _first_tensor(args: Sequence[Any]) -> Tensor | None:
    return next((a for a in args if isinstance(a, Tensor)), None)


def _out_numel(out: Any) -> int:
    if isinstance(out, Tensor):
        return out.numel()
    if isinstance(out, (tuple, list)):
        return _numel(out[0]) if out else 0
    return 0


_POINTWISE = [
    "add",
    "sub",
    "mul",
    "div",
    "neg",
    "sigmoid",
    "relu",
    "relu_",
    "hardtanh",
    "hardtanh_",
    "leaky_relu",
    "leaky_relu_",
    "hardswish",
    "hardswish_",
    "hardsigmoid",
    "hardsigmoid_",
    "gelu",
    "silu",
    "silu_",
    "exp",
    "log",
    "sqrt",
    "rsqrt",
    "pow",
    "clamp",
    "clamp_min",
    "clamp_max",
    "where",
    "lerp",
    "addcmul",
    "addcdiv",
    "tanh",
    "threshold",
    "maximum",
    "minimum",
    "abs",
    "reciprocal",
    "add_",
    "mul_",
    "div_",
    "sub_",
    "sigmoid_",
    "mish",
    "elu",
    "softplus",
]
_REDUCTION = ["mean", "sum", "amax", "amin", "max", "min", "var", "var_mean", "std", "logsumexp"]
_NORM = [
    "native_batch_norm",
    "_native_batch_norm_legit",
    "_native_batch_norm_legit_no_training",
    "native_layer_norm",
    "native_group_norm",
    "batch_norm",
    "layer_norm",
    "group_norm",
]
_SOFTMAX = ["_softmax", "_log_softmax", "softmax", "log_softmax"]
_ADAPTIVE_POOL = [
    "_adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "_adaptive_avg_pool3d",
    "adaptive_max_pool3d",
    "adaptive_avg_pool1d",
]
_WINDOW_POOL = [
    "max_pool2d_with_indices",
    "max_pool2d",
    "avg_pool2d",
    "max_pool3d_with_indices",
    "avg_pool3d",
    "max_pool1d",
    "avg_pool1d",
]
_UPSAMPLE = ["upsample_nearest2d", "upsample_bilinear2d", "_upsample_nearest_exact2d"]


def _packets(names: Iterable[str]) -> set[Any]:
    return {getattr(aten, n) for n in names if hasattr(aten, n)}


def _window(args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    kernel = args[1] if len(args) > 1 else kwargs.get("kernel_size", 1)
    if isinstance(kernel, int):
        return kernel * kernel
    return math.prod(kernel) if len(kernel) > 1 else kernel[0] * kernel[0]


class ElementwiseCounter(TorchDispatchMode):
    """Counts the elementwise, normalisation, reduction, softmax and pooling work that
    ``FlopCounterMode`` leaves out (rules in the module docstring). ``total`` and ``by_op``."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.by_op: dict[str, int] = {}
        self._rules: dict[Any, Callable[[Sequence[Any], Mapping[str, Any], Any], int]] = {}
        for p in _packets(_POINTWISE) | _packets(_UPSAMPLE):
            self._rules[p] = lambda a, k, o: _out_numel(o)
        for p in _packets(_REDUCTION) | _packets(_ADAPTIVE_POOL):
            self._rules[p] = lambda a, k, o: _numel(_first_tensor(a))
        for p in _packets(_NORM):
            self._rules[p] = lambda a, k, o: 2 * _numel(_first_tensor(a))
        for p in _packets(_SOFTMAX):
            self._rules[p] = lambda a, k, o: 3 * _numel(_first_tensor(a))
        for p in _packets(_WINDOW_POOL):
            self._rules[p] = lambda a, k, o: _out_numel(o) * _window(a, k)

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        rule = self._rules.get(func.overloadpacket)
        if rule is not None:
            n = int(rule(args, kwargs, out))
            self.total += n
            name = func.overloadpacket.__name__
            self.by_op[name] = self.by_op.get(name, 0) + n
        return out


@torch.no_grad()
def count_flops(model: nn.Module, x: Tensor) -> tuple[int, int]:
    """``(flops, extra_flops)`` of one forward of ``model`` on ``x`` (see module docstring),
    counted on the plain-torch path (:mod:`attnzoo.fast` is switched off while counting: its
    custom ops report their matmuls and convolutions, but not the elementwise work inside)."""
    from torch.utils.flop_counter import FlopCounterMode

    from attnzoo import fast

    counter = FlopCounterMode(display=False)
    extra = ElementwiseCounter()
    with fast.enabled(False), counter, extra:
        model(x)
    return int(counter.get_total_flops()), int(extra.total)


@torch.no_grad()
def peak_memory_mb(model: nn.Module, x: Tensor) -> float | None:
    """Peak live tensor memory (MiB) of one forward above the memory live before it."""
    try:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile
        from torch.profiler._memory_profiler import Action

        with torch_profile(
            activities=[ProfilerActivity.CPU],
            profile_memory=True,
            record_shapes=True,
            with_stack=True,
        ) as prof:
            model(x)
        current = peak = 0
        for _, action, (key, _), size in prof._memory_profile().timeline:
            if key.device.type != x.device.type or action == Action.PREEXISTING:
                continue
            if action == Action.CREATE:
                current += size
            elif action == Action.DESTROY:
                current -= size
            peak = max(peak, current)
        return peak / 2**20
    except Exception:  # noqa: BLE001  (private profiler API: report "n/a" rather than fail)
        return None


def _latency_ms(model: nn.Module, x: Tensor, min_run_time: float) -> float:
    from torch.utils import benchmark

    timer = benchmark.Timer(
        stmt="model(x)", globals={"model": model, "x": x}, num_threads=torch.get_num_threads()
    )
    with torch.no_grad():
        model(x)  # warm-up
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


@dataclass(frozen=True)
class ProfileRow:
    """One line of the complexity table (units in the field names)."""

    model: str
    attention: str
    input_size: int
    batch_size: int
    params: int
    params_delta: int
    flops: int
    extra_flops: int
    latency_ms: float | None
    peak_mb: float | None

    @property
    def gmacs(self) -> float:
        """Multiply-adds in billions (the papers' "GFLOPs")."""
        return self.flops / 2e9


def profile_model(
    model: nn.Module,
    x: Tensor | None = None,
    *,
    name: str = "model",
    attention: str = "none",
    input_size: int = 224,
    batch_size: int = 1,
    latency: bool = True,
    memory: bool = True,
    min_run_time: float = 1.0,
    baseline_params: int | None = None,
) -> ProfileRow:
    """Profile one built model (put in eval mode) on ``x``, by default a random
    ``(batch_size, 3, input_size, input_size)`` input on the model's device and dtype."""
    model = model.eval()
    if x is None:
        param = next(iter(model.parameters()), None)
        x = torch.randn(
            batch_size,
            3,
            input_size,
            input_size,
            device=param.device if param is not None else None,
            dtype=param.dtype if param is not None else None,
        )
    params = sum(p.numel() for p in model.parameters())
    flops, extra = count_flops(model, x)
    return ProfileRow(
        model=name,
        attention=attention,
        input_size=int(x.shape[-1]),
        batch_size=int(x.shape[0]),
        params=params,
        params_delta=params - (params if baseline_params is None else baseline_params),
        flops=flops,
        extra_flops=extra,
        latency_ms=_latency_ms(model, x, min_run_time) if latency else None,
        peak_mb=peak_memory_mb(model, x) if memory else None,
    )


def profile(
    model: str | Callable[..., nn.Module],
    attentions: Iterable[str] = ("none",),
    *,
    input_size: int = 224,
    batch_size: int = 1,
    threads: int | None = 2,
    latency: bool = True,
    memory: bool = True,
    min_run_time: float = 1.0,
    **builder_kwargs: Any,
) -> list[ProfileRow]:
    """Profile a builder with each attention (``"none"`` = the plain network).

    ``model`` is a name of :data:`attnzoo.models.BUILDERS` (``"resnet50"``, ``"cifar_resnet8"``,
    optionally with ``:key=value`` builder arguments) or a callable ``builder(attention=...)``;
    ``attentions`` are registry names with optional arguments (``"cbam:reduction=8"``), the syntax
    of ``attnzoo bench`` (:mod:`attnzoo.specs`).

    Returns one :class:`ProfileRow` per attention, in order; ``params_delta`` is relative to
    the first row. ``profile(module, x)`` (an ``nn.Module`` and an input tensor) profiles that
    one model instead and returns a single row without the memory column. ``threads`` sets
    ``torch.set_num_threads`` for the measurements (restored
    afterwards); ``builder_kwargs`` go to the builder (``num_classes``, ``stages``...).
    """
    from attnzoo.models import resolve_builder
    from attnzoo.specs import BASELINE, parse_attentions, validate_attentions

    if isinstance(model, nn.Module):  # profile(module, x): one built model, no memory column
        if not isinstance(attentions, Tensor):
            raise TypeError("attnzoo.bench.profile: profile(module, x) needs an input tensor x")
        return profile_model(
            model, attentions, name=type(model).__name__, memory=False, min_run_time=min_run_time
        )  # type: ignore[return-value]
    name, builder = resolve_builder(model, prog="attnzoo.bench.profile")
    specs = parse_attentions([str(a) for a in attentions], prog="attnzoo.bench.profile")
    validate_attentions(specs, prog="attnzoo.bench.profile")
    for key, value in (("input_size", input_size), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(
                f"attnzoo.bench.profile: {key} must be a positive integer, got {value!r}"
            )
    plain_kwargs = {k: v for k, v in builder_kwargs.items() if k in ("num_classes", "model_kwargs")}
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    rows: list[ProfileRow] = []
    try:
        for spec in specs:
            if spec.name == BASELINE:
                net = builder(**plain_kwargs)
            else:
                net = builder(attention=spec.name, **{**builder_kwargs, **dict(spec.kwargs)})
            row = profile_model(
                net,
                name=name,
                attention=spec.label,
                input_size=input_size,
                batch_size=batch_size,
                latency=latency,
                memory=memory,
                min_run_time=min_run_time,
                baseline_params=rows[0].params if rows else None,
            )
            rows.append(row)
    finally:
        torch.set_num_threads(old_threads)
    return rows


# ---------------------------------------------------------------------------------------------
# formatting
_HEADERS = (
    "model",
    "attention",
    "params",
    "Δparams",
    "GFLOPs (FlopCounter)",
    "GMACs",
    "extra MFLOPs (elementwise)",
    "latency ms (median)",
    "peak MiB (activations)",
)


def _cells(row: ProfileRow) -> list[str]:
    def opt(v: float | None, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    return [
        row.model,
        row.attention,
        f"{row.params:,}",
        f"{row.params_delta:+,}",
        f"{row.flops / 1e9:.3f}",
        f"{row.gmacs:.3f}",
        f"{row.extra_flops / 1e6:.1f}",
        opt(row.latency_ms, ".2f"),
        opt(row.peak_mb, ".1f"),
    ]


def format_rows(rows: Sequence[ProfileRow], fmt: str = "table") -> str:
    """Render rows as ``"table"`` (aligned text), ``"md"``, ``"csv"`` or ``"json"`` (raw
    numbers)."""
    if fmt == "json":
        return json.dumps([{**asdict(r), "gmacs": r.gmacs} for r in rows], indent=2)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        names = [f.name for f in fields(ProfileRow)]
        writer.writerow([*names, "gmacs"])
        for r in rows:
            writer.writerow([*(getattr(r, n) for n in names), r.gmacs])
        return buffer.getvalue()
    cells = [_cells(r) for r in rows]
    if fmt == "md":
        lines = [
            "| " + " | ".join(_HEADERS) + " |",
            "|" + "|".join("---" if i < 2 else "---:" for i in range(len(_HEADERS))) + "|",
        ]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines) + "\n"
    if fmt == "table":
        table = [list(_HEADERS), *cells]
        widths = [max(len(r[i]) for r in table) for i in range(len(_HEADERS))]
        out = []
        for i, line in enumerate(table):
            out.append(
                "  ".join(
                    c.ljust(w) if j < 2 else c.rjust(w)
                    for j, (c, w) in enumerate(zip(line, widths))
                ).rstrip()
            )
            if i == 0:
                out.append("  ".join("-" * w for w in widths))
        return "\n".join(out) + "\n"
    raise ValueError(
        f"attnzoo.bench.format_rows: format must be table, md, csv or json, got {fmt!r}"
    )


def headers() -> tuple[str, ...]:
    """Column titles of the table/md formats (for rich tables in the CLI)."""
    return _HEADERS


def cells(row: ProfileRow) -> list[str]:
    """Formatted cells of one row, in :func:`headers` order."""
    return _cells(row)
