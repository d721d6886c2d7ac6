"""What attention costs inside ResNet-50: train-step and inference time, ours vs timm's.

For each attention X in SE, CBAM, ECA and GC, the script times ResNet-50 + X against plain
ResNet-50, for our builders (``attnzoo.models.resnet50(attention=X)``, the official module
defaults, a module in every bottleneck before the residual add) and, side by side in the same
run, for timm's ResNet-50 with the same attention through its own hook
(``timm.create_model("resnet50", block_args=dict(attn_layer=...))`` with 'se', 'cbam', 'eca' and
'gca' = global context with add fusion and ratio 1/8; our GC uses the same ratio 1/8 and add
fusion here). Both plain networks are timed too, and every variant's added cost is relative to
its own library's plain ResNet-50.

Protocol: CPU, 2 threads, batch 8, 160x160 inputs. A train step is forward + backward + an SGD
update (no momentum, so no optimizer state); inference is an eval-mode forward under
``torch.no_grad()`` (the median of three per round). Variants are interleaved round by round:
every round times every variant once, in a rotated order, each immediately after its own
library's plain ResNet-50, so that machine-load drifts hit both sides of a pair alike. The added cost is the median over rounds of
the paired ratio variant / plain, minus 1; the time columns are medians over rounds.
Target (issue 4): our added train-step cost at most half of timm's for SE, CBAM, ECA and GC.

Usage::

    python benchmarks/network_overhead.py            # full run, 20 rounds (~4 min, 2 quiet cores)
    python benchmarks/network_overhead.py --quick    # 3 rounds: a smoke run (~1 min), noisy

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


def build_variants(attentions: tuple[str, ...]) -> dict[str, Callable[[], nn.Module]]:
    import timm

    from attnzoo.models import resnet50

    variants: dict[str, Callable[[], nn.Module]] = {
        "ours/none": lambda: resnet50(),
        "timm/none": lambda: timm.create_model("resnet50", pretrained=False),
    }
    for name in attentions:
        variants[f"ours/{name}"] = lambda name=name: resnet50(attention=name,
                                                              **OUR_KWARGS.get(name, {}))
        variants[f"timm/{name}"] = lambda name=name: timm.create_model(
            "resnet50", pretrained=False, block_args=dict(attn_layer=TIMM_NAMES[name]))
    return variants


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


def _time_variant(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    model.train()
    train = time_once(lambda: train_step(model, x, target))
    model.eval()
    with torch.no_grad():
        infer = statistics.median(time_once(lambda: model(x)) for _ in range(INFER_REPEATS))
    return {"train": train, "infer": infer}


def measure(rounds: int, batch: int, size: int, attentions: tuple[str, ...],
            log: Callable[[str], None]) -> dict:
    """Time every variant once per round, each right after its library's plain ResNet-50.

    Returns ``{"times": {variant: {"train": [...], "infer": [...]}}, "ratios": {variant:
    {"train": [...], "infer": [...]}}}`` where a ratio is variant / plain of the same pair.
    """
    torch.manual_seed(0)
    makers = build_variants(attentions)
    models = {name: make() for name, make in makers.items()}
    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, 1000, (batch,))
    times: dict[str, dict[str, list[float]]] = {n: {"train": [], "infer": []} for n in models}
    ratios: dict[str, dict[str, list[float]]] = {
        n: {"train": [], "infer": []} for n in models if not n.endswith("/none")}
    for model in models.values():  # warm-up: one train step and one inference per model
        _time_variant(model, x, target)
    pairs = [(lib, a) for a in attentions for lib in ("ours", "timm")]
    for r in range(rounds):
        order = pairs[r % len(pairs):] + pairs[:r % len(pairs)]
        for lib, a in order:
            base = _time_variant(models[f"{lib}/none"], x, target)
            this = _time_variant(models[f"{lib}/{a}"], x, target)
            for k in ("train", "infer"):
                times[f"{lib}/none"][k].append(base[k])
                times[f"{lib}/{a}"][k].append(this[k])
                ratios[f"{lib}/{a}"][k].append(this[k] / base[k])
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
    added = {n: {k: statistics.median(v) - 1.0 for k, v in r.items()}
             for n, r in pair_ratios.items()}
    added.update({n: {"train": 0.0, "infer": 0.0} for n in times if n.endswith("/none")})
    ratios = {}
    for a in attentions:
        ratios[a] = {}
        for k in ("train", "infer"):
            theirs = added[f"timm/{a}"][k]
            ours = added[f"ours/{a}"][k]
            ratios[a][k] = ours / theirs if theirs > 0 else float("nan")
    # how steady was the machine? spread of the plain networks' train-step times over rounds
    spread = {n: _iqr_ratio(t["train"]) for n, t in times.items() if n.endswith("/none")}
    return {"median_ms": med, "added": added, "ratio": ratios, "spread": spread}


def render(summary: dict, args: argparse.Namespace, wall: float) -> str:
    import timm
    import torchvision

    import attnzoo

    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Attention overhead inside ResNet-50: attnzoo vs timm",
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
        "- variants interleaved round by round, each timed right after its library's plain "
        "ResNet-50; added = median over rounds of the paired ratio variant / plain, minus 1; "
        "times are medians over rounds",
        "- steadiness: plain ResNet-50 train step, upper / lower quartile over rounds: "
        + ", ".join(f"{n} {v:.2f}x" for n, v in summary["spread"].items()),
        *([""] + ["**The machine was busy during this run (the plain ResNet-50's quartiles differ "
                  "by more than 10 %): the added costs below are not reliable. Re-run on a "
                  "quiet machine.**"] if max(summary["spread"].values()) > 1.1 else []),
        "",
        "## Median times",
        "",
        "| variant | train step ms | added | inference ms | added |",
        "|---|---:|---:|---:|---:|",
    ]
    med, added = summary["median_ms"], summary["added"]
    for n in med:
        lines.append(f"| {n} | {med[n]['train']:.1f} | {added[n]['train']:+.1%} | "
                     f"{med[n]['infer']:.1f} | {added[n]['infer']:+.1%} |")
    lines += [
        "",
        "## Ours / timm (added cost ratio; target: train step <= 0.5)",
        "",
        "| attention | train: ours added | timm added | ratio | met | inference: ours added "
        "| timm added | ratio |",
        "|---|---:|---:|---:|:---:|---:|---:|---:|",
    ]
    for a, r in summary["ratio"].items():
        met = "yes" if r["train"] == r["train"] and r["train"] <= 0.5 else "no"
        lines.append(
            f"| {a} | {added['ours/' + a]['train']:+.1%} | {added['timm/' + a]['train']:+.1%} | "
            f"{r['train']:.2f} | {met} | {added['ours/' + a]['infer']:+.1%} | "
            f"{added['timm/' + a]['infer']:+.1%} | {r['infer']:.2f} |")
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
    parser.add_argument("--attention", default=",".join(ATTENTIONS),
                        help="subset of se,cbam,eca,gc (default: all)")
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
    times = measure(args.rounds, args.batch_size, args.size, attentions,
                    log=lambda m: print(m, file=sys.stderr, flush=True))
    text = render(summarise(times, attentions), args, time.perf_counter() - start)
    print(text)
    if not args.no_write:
        write_atomic(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
