"""Gating attention modules side by side: plain eager, plain + torch.compile, the fast switch,
timm eager and timm + torch.compile.

For every registered module of the families channel / spatial / hybrid / kernel (all of
``attnzoo.available()`` except pixel-pair attention, or ``--modules``) and every shape, in one
process, five variants of the same maths:

- ``plain``: ours, eager (``preset="timm"`` where timm has the module, so the maths match);
- ``plain+compile``: the same module under ``torch.compile`` (inductor, default options);
- ``fast``: the same module after ``attnzoo.fast.accelerate`` with the switch on (CBAM, ECA and GC
  have a fast path; for the others the switch changes nothing and the column says "= plain");
  for the pairs ``bn+se`` and ``bn+eca`` (``nn.Sequential(BatchNorm2d, gate)``, the last
  BatchNorm of a residual block and its gate) ``attnzoo.fast.BatchNormGate2d`` of the pair;
- ``timm``: timm's counterpart, eager; ``timm+compile``: the same under ``torch.compile``.

Measurements: forward (``eval()``, ``torch.no_grad()``) and forward+backward (``train()``, a
fresh leaf input with ``requires_grad``, ``y.backward(G)`` with a fixed random ``G``, parameter
gradients reset every call). Times are medians from
``torch.utils.benchmark.Timer.blocked_autorange``; the variants are interleaved (round robin,
the first variant rotating each round, ``--rounds`` rounds) and the reported time is the median
of the per-round medians, so that load drifts hit all variants alike. Compilation happens during
the warm-up and is not timed. CPU, float32, NCHW, ``torch.set_num_threads(2)`` by default.

timm counterparts ("configured alike": same maths; the parity tests in ``tests/modules`` check
the outputs agree with copied weights):

- se, eca, cbam, cbam_channel, cbam_spatial, sk, ca: ours with ``preset="timm"`` vs timm's
  ``SEModule(C)``, ``EcaModule(C)``, ``CbamModule(C)``, ``cbam.ChannelAttn(C)``,
  ``cbam.SpatialAttn(7)``, ``SelectiveKernel(C)``, ``coord_attn.CoordAttn(C)``;
- gc: ours official (add fusion, attention pooling, ratio 1/16, LayerNorm) vs
  ``GlobalContext(C, use_attn=True, fuse_add=True, fuse_scale=False, rd_ratio=1/16)``;
- ge: ours official (GE-theta-minus, global extent) vs ``GatherExcite(C, extent=0,
  extra_params=False, use_mlp=False)``;
- ema and any other module: official defaults, no timm counterpart ("n/a"); the table then
  shows plain eager and compiled times next to SE's at the same shape.

A variant that fails to build, compile or run gets "—" and a line under "Notes".

Targets (at ``8x64x56x56``, forward+backward): a fast path is kept only where it beats
``plain+compile`` by at least 15 % (fast / plain+compile <= 0.85); ``plain+compile`` of every
gating module at most ``timm+compile``.

Usage::

    python benchmarks/modules.py                       # 8x64x56x56 -> benchmarks/results/modules.md
    python benchmarks/modules.py --quick               # short timings, a smoke run
    python benchmarks/modules.py --modules se,cbam --shapes 8x64x56x56,8x256x28x28
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils.benchmark as tb
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "modules.md"
TARGET_SHAPE = (8, 64, 56, 56)
FAMILIES = ("channel", "spatial", "hybrid", "kernel")
VARIANTS = ("plain", "plain+compile", "fast", "timm", "timm+compile")
#: a fast path stays only if fast / plain+compile <= this (forward+backward)
KEEP_RATIO = 0.85


# --------------------------------------------------------------------------------------------
# counterparts
def _timm_factory(name: str) -> Callable[[int], nn.Module] | None:
    """The timm module configured like ours (see the module docstring), or None."""
    try:
        import timm.layers as tl
        from timm.layers import cbam as tcbam
    except ImportError:
        return None
    table: dict[str, Callable[[int], nn.Module]] = {
        "se": lambda c: tl.SEModule(c),
        "eca": lambda c: tl.EcaModule(c),
        "cbam": lambda c: tcbam.CbamModule(c),
        "cbam_channel": lambda c: tcbam.ChannelAttn(c),
        "cbam_spatial": lambda c: tcbam.SpatialAttn(7),
        "gc": lambda c: tl.GlobalContext(
            c, use_attn=True, fuse_add=True, fuse_scale=False, rd_ratio=1 / 16
        ),
        "sk": lambda c: tl.SelectiveKernel(c),
        # GE-theta-minus with a global extent (ours by default): no parameters, no MLP
        "ge": lambda c: tl.GatherExcite(c, extent=0, extra_params=False, use_mlp=False),
    }
    try:
        from timm.layers import coord_attn as tca

        table["ca"] = lambda c: tca.CoordAttn(c)
    except ImportError:
        pass
    return table.get(name)


_OUR_PRESET = {
    "se": "timm",
    "eca": "timm",
    "cbam": "timm",
    "cbam_channel": "timm",
    "cbam_spatial": "timm",
    "sk": "timm",
    "ca": "timm",
}


#: BatchNorm2d + gate pairs, as in a residual block (the fast variant: attnzoo.fast's folded layer)
PAIRS = ("bn+se", "bn+eca")


def build_ours(name: str, channels: int) -> nn.Module:
    import attnzoo

    if name in PAIRS:
        return nn.Sequential(nn.BatchNorm2d(channels), build_ours(name[3:], channels))
    preset = _OUR_PRESET.get(name)
    if preset is not None and preset not in attnzoo.info(name).presets:
        preset = None
    return attnzoo.create(name, channels, preset=preset)


def build_variants(name: str, channels: int, notes: list[str]) -> dict[str, nn.Module]:
    """The five variants (those that build); ``fast`` only where accelerate changes the class."""
    from attnzoo import fast

    torch.manual_seed(0)
    ours = build_ours(name, channels)
    out: dict[str, nn.Module] = {"plain": ours, "plain+compile": torch.compile(ours)}
    accelerated = fast.accelerate(copy.deepcopy(ours))
    if name in PAIRS:
        out["fast"] = fast.BatchNormGate2d(*accelerated)
    elif type(accelerated) is not type(ours):
        out["fast"] = accelerated
    factory = _timm_factory(name[3:] if name in PAIRS else name)
    if factory is not None and name in PAIRS:
        gate_factory = factory
        factory = lambda c: nn.Sequential(nn.BatchNorm2d(c), gate_factory(c))  # noqa: E731
    if factory is not None:
        try:
            torch.manual_seed(0)
            theirs = factory(channels)
            out["timm"], out["timm+compile"] = theirs, torch.compile(theirs)
        except Exception as err:  # noqa: BLE001 - report and continue
            notes.append(f"timm: {type(err).__name__}: {err}")
    return out


# --------------------------------------------------------------------------------------------
# measurements
def _fwd(module: nn.Module, x: torch.Tensor, switch: bool) -> Callable[[], object]:
    from attnzoo import fast

    def run() -> object:
        with torch.no_grad(), fast.enabled(switch):
            return module(x)

    return run


def _fwd_bwd(
    module: nn.Module, x: torch.Tensor, grad: torch.Tensor, switch: bool
) -> Callable[[], None]:
    from attnzoo import fast

    def run() -> None:
        module.zero_grad(set_to_none=True)
        leaf = x.detach().requires_grad_()
        with fast.enabled(switch):
            module(leaf).backward(grad)

    return run


def interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, min_run_time: float
) -> dict[str, float]:
    """Median (over rounds) of blocked_autorange medians, in ms; the callables take turns, and
    the one that goes first rotates from round to round (no variant always runs after the same
    one)."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rounds):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            fn = fns[key]
            timer = tb.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            samples[key].append(timer.blocked_autorange(min_run_time=min_run_time).median * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


@dataclass
class Row:
    module: str
    shape: tuple[int, ...]
    fwd: dict[str, float] = field(default_factory=dict)
    fwd_bwd: dict[str, float] = field(default_factory=dict)
    has_fast: bool = False
    has_timm: bool = False
    notes: list[str] = field(default_factory=list)


def _warm(fns: dict[str, Callable[[], object]], row: Row, what: str) -> dict[str, Callable]:
    """Run every callable three times (compiles the compiled variants); drop those that fail."""
    ok = {}
    for key, fn in fns.items():
        try:
            for _ in range(3):
                fn()
            ok[key] = fn
        except Exception as err:  # noqa: BLE001 - report and continue
            row.notes.append(f"{key} {what}: {type(err).__name__}: {str(err)[:200]}")
    return ok


def bench_one(name: str, shape: tuple[int, ...], rounds: int, min_run_time: float) -> Row:
    row = Row(name, shape)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    grad = torch.randn(shape, generator=gen)
    try:
        modules = build_variants(name, shape[1], row.notes)
    except Exception as err:  # noqa: BLE001
        row.notes.append(f"ours: {type(err).__name__}: {err}")
        return row
    row.has_fast, row.has_timm = "fast" in modules, "timm" in modules
    for m in modules.values():
        m.eval()
    fwd = _warm({k: _fwd(m, x, k == "fast") for k, m in modules.items()}, row, "fwd")
    row.fwd = interleaved(fwd, rounds, min_run_time) if fwd else {}
    for m in modules.values():
        m.train()
    fb = _warm({k: _fwd_bwd(m, x, grad, k == "fast") for k, m in modules.items()}, row, "fwd+bwd")
    row.fwd_bwd = interleaved(fb, rounds, min_run_time) if fb else {}
    return row


# --------------------------------------------------------------------------------------------
# report
def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> str:
    try:
        import timm

        timm_version = timm.__version__
    except ImportError:
        timm_version = "not installed"
    import attnzoo

    return (
        f"torch {torch.__version__}, timm {timm_version}, attnzoo {attnzoo.__version__}, "
        f"Python {platform.python_version()}"
    )


def targets(rows: list[Row]) -> list[str]:
    """The targets at (8, 64, 56, 56), forward+backward, each with the numbers that decide it."""
    at = [r for r in rows if r.shape == TARGET_SHAPE]
    lines = []
    for r in at:
        if r.has_fast:
            q = _ratio(r.fwd_bwd.get("fast"), r.fwd_bwd.get("plain+compile"))
            verdict = (
                "not measured"
                if q is None
                else ("kept" if q <= KEEP_RATIO else "NOT clearly faster")
            )
            lines.append(
                f"- {r.module}: fast / plain+compile = "
                f"{'—' if q is None else f'{q:.2f}'} (keep if <= {KEEP_RATIO}): "
                f"**{verdict}**"
            )
    for r in at:
        if r.has_timm:
            q = _ratio(r.fwd_bwd.get("plain+compile"), r.fwd_bwd.get("timm+compile"))
            verdict = "not measured" if q is None else ("met" if q <= 1.0 else "NOT met")
            lines.append(
                f"- {r.module}: plain+compile / timm+compile = "
                f"{'—' if q is None else f'{q:.2f}'} (target <= 1): **{verdict}**"
            )
    return lines


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _load_lines(load_start: float | None, load_end: float | None) -> list[str]:
    if load_start is None or load_end is None:
        return []
    lines = [f"- System load average (1 min) at start / end: {load_start:.1f} / {load_end:.1f}"]
    if max(load_start, load_end) > (os.cpu_count() or 1):
        lines += [
            "",
            "**Warning: the machine was busy (load above the number of logical CPUs); "
            "absolute times are inflated. The variants are interleaved, so their "
            "ratios are the numbers to read.**",
        ]
    return lines


def _table(rows: list[Row], what: str) -> list[str]:
    head = [
        "| module | shape | " + " | ".join(VARIANTS) + " | fast / plain+compile "
        "| plain+compile / timm+compile | plain / timm |",
        "|---|---|" + "---:|" * (len(VARIANTS) + 3),
    ]
    body = []
    for r in rows:
        t = getattr(r, what)
        cells = []
        for v in VARIANTS:
            if v == "fast" and not r.has_fast:
                cells.append("= plain")
            elif v.startswith("timm") and not r.has_timm:
                cells.append("n/a")
            else:
                cells.append(_ms(t.get(v)))

        def q(a: str, b: str, t: dict[str, float] = t) -> str:
            value = _ratio(t.get(a), t.get(b))
            return "—" if value is None else f"{value:.2f}"

        body.append(
            f"| {r.module} | {'x'.join(map(str, r.shape))} | "
            + " | ".join(cells)
            + f" | {q('fast', 'plain+compile') if r.has_fast else 'n/a'} "
            f"| {q('plain+compile', 'timm+compile') if r.has_timm else 'n/a'} "
            f"| {q('plain', 'timm') if r.has_timm else 'n/a'} |"
        )
    return head + body


def render(rows: list[Row], args: argparse.Namespace) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python benchmarks/modules.py", *sys.argv[1:]])
    head = [
        "# Gating modules: plain, compiled, fast switch, timm (ms)",
        "",
        f"Generated by `{command}` on {now}.",
        "",
        f"- {_versions()}",
        f"- CPU: {_cpu_model()} ({os.cpu_count()} logical CPUs), "
        f"`torch.set_num_threads({torch.get_num_threads()})`, float32, NCHW",
        f"- Timing: `torch.utils.benchmark` `blocked_autorange(min_run_time={args.min_run_time})`,"
        f" the five variants interleaved over {args.rounds} rounds (the first one rotating), median"
        " of the round medians",
        "- fwd: eval + no_grad; fwd+bwd: train mode, input requires grad, `backward(G)`",
        "- plain = ours eager (timm preset where timm has the module); +compile = "
        '`torch.compile` (inductor); fast = `attnzoo.fast.accelerate` + switch on ("= plain": '
        "no fast path for this module); timm counterparts configured alike (script docstring)",
        *_load_lines(args.load_start, _load()),
        "",
        "## Targets at 8x64x56x56 (forward+backward)",
        "",
        *targets(rows),
        "",
        "## Forward + backward (train)",
        "",
        *_table(rows, "fwd_bwd"),
        "",
        "## Forward (eval, no_grad)",
        "",
        *_table(rows, "fwd"),
    ]
    notes = [f"- {r.module} {'x'.join(map(str, r.shape))}: {n}" for r in rows for n in r.notes]
    tail = ["", "## Notes", "", *notes] if notes else []
    return "\n".join(head + tail) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _parse_shapes(text: str) -> list[tuple[int, ...]]:
    shapes = []
    for item in text.split(","):
        dims = tuple(int(v) for v in item.lower().split("x"))
        if len(dims) != 4:
            raise argparse.ArgumentTypeError(f"shape {item!r} is not BxCxHxW")
        shapes.append(dims)
    return shapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes",
        type=_parse_shapes,
        default=[TARGET_SHAPE],
        help="comma-separated BxCxHxW (default: 8x64x56x56)",
    )
    parser.add_argument(
        "--modules",
        default=None,
        help="comma-separated registry names (default: every gating module)",
    )
    parser.add_argument("--quick", action="store_true", help="short timings, a smoke run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3; quick 1)")
    parser.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        help="seconds per blocked_autorange (0.2; quick 0.05)",
    )
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.min_run_time = args.min_run_time or (0.05 if args.quick else 0.2)

    torch.set_num_threads(args.threads)
    args.load_start = _load()
    import attnzoo

    names = [n for n in attnzoo.available() if attnzoo.info(n).family in FAMILIES] + list(PAIRS)
    if args.modules:
        wanted = [m.strip() for m in args.modules.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in names]
        if unknown:
            parser.error(
                f"not gating modules in the registry: {', '.join(unknown)}; "
                f"available: {', '.join(names)}"
            )
        names = wanted
    rows = []
    for shape in args.shapes:
        for name in names:
            row = bench_one(name, shape, args.rounds, args.min_run_time)
            rows.append(row)
            print(
                f"{name:14s} {'x'.join(map(str, shape)):12s} fwd+bwd "
                + "  ".join(f"{k} {_ms(v)}" for k, v in row.fwd_bwd.items()),
                flush=True,
            )
    text = render(rows, args)
    write_atomic(args.output, text)
    print(f"wrote {args.output}")
    print("\n".join(targets(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
