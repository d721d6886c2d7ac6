"""Start-up time of the command line: ``attnzoo --help`` and ``attnzoo bench --help``.

Each command runs in a fresh interpreter, ``--rounds`` times, alternating with a bare
``python -c "import torch"`` as the yardstick (the parser must not import torch, Lightning or
matplotlib: attnzoo's own modules are imported lazily). Reports the median wall time of each and
its ratio to ``import torch``. Target: ``--help`` under 1 s.

Writes ``benchmarks/results/cli_startup.md``.

    python benchmarks/cli_startup.py --rounds 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "attnzoo --help": [sys.executable, "-m", "attnzoo", "--help"],
    "attnzoo bench --help": [sys.executable, "-m", "attnzoo", "bench", "--help"],
    "attnzoo profile --help": [sys.executable, "-m", "attnzoo", "profile", "--help"],
    'python -c "import torch" (yardstick)': [sys.executable, "-c", "import torch"],
}


def wall(cmd: list[str]) -> float:
    """Seconds from start to exit of one fresh process."""
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cli_startup.md"))
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for cmd in COMMANDS.values():  # warm the file cache once
        wall(cmd)
    for _ in range(args.rounds):
        for name, cmd in COMMANDS.items():
            times[name].append(wall(cmd))
    torch_s = statistics.median(times['python -c "import torch" (yardstick)'])
    lines = [
        "# Command-line start-up time",
        "",
        f"`python benchmarks/cli_startup.py --rounds {args.rounds}`; each command in a fresh "
        f"process, rounds alternating; median wall time. Python {platform.python_version()}, "
        f"{platform.machine()}.",
        "",
        "| command | median s | min s | ratio to `import torch` |",
        "|---|---:|---:|---:|",
    ]
    for name, values in times.items():
        med = statistics.median(values)
        lines.append(f"| `{name}` | {med:.2f} | {min(values):.2f} | {med / torch_s:.2f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
