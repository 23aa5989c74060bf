"""`pbs-engine bench startup`: wall time of CLI commands that load no model, against the bare interpreter and
`import torch` (what every command used to pay), median over fresh subprocesses of one run."""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CLI = [sys.executable, "-m", "pbs_engine.cli.main"]
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "pbs-engine --help": [*CLI, "--help"],
    "pbs-engine generate --help": [*CLI, "generate", "--help"],
    "pbs-engine generat (a typo)": [*CLI, "generat"],
}


def register(kinds) -> None:
    p = kinds.add_parser("startup", help="CLI start-up time (--help, typos) vs python and import torch")
    p.add_argument("--runs", type=int, default=5, help="subprocess runs per command; the median counts")
    p.set_defaults(func=run)


def wall_time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    if args.runs < 1:
        raise ValueError(f"--runs {args.runs} must be >= 1")
    medians = {name: statistics.median(wall_time(cmd) for _ in range(args.runs)) for name, cmd in COMMANDS.items()}
    base = medians["python -c pass"]
    print(f"{'command':<30} {'median ms':>10} {'vs python':>10}   ({args.runs} runs each)")
    for name, seconds in medians.items():
        print(f"{name:<30} {seconds * 1e3:>10.0f} {seconds / base:>9.1f}x")
    return 0
