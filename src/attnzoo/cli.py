"""The ``attnzoo`` command line: thin wrappers that parse, call the library, and print.

Subcommands: ``list`` (the module table), ``info NAME`` (metadata and docstring summary).
Each subcommand is added by an ``_add_<name>`` function and handled by a ``_cmd_<name>`` one.
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
        rows.append((name, meta.family, meta.cls.__name__, f"{meta.paper} ({meta.venue})",
                     meta.year, params))
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
_COMMANDS = {"list": (_add_list, _cmd_list), "info": (_add_info, _cmd_info)}


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
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command][1](args)
    except (ValueError, TypeError) as err:
        print(f"attnzoo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
