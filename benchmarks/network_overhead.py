"""What attention costs inside ResNet-50: plain, fast switch, compiled, and timm, side by side.

For each attention X in SE, CBAM, ECA and GC, the script times ResNet-50 + X against plain
ResNet-50, for our builders (``attnzoo.models.resnet50(attention=X)``, the official module
defaults, a module in every bottleneck before the residual add) and, in the same run, for timm's
ResNet-50 with the same attention through its own hook
(``timm.create_model("resnet50", block_args=dict(attn_layer=...))`` with 'se', 'cbam', 'eca' and
'gca' = global context with add fusion and ratio 1/8; our GC uses the same ratio 1/8 and add
fusion here). Variants of each network:

- ``ours/X``: plain eager (the default); ``ours/X+fast``: built and run with the
  :mod:`attnzoo.fast` switch on (CBAM runs its op, GC (add fusion) its whole-block op; for SE
  and ECA each block's last BatchNorm and the gate run as one folded op,
  ``attnzoo.fast.BatchNormGate2d``);
- ``ours/X+compile`` and ``timm/X+compile``: the whole network under ``torch.compile`` (with
  ``--compile``; compiling ResNet-50 takes minutes on two cores);
- ``timm/X``: timm eager.

Every variant's added cost is relative to its own plain ResNet-50 (same library, same mode:
compiled variants against the compiled plain network).

Protocol: CPU, 2 threads, batch 8, 160x160 inputs. A train step is forward + backward + an SGD
update (no momentum, so no optimizer state); inference is an eval-mode forward under
``torch.no_grad()`` (the median of three per round). Variants are interleaved round by round:
every round times every variant once, in a rotated order, each immediately after its own
baseline, so that machine-load drifts hit both sides of a pair alike. The added cost is the median
over rounds of the paired ratio variant / baseline, minus 1; the time columns are medians over
rounds. Target: with the switch on, our added train-step cost at most half of timm's eager one for
SE, CBAM, ECA and GC.

Usage::

    python benchmarks/network_overhead.py              # 20 rounds, eager variants
    python benchmarks/network_overhead.py --compile    # + the compiled networks
    python benchmarks/network_overhead.py --quick      # 3 rounds: a smoke run, noisy

Writes ``benchmarks/results/network_overhead.md`` (atomically) unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results" / "network_overhead.md"
ATTENTIONS = ("se", "cbam", "eca", "gc")
#: timm's attn_layer for each of ours (timm 'gca' = GlobalContext(fuse_add=True,
#: fuse_scale=False), rd_ratio 1/8 by default)
TIMM_NAMES = {"se": "se", "cbam": "cbam", "eca": "eca", "gc": "gca"}
#: our module keywords for the comparison (GC: ratio 1/8 to match timm's 'gca'; add fusion is
#: our default)
OUR_KWARGS: dict[str, dict] = {"gc": {"ratio": 1 / 8}}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


#: attentions with a fast path (attnzoo.fast); for the others the switch changes nothing
FAST = ("se", "cbam", "eca", "gc")


def build_variants(
    attentions: tuple[str, ...], compile_: bool
) -> tuple[dict[str, Callable[[], nn.Module]], list[tuple[str, str]]]:
    """Model makers by variant name, and the (variant, baseline) pairs to time."""
    import timm

    from attnzoo import fast
    from attnzoo.models import resnet50

    def ours(name: str | None, accelerated: bool = False) -> nn.Module:
        with fast.enabled(accelerated):
            return (
                resnet50() if name is None else resnet50(attention=name, **OUR_KWARGS.get(name, {}))
            )

    def theirs(name: str | None) -> nn.Module:
        extra = {} if name is None else {"block_args": dict(attn_layer=TIMM_NAMES[name])}
        return timm.create_model("resnet50", pretrained=False, **extra)

    makers: dict[str, Callable[[], nn.Module]] = {
        "ours/none": lambda: ours(None),
        "timm/none": lambda: theirs(None),
    }
    pairs = []
    for name in attentions:
        makers[f"ours/{name}"] = lambda name=name: ours(name)
        makers[f"timm/{name}"] = lambda name=name: theirs(name)
        pairs += [(f"ours/{name}", "ours/none"), (f"timm/{name}", "timm/none")]
        if name in FAST:
            makers[f"ours/{name}+fast"] = lambda name=name: ours(name, accelerated=True)
            pairs.append((f"ours/{name}+fast", "ours/none"))
    if compile_:
        for key in list(makers):
            if not key.endswith("+fast"):
                makers[f"{key}+compile"] = lambda key=key: torch.compile(makers[key]())
        pairs += [(f"{v}+compile", f"{b}+compile") for v, b in pairs if not v.endswith("+fast")]
    return makers, pairs


def train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, lr: float = 1e-4) -> None:
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(p.grad, alpha=lr)
                p.grad = None


def time_once(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


#: forwards timed per round for the inference column (their median): one forward is a few times
#: shorter than a train step and its added cost a few ms, so a single one is mostly noise
INFER_REPEATS = 3


def _time_variant(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, switch: bool
) -> dict[str, float]:
    from attnzoo import fast

    with fast.enabled(switch):
        model.train()
        train = time_once(lambda: train_step(model, x, target))
        model.eval()
        with torch.no_grad():
            infer = statistics.median(time_once(lambda: model(x)) for _ in range(INFER_REPEATS))
    return {"train": train, "infer": infer}


def measure(
    rounds: int,
    batch: int,
    size: int,
    attentions: tuple[str, ...],
    compile_: bool,
    log: Callable[[str], None],
) -> dict:
    """Time every pair once per round: the variant right after its baseline.

    Returns ``{"times": {variant: {"train": [...], "infer": [...]}}, "ratios": {variant:
    {"train": [...], "infer": [...]}}}`` where a ratio is variant / baseline of the same round.
    """
    torch.manual_seed(0)
    makers, pairs = build_variants(attentions, compile_)
    models = {}
    for name, make in makers.items():
        models[name] = make()
        log(f"built {name}")
    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, 1000, (batch,))
    times: dict[str, dict[str, list[float]]] = {n: {"train": [], "infer": []} for n in models}
    ratios: dict[str, dict[str, list[float]]] = {v: {"train": [], "infer": []} for v, _ in pairs}
    for name, model in models.items():  # warm-up (and compilation): two of each
        for _ in range(2):
            _time_variant(model, x, target, name.endswith("+fast"))
        log(f"warmed up {name}")
    for r in range(rounds):
        order = pairs[r % len(pairs) :] + pairs[: r % len(pairs)]
        for variant, baseline in order:
            base = _time_variant(models[baseline], x, target, False)
            this = _time_variant(models[variant], x, target, variant.endswith("+fast"))
            for k in ("train", "infer"):
                times[baseline][k].append(base[k])
                times[variant][k].append(this[k])
                ratios[variant][k].append(this[k] / base[k])
        log(f"round {r + 1}/{rounds} done")
    return {"times": times, "ratios": ratios}


def _iqr_ratio(values: list[float]) -> float:
    """Upper / lower quartile: how much a steady quantity moved between rounds."""
    if len(values) < 2:
        return 1.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 / q1


def summarise(measured: dict, attentions: tuple[str, ...]) -> dict:
    times, pair_ratios = measured["times"], measured["ratios"]
    med = {n: {k: statistics.median(v) * 1e3 for k, v in t.items()} for n, t in times.items()}
    added = {
        n: {k: statistics.median(v) - 1.0 for k, v in r.items()} for n, r in pair_ratios.items()
    }
    ratios = {}
    for a in attentions:
        ours = added.get(f"ours/{a}+fast", added[f"ours/{a}"])
        theirs = added[f"timm/{a}"]
        ratios[a] = {
            k: ours[k] / theirs[k] if theirs[k] > 0 else float("nan") for k in ("train", "infer")
        }
    # how steady was the machine? spread of the plain networks' train-step times over rounds
    spread = {n: _iqr_ratio(t["train"]) for n, t in times.items() if "/none" in n}
    return {"median_ms": med, "added": added, "ratio": ratios, "spread": spread}


def _pct(added: dict, key: str, what: str) -> str:
    return f"{added[key][what]:+.1%}" if key in added else "—"


def render(summary: dict, args: argparse.Namespace, wall: float) -> str:
    import timm
    import torchvision

    import attnzoo

    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Attention overhead inside ResNet-50: plain, fast switch, compiled, timm",
        "",
        f"- date: {now}; wall time {wall / 60:.1f} min; rounds: {args.rounds}"
        f"{' (--quick)' if args.quick else ''}",
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}, timm "
        f"{timm.__version__}, attnzoo {attnzoo.__version__}, Python {platform.python_version()}",
        f"- CPU: {_cpu_name()} ({os.cpu_count()} logical cores), torch threads: "
        f"{torch.get_num_threads()}",
        f"- batch {args.batch_size}, {args.size}x{args.size}, float32, contiguous; train step ="
        " forward + backward + SGD update; inference = eval forward under no_grad (median of "
        f"{INFER_REPEATS} per round)",
        "- every attention in every bottleneck before the residual add; ours with the official "
        "defaults (GC: add fusion, ratio 1/8 as timm's 'gca'); timm via "
        "`block_args=dict(attn_layer=...)` ('se', 'cbam', 'eca', 'gca')",
        "- +fast: built and run with `attnzoo.fast` switched on (CBAM: its op; SE, ECA: each "
        "block's last BatchNorm and the gate folded into one op, "
        "`attnzoo.fast.BatchNormGate2d`; GC: its whole-block op `attnzoo::gc_add`); "
        "+compile: `torch.compile` of the whole network, against the compiled plain "
        "ResNet-50 of the same library",
        "- variants interleaved round by round, each timed right after its baseline; added = "
        "median over rounds of the paired ratio variant / baseline, minus 1; times are medians "
        "over rounds",
        "- steadiness: plain ResNet-50 train step, upper / lower quartile over rounds: "
        + ", ".join(f"{n} {v:.2f}x" for n, v in summary["spread"].items()),
        *(
            [""]
            + [
                "**The machine was busy during this run (the plain ResNet-50's quartiles differ "
                "by more than 10 %): the added costs below are noisy. Re-run on a quiet "
                "machine.**"
            ]
            if max(summary["spread"].values()) > 1.1
            else []
        ),
        "",
        "## Added train-step cost (inference in brackets)",
        "",
        "| attention | ours plain | ours +fast | ours +compile | timm | timm +compile |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    added = summary["added"]
    for a in summary["ratio"]:
        cells = []
        for key in (
            f"ours/{a}",
            f"ours/{a}+fast",
            f"ours/{a}+compile",
            f"timm/{a}",
            f"timm/{a}+compile",
        ):
            if key.endswith("+fast") and key not in added:
                cells.append("= plain")
            elif key.endswith("+compile") and key not in added:
                cells.append("not run")
            else:
                cells.append(f"{_pct(added, key, 'train')} ({_pct(added, key, 'infer')})")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Target: with the switch on, our added train-step cost <= 0.5 x timm eager's",
        "",
        "| attention | ours (switch on) | timm eager | ratio | met |",
        "|---|---:|---:|---:|:---:|",
    ]
    for a, r in summary["ratio"].items():
        key = f"ours/{a}+fast" if f"ours/{a}+fast" in added else f"ours/{a}"
        met = "yes" if r["train"] == r["train"] and r["train"] <= 0.5 else "no"
        lines.append(
            f"| {a} | {_pct(added, key, 'train')} | {_pct(added, f'timm/{a}', 'train')} "
            f"| {r['train']:.2f} | {met} |"
        )
    lines += [
        "",
        "## Median times (ms)",
        "",
        "| variant | train step | inference |",
        "|---|---:|---:|",
    ]
    med = summary["median_ms"]
    for n in med:
        lines.append(f"| {n} | {med[n]['train']:.1f} | {med[n]['infer']:.1f} |")
    command = " ".join(["python benchmarks/network_overhead.py", *sys.argv[1:]])
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds: a noisy smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 20, quick 3)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time the networks under torch.compile (slow to compile)",
    )
    parser.add_argument(
        "--attention", default=",".join(ATTENTIONS), help="subset of se,cbam,eca,gc (default: all)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 20)
    attentions = tuple(a for a in args.attention.split(",") if a)
    unknown = set(attentions) - set(ATTENTIONS)
    if unknown:
        parser.error(f"unknown attention(s) {sorted(unknown)}; choose from {ATTENTIONS}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    times = measure(
        args.rounds,
        args.batch_size,
        args.size,
        attentions,
        args.compile,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    text = render(summarise(times, attentions), args, time.perf_counter() - start)
    print(text)
    if not args.no_write:
        write_atomic(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
