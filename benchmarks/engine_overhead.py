"""Overhead of the bench's training engine (Lightning + torchmetrics) over a bare PyTorch loop.

Same model (the bench's default ``cifar_resnet8``, optionally with an attention), same data (the
built-in cluttered digits), same DataLoader and sampler, same optimiser and one-cycle schedule.
The two variants alternate round by round (one epoch each); each round's epoch time is measured
from the first to the last training step (Lightning: ``on_train_epoch_start`` →
``on_train_epoch_end`` callbacks), so it compares steady-state step throughput. The fixed cost of
setting up a ``Trainer`` and calling ``fit`` is reported separately.

Writes ``benchmarks/results/engine_overhead.md``. Target: the engine within 10 % of the bare loop.

    python benchmarks/engine_overhead.py --rounds 5 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from attnzoo.bench.data import load_data
from attnzoo.bench.quiet import quiet_lightning
from attnzoo.bench.tasks.classify import _module_class, make_loaders
from attnzoo.bench.train import TrainConfig, _progress_bar
from attnzoo.models import cifar_resnet8


def bare_epoch(model: nn.Module, loader, cfg: TrainConfig, epoch: int) -> tuple[float, float]:
    """One epoch of a plain loop with the bench's optimiser and schedule; returns (wall, CPU)
    seconds."""
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    other = [p for n, p in model.named_parameters() if not (p.ndim > 1 and not n.endswith(".bias"))]
    opt = torch.optim.SGD(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": other, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=True,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=cfg.lr,
        total_steps=len(loader),
        pct_start=0.25,
        div_factor=10.0,
        final_div_factor=100.0,
    )
    model.train()
    loader.sampler.set_epoch(epoch)
    start, cpu = time.perf_counter(), time.process_time()
    for x, y in loader:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return time.perf_counter() - start, time.process_time() - cpu


def engine_epoch(
    model: nn.Module, train_loader, cfg: TrainConfig, progress: bool
) -> tuple[float, float, float]:
    """One epoch through the bench's Lightning module/Trainer; (wall, CPU, whole fit) seconds."""
    import lightning.pytorch as pl

    marks: dict[str, float] = {}

    class Clock(pl.Callback):
        def on_train_epoch_start(self, trainer, module):
            marks["start"], marks["cpu0"] = time.perf_counter(), time.process_time()

        def on_train_epoch_end(self, trainer, module):
            marks["end"], marks["cpu1"] = time.perf_counter(), time.process_time()

    module = _module_class()(model, 10, cfg)
    with quiet_lightning(False):
        t0 = time.perf_counter()
        trainer = pl.Trainer(
            max_epochs=1,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=progress,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            use_distributed_sampler=False,
            deterministic=True,
            callbacks=[Clock(), *_progress_bar(progress)],
        )
        trainer.fit(module, train_loader)
        fit = time.perf_counter() - t0
    return marks["end"] - marks["start"], marks["cpu1"] - marks["cpu0"], fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attention", default="none")
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--progress", action="store_true", help="engine with its progress bar")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "engine_overhead.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data("digits", n_train=args.n_train, n_test=10)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size)
    loader, _ = make_loaders(data.train, data.test, cfg, seed=0)
    attn = None if args.attention == "none" else args.attention
    torch.manual_seed(0)
    model_bare, model_engine = cifar_resnet8(attn), cifar_resnet8(attn)
    bare_epoch(model_bare, loader, cfg, 0)  # warm-up both
    engine_epoch(model_engine, loader, cfg, args.progress)
    bare, engine, bare_cpu, engine_cpu, fits = [], [], [], [], []
    for r in range(args.rounds):
        w, c = bare_epoch(model_bare, loader, cfg, r + 1)
        bare.append(w)
        bare_cpu.append(c)
        w, c, f = engine_epoch(model_engine, loader, cfg, args.progress)
        engine.append(w)
        engine_cpu.append(c)
        fits.append(f)
        print(
            f"round {r + 1}: bare {len(data.train) / bare[-1]:.0f} img/s, engine "
            f"{len(data.train) / engine[-1]:.0f} img/s (wall); CPU-time ratio "
            f"{engine_cpu[-1] / bare_cpu[-1]:.3f}",
            flush=True,
        )
    n = len(data.train)
    b, e = statistics.median(bare), statistics.median(engine)
    ratios = sorted(eng / bar for bar, eng in zip(bare, engine))
    cpu_ratios = sorted(eng / bar for bar, eng in zip(bare_cpu, engine_cpu))
    setup = statistics.median(f - t for f, t in zip(fits, engine))
    try:
        load = " / ".join(f"{v:.2f}" for v in __import__("os").getloadavg())
    except OSError:
        load = "n/a"
    lines = [
        "# Engine overhead: the bench's Lightning training step vs a bare PyTorch loop",
        "",
        f"Model `cifar_resnet8` (attention `{args.attention}`), built-in cluttered digits, "
        f"{n} images per epoch, batch {args.batch_size}, {args.threads} thread(s), "
        f"{args.rounds} interleaved rounds (one epoch each, median). Progress bar "
        f"{'on' if args.progress else 'off'}.",
        "",
        "| loop | images/s (median) |",
        "|---|---|",
        f"| bare PyTorch | {n / b:.0f} |",
        f"| bench engine (Lightning + torchmetrics) | {n / e:.0f} |",
        "",
        f"Engine time / bare time per epoch: median **{statistics.median(ratios):.3f}** "
        f"(min {ratios[0]:.3f}, max {ratios[-1]:.3f}); overhead "
        f"**{100 * (statistics.median(ratios) - 1):+.1f} %** (target: within 10 %).",
        "",
        f"Process CPU time per epoch, engine / bare (robust to other processes on the machine; "
        f"meaningful with 1 thread): median **{statistics.median(cpu_ratios):.3f}** (min "
        f"{cpu_ratios[0]:.3f}, max {cpu_ratios[-1]:.3f}).",
        "",
        f"Fixed cost per run (Trainer construction + fit setup/teardown, outside the epoch): "
        f"{setup:.2f} s.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} "
        f"cores, load average {load} (1/5/15 min) at the end; torch {torch.__version__}.",
        "",
        "Command: `python benchmarks/engine_overhead.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items()
            if k not in ("out", "progress")
        )
        + (" --progress" if args.progress else "")
        + "`",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
