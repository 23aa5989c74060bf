"""The `pbs-engine` command: one subcommand per module in this package."""
from __future__ import annotations

import argparse
import sys

from pbs_engine import __version__
from pbs_engine.cli import batch, bench, chat, convert, evaluate, generate, serve
from pbs_engine.cli.common import run_command

COMMANDS = [generate, chat, serve, batch, convert, bench, evaluate]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pbs-engine",
                                     description="Long-context LLM inference with Permuted Block-Sparse Attention.")
    parser.add_argument("--version", action="version", version=f"pbs-engine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
