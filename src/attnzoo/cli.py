"""The ``attnzoo`` command line (also ``python -m attnzoo``): thin wrappers that parse, call the
library, and print.

Subcommands: ``list`` (the module table), ``info NAME`` (metadata and docstring summary),
``profile``, ``bench`` and ``cam``. Each subcommand is added by an ``_add_<name>`` function and
handled by a ``_cmd_<name>`` one. Building the parser imports no third-party package (torch,
Lightning and matplotlib are imported by the commands that need them), so ``--help`` is quick.
Exit codes: see :func:`main`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import attnzoo
from attnzoo.registry import FAMILIES


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = "") -> None:
    """Print a table with rich when it is installed and stdout is a terminal, else plain text."""
    if sys.stdout.isatty():
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
        else:
            table = Table(*headers, title=title or None)
            for row in rows:
                table.add_row(*(str(c) for c in row))
            Console().print(table)
            return
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(title)
    for i, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


# ---------------------------------------------------------------------------------------------
# attnzoo list
def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list the registered attention modules")
    p.add_argument("--family", choices=FAMILIES, help="only modules of this family")
    p.add_argument(
        "--channels", type=_positive_int, default=256, help="channel count for the params column"
    )


def _cmd_list(args: argparse.Namespace) -> int:
    rows = []
    for name in attnzoo.available(args.family):
        meta = attnzoo.info(name)
        try:
            params = f"{meta.count_params(args.channels):,}"
        except (ValueError, TypeError) as err:  # e.g. channels not divisible by a group count
            params = f"n/a ({err})"
        rows.append(
            (
                name,
                meta.family,
                meta.cls.__name__,
                f"{meta.paper} ({meta.venue})",
                meta.year,
                params,
            )
        )
    _print_table(
        ("name", "family", "class", "paper", "year", f"params@C={args.channels}"),
        rows,
        title=f"{len(rows)} attention modules",
    )
    return 0


# ---------------------------------------------------------------------------------------------
# attnzoo info NAME
_LAYOUTS = {1: "(B, C, L)", 2: "(B, C, H, W)", 3: "(B, C, T, H, W)"}


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a module's paper, defaults, presets and summary")
    p.add_argument("name", help="registry name, e.g. cbam")
    p.add_argument(
        "--channels", type=_positive_int, default=None, help="also print the params at C"
    )


def _cmd_info(args: argparse.Namespace) -> int:
    meta = attnzoo.info(args.name)
    channels = args.channels or meta.example_channels
    lines = [
        f"{meta.name}: {meta.cls.__module__}.{meta.cls.__name__}",
        f"  family:   {meta.family}",
        f"  paper:    {meta.paper} ({meta.venue} {meta.year})",
        f"  code:     {meta.code}",
        f"  input:    {_LAYOUTS[meta.spatial_dims]}",
        "  defaults: " + ", ".join(f"{k}={v!r}" for k, v in meta.defaults.items()),
        "  presets:",
    ]
    for preset, kwargs in meta.presets.items():
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "(the defaults)"
        lines.append(f"    {preset}: {shown}")
    lines.append(f"  params at C={channels}: {meta.count_params(channels):,}")
    lines.append("")
    lines.append(meta.summary)
    print("\n".join(lines))
    return 0


# ---------------------------------------------------------------------------------------------
# attnzoo bench
def _seeds(text: str) -> list[int]:
    """``3`` -> seeds 0, 1, 2; ``0,5,7`` -> those seeds."""
    try:
        if "," in text:
            return [int(t) for t in text.split(",") if t.strip()]
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count (3) or a list (0,1,2), got {text!r}"
        ) from None
    if n < 1:
        raise argparse.ArgumentTypeError(
            f"expected a count >= 1 (3 means seeds 0,1,2) or a list "
            f"(for the single seed 0 write 0,), got {text}"
        )
    return list(range(n))


def _task_option(text: str) -> tuple[str, object]:
    """``key=value`` -> ``(key, value)``; the value a Python literal (``2``, ``0.5``) or a
    string (``adamw``, ``0.5,0.25`` stays a string)."""
    import ast

    key, eq, value = text.partition("=")
    if not eq or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        parsed = value.strip()
    return key.strip(), parsed if isinstance(parsed, (int, float, bool)) else value.strip()


def _devices(text: str) -> int | str | list[int]:
    if text.isdigit():
        return int(text)
    if "," in text:
        return [int(t) for t in text.split(",") if t.strip()]
    return text


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from attnzoo.specs import DEFAULT_ATTENTIONS, DEFAULT_MODEL, TASKS

    p = sub.add_parser(
        "bench",
        help="train a network with each attention over seeds and report its metric",
        description="Train the same network with each attention module, several seeds each, "
        "and write a report (results.json/.csv, report.md, report.html) with the task's metric "
        "(top-1 for classify, mAP50 for detect, mIoU for segment) as mean ± std, the paired "
        "difference to the "
        "baseline with a 95% CI, params, FLOPs and CPU latency. Options left unset take the "
        "task's defaults. Re-running the same command with the same --out resumes and skips "
        "finished runs.",
    )
    p.add_argument(
        "--task",
        default="classify",
        choices=TASKS,
        help="what the networks learn (default: %(default)s)",
    )
    p.add_argument(
        "--attention",
        default=None,
        help="comma-separated registry names with optional kwargs, e.g. "
        "'none,se,cbam:reduction=8,eca' ('none' is the baseline; default: the "
        f"task's; classify: {','.join(DEFAULT_ATTENTIONS)})",
    )
    p.add_argument(
        "--baseline",
        default=None,
        metavar="NAME",
        help="the attention the differences are computed against, one of "
        "--attention (default: 'none' when listed; else no differences)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="network builder, optionally with builder "
        "arguments as name:key=value (see 'attnzoo profile --help'; default: the "
        f"task's; classify: {DEFAULT_MODEL} from attnzoo.models.BUILDERS)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="classify: 'digits' (built-in cluttered "
        "digits, the default), a folder of class sub-folders, or cifar10:/path / "
        "cifar100:/path with the extracted python archives; other tasks: see their "
        "documentation (never downloads)",
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="epochs per run (default: the task's; classify: 8)"
    )
    p.add_argument(
        "--seeds",
        type=_seeds,
        default=[0, 1, 2],
        help="a count (3 -> 0,1,2) or a list (0,4,7) (default: 3)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="per device (default: the task's; classify: 64)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: the task's; classify: 0.1)",
    )
    p.add_argument(
        "--weight-decay", type=float, default=None, help="(default: the task's; classify: 5e-4)"
    )
    p.add_argument("--out", default="bench-out", help="output folder (default: %(default)s)")
    p.add_argument(
        "--n-train",
        type=int,
        default=None,
        help="built-in data: training images (classify: 3000); others: a "
        "stratified subset of N (the same share of every class)",
    )
    p.add_argument(
        "--n-test",
        type=int,
        default=None,
        help="built-in data: test images (classify: 1000); others: a stratified subset of N",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input size (default: the task's; classify: 32, image folders are resized to it)",
    )
    p.add_argument("--accelerator", default="cpu", help="cpu, gpu, auto... (default: %(default)s)")
    p.add_argument(
        "--devices",
        type=_devices,
        default=1,
        help="number or list of devices, or auto (default: %(default)s)",
    )
    p.add_argument("--num-nodes", type=int, default=1, help="(default: %(default)s)")
    p.add_argument(
        "--strategy", default="auto", help="Lightning strategy, e.g. ddp (default: %(default)s)"
    )
    p.add_argument(
        "--precision",
        default=None,
        help="Lightning precision (default: 32-true on CPU, 16-mixed on GPU)",
    )
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default: 0)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also show what Lightning and the "
        "profiler print (device info, tips, traces); hidden by default",
    )
    p.add_argument("--no-profile", action="store_true", help="skip params/FLOPs/latency")
    p.add_argument(
        "--no-localise",
        action="store_true",
        help="classify: skip the Grad-CAM "
        "panels and the localisation scores (pointing game, energy in box)",
    )
    p.add_argument(
        "--cam-method",
        default="gradcam",
        help="classify: CAM method of the panels "
        "and scores: gradcam, gradcam++, scorecam, eigencam, layercam... "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--panel-images",
        type=int,
        default=6,
        help="test images shown in the report's panels (default: %(default)s)",
    )
    p.add_argument(
        "--option",
        type=_task_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a task option, repeatable (detect: eval_every=2; segment: query=0.5,0.25, "
        "optimizer=adamw); see the task's documentation",
    )


def _bench_command(args: argparse.Namespace) -> str:
    """The command line as given (options left unset are the task's defaults)."""
    import shlex

    parts = ["attnzoo", "bench"]
    if args.task != "classify":
        parts += ["--task", args.task]
    for flag, value in (
        ("--attention", args.attention),
        ("--baseline", args.baseline),
        ("--model", args.model),
        ("--data", args.data),
        ("--epochs", args.epochs),
    ):
        if value is not None:
            parts += [flag, str(value)]
    parts += ["--seeds", ",".join(str(s) for s in args.seeds)]
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--lr", args.lr),
        ("--weight-decay", args.weight_decay),
    ):
        if value is not None:
            parts += [flag, str(value)]
    parts += ["--out", args.out]
    for flag, value in (
        ("--n-train", args.n_train),
        ("--n-test", args.n_test),
        ("--image-size", args.image_size),
        ("--precision", args.precision),
        ("--threads", args.threads),
    ):
        if value is not None:
            parts += [flag, str(value)]
    if args.no_localise:
        parts.append("--no-localise")
    elif args.cam_method != "gradcam" or args.panel_images != 6:
        parts += ["--cam-method", args.cam_method, "--panel-images", str(args.panel_images)]
    devices = (
        args.devices if not isinstance(args.devices, list) else ",".join(map(str, args.devices))
    )
    parts += [
        "--accelerator",
        args.accelerator,
        "--devices",
        str(devices),
        "--num-nodes",
        str(args.num_nodes),
        "--strategy",
        args.strategy,
    ]
    if args.num_workers:
        parts += ["--num-workers", str(args.num_workers)]
    for key, value in args.option:
        parts += ["--option", f"{key}={value}"]
    return shlex.join(parts)


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from attnzoo.bench.run import run

    if args.threads is not None:
        torch.set_num_threads(_positive_int(str(args.threads)))
    result = run(
        args.attention,
        task=args.task,
        model=args.model,
        data=args.data,
        epochs=args.epochs,
        seeds=args.seeds,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        out=args.out,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        accelerator=args.accelerator,
        precision=args.precision,
        image_size=args.image_size,
        n_train=args.n_train,
        n_test=args.n_test,
        num_workers=args.num_workers,
        progress=not args.no_progress,
        verbose=args.verbose,
        profile=not args.no_profile,
        localise=not args.no_localise,
        cam_method=args.cam_method,
        panel_images=args.panel_images,
        baseline=args.baseline,
        command=_bench_command(args),
        options=dict(args.option),
    )
    if not result.summary:  # a DDP worker (rank > 0): rank 0 reports
        return 0
    headers, rows = result.table()
    # stdout holds the results table only; progress and these notes go to stderr
    name = result.metric_label.removesuffix("%").strip()
    _print_table(
        headers,
        rows,
        title=f"attnzoo bench: {name} on {result.config['data']} "
        f"({len(args.seeds)} seeds, {result.config['epochs']} epochs)",
    )
    reused = f", {len(result.skipped)} finished runs reused" if result.skipped else ""
    print(
        f"wall time {result.wall_seconds:.1f} s{reused}\nreport: {result.report_html}\n"
        f"        {result.report_md}",
        file=sys.stderr,
    )
    return 0


# ---------------------------------------------------------------------------------------------
# attnzoo profile
def _add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="params, FLOPs, CPU latency and memory of a backbone with each attention",
        description="The papers' complexity table on this machine: for a backbone builder and "
        "a list of attentions, params, FLOPs (torch.utils.flop_counter: conv/matmul, 2 per "
        "multiply-add) plus the elementwise/normalisation/pooling FLOPs that counter ignores, "
        "median CPU latency of one eval forward, and peak activation memory.",
    )
    p.add_argument(
        "--model",
        default="resnet50",
        help="builder name from attnzoo.models.BUILDERS (the same names as "
        "'attnzoo bench --model': cifar_resnet8, resnet18, resnet50, mobilenet_v2...), "
        "optionally with builder arguments, e.g. "
        "\"cifar_resnet8:model_kwargs={'widths': (16, 32, 64)}\" "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--attention",
        default="none,se,cbam,eca,gc",
        help="comma-separated registry names with optional kwargs, as for "
        "'attnzoo bench', e.g. 'none,se,cbam:reduction=8'; 'none' = plain "
        "(default: %(default)s)",
    )
    p.add_argument("--input-size", type=_positive_int, default=224, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="(default: %(default)s)")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=2,
        help="torch threads while measuring (default: %(default)s)",
    )
    p.add_argument(
        "--min-run-time",
        type=float,
        default=1.0,
        help="seconds of timing per model (default: %(default)s)",
    )
    p.add_argument("--no-latency", action="store_true", help="skip the latency column")
    p.add_argument("--no-memory", action="store_true", help="skip the memory column")
    p.add_argument(
        "--format",
        choices=("table", "csv", "json", "md"),
        default="table",
        help="output format (default: %(default)s)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show the profiler's own C++ trace lines (hidden by default)",
    )


def _cmd_profile(args: argparse.Namespace) -> int:
    from attnzoo.bench import profiling
    from attnzoo.bench.quiet import filtered_native_stderr

    with filtered_native_stderr(args.verbose):  # the profiler's C++ traces
        rows = profiling.profile(
            args.model,
            [args.attention],
            input_size=args.input_size,
            batch_size=args.batch_size,
            threads=args.threads,
            latency=not args.no_latency,
            memory=not args.no_memory,
            min_run_time=args.min_run_time,
        )
    if args.format == "table":
        _print_table(
            profiling.headers(),
            [profiling.cells(r) for r in rows],
            title=f"attnzoo profile: {args.model} at {args.batch_size}x3x"
            f"{args.input_size}x{args.input_size}, {args.threads} threads",
        )
    else:
        print(profiling.format_rows(rows, args.format), end="")
    return 0


# ---------------------------------------------------------------------------------------------
# attnzoo cam
def _add_cam(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cam",
        help="PNG panels: image | Grad-CAM | attention maps of trained bench runs",
        description="Load a trained bench run (or every attention of a bench folder, side by "
        "side) and write PNG panels, one row per image: the image, its Grad-CAM (or another "
        "CAM method) for the predicted class, and the spatial maps the attention modules "
        "computed, overlaid on the image. Needs attnzoo[viz].",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a run folder (OUT/runs/cbam/seed0) or a "
        "bench folder (OUT): then all attentions of one seed go side by side",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--images",
        default=None,
        help="a folder of image files (resized and normalised like the run's data)",
    )
    src.add_argument(
        "--data",
        default=None,
        help="a --data spec whose first test images are "
        "used (default: the run's own data, with the digits' boxes)",
    )
    p.add_argument("--n", type=_positive_int, default=8, help="images (rows) (default: 8)")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="bench folder: the seed to show (default: the lowest)",
    )
    p.add_argument(
        "--method",
        default="gradcam",
        help="gradcam, gradcam++, scorecam, "
        "eigencam, layercam, xgradcam, hirescam... (default: %(default)s)",
    )
    p.add_argument("--out", default="cam-out", help="output folder (default: %(default)s)")


def _cmd_cam(args: argparse.Namespace) -> int:
    from attnzoo.bench.localisation import make_cam_panels

    paths = make_cam_panels(
        args.checkpoint,
        args.out,
        images=args.images,
        data=args.data,
        n=args.n,
        seed=args.seed,
        method=args.method,
    )
    for path in paths:
        print(path)
    return 0


# ---------------------------------------------------------------------------------------------
_COMMANDS = {"list": (_add_list, _cmd_list), "info": (_add_info, _cmd_info)}
_COMMANDS["bench"] = (_add_bench, _cmd_bench)
_COMMANDS["profile"] = (_add_profile, _cmd_profile)
_COMMANDS["cam"] = (_add_cam, _cmd_cam)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnzoo", description="Plug-and-play visual attention for PyTorch CNNs."
    )
    parser.add_argument("--version", action="version", version=f"attnzoo {attnzoo.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in _COMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code: 0 done, 2 bad usage or input (argparse's
    own errors, ``ValueError``/``TypeError``, a missing optional dependency), 1 a failure while
    working (the traceback is printed), 130 interrupted."""
    args = build_parser().parse_args(argv)  # usage errors exit with 2 here
    try:
        return _COMMANDS[args.command][1](args)
    except (ValueError, TypeError, ImportError) as err:
        print(f"attnzoo {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"attnzoo {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (report any failure as exit code 1)
        import traceback

        traceback.print_exc()
        print(f"attnzoo {args.command}: failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
