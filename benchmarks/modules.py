"""Gating attention modules: attnzoo vs timm, side by side, and against the bandwidth floor.

For every registered module of the families channel / spatial / hybrid / kernel (all of
``attnzoo.available()`` except pixel-pair attention) and every shape, in one process:

- forward: ``eval()``, ``torch.no_grad()``;
- forward+backward: ``train()``, a fresh leaf input with ``requires_grad``, ``y.backward(G)`` with a
  fixed random ``G``, parameter gradients reset (``zero_grad(set_to_none=True)``) every call;
- the memory-bandwidth floor of a channel gate: ``x.mean((2, 3), keepdim=True)`` plus one
  ``x * s`` broadcast multiply on the same tensor (no grad);
- peak memory of one forward+backward (see below).

Times are medians from ``torch.utils.benchmark.Timer.blocked_autorange``; ours and timm's
counterpart are interleaved (round robin, ``--rounds`` rounds) and the reported time is the median
of the per-round medians. CPU, float32, NCHW, ``torch.set_num_threads(2)`` by default.

timm counterparts ("configured alike": same maths; the parity tests in ``tests/modules`` check the
outputs agree with copied weights):

- se, eca, cbam, cbam_channel, cbam_spatial, sk, ca: ours with ``preset="timm"`` vs timm's
  ``SEModule(C)``, ``EcaModule(C)``, ``CbamModule(C)``, ``cbam.ChannelAttn(C)``,
  ``cbam.SpatialAttn(7)``, ``SelectiveKernel(C)``, ``coord_attn.CoordAttn(C)``;
- gc: ours official (add fusion, attention pooling, ratio 1/16, LayerNorm) vs
  ``GlobalContext(C, use_attn=True, fuse_add=True, fuse_scale=False, rd_ratio=1/16)``;
- ema and any other module: official defaults, no timm counterpart ("n/a").

A registered module missing from this list is benchmarked with its official defaults and no timm
counterpart; a module or counterpart that fails to build or run at a shape gets "—" in the table
and a line under "Notes", and the run continues.

Peak memory: the extra resident memory one forward+backward needs. Before the call, freed heap
memory is returned to the OS (``malloc_trim(0)``) and the kernel's resident-set high-water mark
is reset (``/proc/self/clear_refs`` = 5); after it, peak = ``VmHWM - VmRSS(before)`` from
``/proc/self/status``. It counts autograd's saved tensors, temporaries and allocator overhead
(granularity: pages). Median of 3 measurements. Linux only; elsewhere "n/a".

Usage::

    python benchmarks/modules.py            # all shapes -> benchmarks/results/modules.md
    python benchmarks/modules.py --quick    # (8,64,56,56) only, short timings
    python benchmarks/modules.py --modules se,cbam --shapes 8x64x56x56,8x256x28x28
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import os
import platform
import re
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
DEFAULT_SHAPES = [(8, 64, 56, 56), (8, 256, 28, 28), (8, 512, 14, 14)]
TARGET_SHAPE = (8, 64, 56, 56)
FAMILIES = ("channel", "spatial", "hybrid", "kernel")


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
        "gc": lambda c: tl.GlobalContext(c, use_attn=True, fuse_add=True, fuse_scale=False,
                                         rd_ratio=1 / 16),
        "sk": lambda c: tl.SelectiveKernel(c),
    }
    try:
        from timm.layers import coord_attn as tca

        table["ca"] = lambda c: tca.CoordAttn(c)
    except ImportError:
        pass
    return table.get(name)


_OUR_PRESET = {"se": "timm", "eca": "timm", "cbam": "timm", "cbam_channel": "timm",
               "cbam_spatial": "timm", "sk": "timm", "ca": "timm"}


def build_ours(name: str, channels: int) -> nn.Module:
    import attnzoo

    preset = _OUR_PRESET.get(name)
    if preset is not None and preset not in attnzoo.info(name).presets:
        preset = None
    return attnzoo.create(name, channels, preset=preset)


# --------------------------------------------------------------------------------------------
# measurements
def _fwd(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return module(x)

    return run


def _fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        module.zero_grad(set_to_none=True)
        leaf = x.detach().requires_grad_()
        module(leaf).backward(grad)

    return run


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, min_run_time: float
                ) -> dict[str, float]:
    """Median (over rounds) of blocked_autorange medians, in ms; the callables take turns."""
    for fn in fns.values():  # warm-up (allocator, oneDNN primitive caches)
        fn()
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            timer = tb.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            samples[key].append(timer.blocked_autorange(min_run_time=min_run_time).median * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


_LIBC = None


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        match = re.search(rf"^{key}:\s+(\d+) kB", fh.read(), re.MULTILINE)
    if match is None:
        raise OSError(f"{key} not in /proc/self/status")
    return int(match.group(1)) * 1024


def peak_memory_mb(fn: Callable[[], object], repeats: int = 3) -> float | None:
    """Extra resident memory (MB) of one call: median of ``repeats`` (see the module docstring)."""
    global _LIBC
    if not sys.platform.startswith("linux"):
        return None
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        values = []
        for _ in range(repeats):
            _LIBC.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            before = _status_bytes("VmRSS")
            fn()
            values.append((_status_bytes("VmHWM") - before) / 2**20)
        return statistics.median(values)
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
@dataclass
class Row:
    module: str
    shape: tuple[int, ...]
    ours_f: float | None = None
    timm_f: float | None = None
    ours_fb: float | None = None
    timm_fb: float | None = None
    floor: float | None = None
    mem_ours: float | None = None
    mem_timm: float | None = None
    has_timm: bool = False
    notes: list[str] = field(default_factory=list)


def bench_one(name: str, shape: tuple[int, ...], rounds: int, min_run_time: float,
              floor: float) -> Row:
    row = Row(name, shape, floor=floor)
    b, c, h, w = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    grad = torch.randn(shape, generator=gen)
    modules: dict[str, nn.Module] = {}
    try:
        torch.manual_seed(0)
        modules["ours"] = build_ours(name, c)
    except Exception as err:  # noqa: BLE001 - report and continue
        row.notes.append(f"ours: {type(err).__name__}: {err}")
        return row
    factory = _timm_factory(name)
    row.has_timm = factory is not None
    if factory is not None:
        try:
            torch.manual_seed(0)
            modules["timm"] = factory(c)
        except Exception as err:  # noqa: BLE001
            row.notes.append(f"timm: {type(err).__name__}: {err}")
    fwd: dict[str, Callable[[], object]] = {}
    for key, module in list(modules.items()):
        try:
            module.eval()
            out = _fwd(module, x)()
            if out.shape != x.shape:
                raise RuntimeError(f"output shape {tuple(out.shape)}")
            module.train()
            _fwd_bwd(module, x, grad)()
        except Exception as err:  # noqa: BLE001
            row.notes.append(f"{key}: {type(err).__name__}: {err}")
            modules.pop(key)
            continue
        fwd[key] = _fwd(module, x)
    for module in modules.values():
        module.eval()
    times_f = interleaved(fwd, rounds, min_run_time) if fwd else {}
    for module in modules.values():
        module.train()
    fb = {key: _fwd_bwd(module, x, grad) for key, module in modules.items()}
    times_fb = interleaved(fb, rounds, min_run_time) if fb else {}
    row.ours_f, row.timm_f = times_f.get("ours"), times_f.get("timm")
    row.ours_fb, row.timm_fb = times_fb.get("ours"), times_fb.get("timm")
    if "ours" in fb:
        row.mem_ours = peak_memory_mb(fb["ours"])
    if "timm" in fb:
        row.mem_timm = peak_memory_mb(fb["timm"])
    return row


def bandwidth_floor(shape: tuple[int, ...], rounds: int, min_run_time: float) -> float:
    x = torch.randn(shape)
    s = torch.rand(shape[0], shape[1], 1, 1)

    def run() -> torch.Tensor:
        x.mean((2, 3), keepdim=True)
        return x * s

    return interleaved({"floor": run}, rounds, min_run_time)["floor"]


# --------------------------------------------------------------------------------------------
# report
def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}"


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

    return (f"torch {torch.__version__}, timm {timm_version}, attnzoo {attnzoo.__version__}, "
            f"Python {platform.python_version()}")


def targets(rows: list[Row]) -> list[str]:
    """The issue's targets at (8, 64, 56, 56), each with the numbers that decide it."""
    at = {r.module: r for r in rows if r.shape == TARGET_SHAPE}
    lines = []

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("met" if ok else "NOT met")

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    slower = []
    compared = 0
    for r in at.values():
        for label, a, b in (("fwd", r.ours_f, r.timm_f), ("fwd+bwd", r.ours_fb, r.timm_fb)):
            q = ratio(a, b)
            if q is not None:
                compared += 1
                if q > 1.0:
                    slower.append(f"{r.module} {label} {q:.2f}x")
    ok = None if compared == 0 else not slower
    lines.append(f"- No module slower than its timm counterpart: **{verdict(ok)}**"
                 + (f" (slower: {', '.join(slower)})" if slower else ""))
    for name in ("se", "eca", "cbam"):
        r = at.get(name)
        q = ratio(r.ours_fb, r.timm_fb) if r else None
        lines.append(f"- {name.upper()} forward+backward <= 0.7x timm: "
                     f"**{verdict(None if q is None else q <= 0.7)}**"
                     + ("" if q is None else f" ({q:.2f}x)"))
    r = at.get("cbam")
    q = ratio(r.ours_f, r.timm_f) if r else None
    lines.append(f"- CBAM forward <= 0.5x timm: **{verdict(None if q is None else q <= 0.5)}**"
                 + ("" if q is None else f" ({q:.2f}x)"))
    for name in ("se", "eca"):
        r = at.get(name)
        q = ratio(r.ours_f, r.floor) if r else None
        lines.append(f"- {name.upper()} forward <= 1.5x bandwidth floor: "
                     f"**{verdict(None if q is None else q <= 1.5)}**"
                     + ("" if q is None else f" ({q:.2f}x)"))
    return lines


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _busy(load_start: float | None, load_end: float | None) -> bool:
    loads = [v for v in (load_start, load_end) if v is not None]
    return bool(loads) and max(loads) > (os.cpu_count() or 1)


def _load_lines(load_start: float | None, load_end: float | None) -> list[str]:
    if load_start is None or load_end is None:
        return []
    lines = [f"- System load average (1 min) at start / end: {load_start:.1f} / {load_end:.1f}"]
    if _busy(load_start, load_end):
        lines += ["", "**Warning: the machine was busy (load above the number of logical CPUs); "
                      "these timings are not reliable. Re-run on a quiet machine.**"]
    return lines


def render(rows: list[Row], args: argparse.Namespace) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_end = _load()
    verdicts = targets(rows)
    if _busy(args.load_start, load_end):
        verdicts = [line + " (unreliable: busy machine)" for line in verdicts]
    head = [
        "# Gating modules: attnzoo vs timm",
        "",
        f"Generated by `benchmarks/modules.py{' --quick' if args.quick else ''}` on {now}.",
        "",
        f"- {_versions()}",
        f"- CPU: {_cpu_model()} ({os.cpu_count()} logical CPUs), "
        f"`torch.set_num_threads({torch.get_num_threads()})`, float32, NCHW",
        f"- Timing: `torch.utils.benchmark` `blocked_autorange(min_run_time={args.min_run_time})`,"
        f" ours and timm interleaved over {args.rounds} rounds, median of the round medians (ms)",
        "- fwd: eval + no_grad; fwd+bwd: train mode, input requires grad, `backward(G)`",
        "- floor: `x.mean((2, 3))` + one `x * s` broadcast multiply on the same tensor",
        "- peak mem: extra resident memory of one forward+backward, MB, ours / timm "
        "(`VmHWM` after resetting it; see the script's docstring)",
        "- timm counterparts are configured alike (script docstring); \"n/a\": none in timm",
        *_load_lines(args.load_start, load_end),
        "",
        "## Targets at (8, 64, 56, 56)",
        "",
        *verdicts,
        "",
        "## Results",
        "",
        "| module | shape | ours fwd | timm fwd | ratio | ours fwd+bwd | timm fwd+bwd | ratio "
        "| floor | ours fwd / floor | peak mem MB ours / timm |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    body = []
    for r in rows:
        shape = "x".join(map(str, r.shape))
        timm_f = _ms(r.timm_f) if r.has_timm else "n/a"
        timm_fb = _ms(r.timm_fb) if r.has_timm else "n/a"
        mem = (f"{r.mem_ours:.1f}" if r.mem_ours is not None else "n/a") + " / " + (
            f"{r.mem_timm:.1f}" if r.mem_timm is not None else "n/a")
        body.append(
            f"| {r.module} | {shape} | {_ms(r.ours_f)} | {timm_f} | {_ratio(r.ours_f, r.timm_f)} "
            f"| {_ms(r.ours_fb)} | {timm_fb} | {_ratio(r.ours_fb, r.timm_fb)} | {_ms(r.floor)} "
            f"| {_ratio(r.ours_f, r.floor)} | {mem} |"
        )
    notes = [f"- {r.module} {'x'.join(map(str, r.shape))}: {n}" for r in rows for n in r.notes]
    tail = ["", "## Notes", "", *notes] if notes else []
    return "\n".join(head + body + tail) + "\n"


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
    parser.add_argument("--shapes", type=_parse_shapes, default=None,
                        help="comma-separated BxCxHxW (default: 8x64x56x56,8x256x28x28,"
                             "8x512x14x14; --quick: 8x64x56x56)")
    parser.add_argument("--modules", default=None,
                        help="comma-separated registry names (default: every gating module)")
    parser.add_argument("--quick", action="store_true", help="one shape, short timings")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (5; quick 2)")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="seconds per blocked_autorange (0.3; quick 0.05)")
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.min_run_time = args.min_run_time or (0.05 if args.quick else 0.3)
    shapes = args.shapes or ([TARGET_SHAPE] if args.quick else DEFAULT_SHAPES)

    torch.set_num_threads(args.threads)
    args.load_start = _load()
    import attnzoo

    names = [n for n in attnzoo.available() if attnzoo.info(n).family in FAMILIES]
    if args.modules:
        wanted = [m.strip() for m in args.modules.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in names]
        if unknown:
            parser.error(f"not gating modules in the registry: {', '.join(unknown)}; "
                         f"available: {', '.join(names)}")
        names = wanted
    rows = []
    for shape in shapes:
        floor = bandwidth_floor(shape, args.rounds, args.min_run_time)
        for name in names:
            row = bench_one(name, shape, args.rounds, args.min_run_time, floor)
            rows.append(row)
            print(f"{name:14s} {'x'.join(map(str, shape)):12s} fwd {_ms(row.ours_f)} / "
                  f"{_ms(row.timm_f)}  fwd+bwd {_ms(row.ours_fb)} / {_ms(row.timm_fb)}  "
                  f"floor {_ms(floor)}", flush=True)
    text = render(rows, args)
    write_atomic(args.output, text)
    print(f"wrote {args.output}")
    print("\n".join(targets(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
