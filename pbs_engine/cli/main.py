"""The `pbs-engine` command: one subcommand per module in this package.

The modules import torch and the engine inside their `run` functions only, so `--help` and typos answer at once.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from pbs_engine import __version__
from pbs_engine.cli import batch, bench, chat, convert, evaluate, generate, models, serve
from pbs_engine.cli.common import run_command

COMMANDS = [generate, chat, serve, batch, convert, models, bench, evaluate]


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser. An unknown option is reported with the subcommand's usage (argparse hands it up to
    the top-level parser otherwise), and `build`, when given, adds the options on first use: for subcommands
    whose options live in modules that import torch."""

    def __init__(self, *args, build: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._build = build

    def _built(self) -> None:
        if self._build is not None:
            build, self._build = self._build, None
            build(self)

    def parse_known_args(self, args=None, namespace=None):
        self._built()
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def format_help(self) -> str:
        self._built()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pbs-engine",
                                     description="Long-context LLM inference with Permuted Block-Sparse Attention.")
    parser.add_argument("--version", action="version", version=f"pbs-engine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
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
