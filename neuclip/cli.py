"""The `neuclip` command line: one subcommand per pipeline stage.

Each stage lives in `neuclip/commands/<name>.py` and exposes `register(subparsers)`, which adds its parser
and sets `func` (called with the parsed args; its return value is the exit status). Stages are imported
lazily so `neuclip data --help` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Order is the order `neuclip --help` lists them in: the pipeline's order.
COMMANDS = ["data", "methods", "config", "plan", "train", "status", "eval", "error", "study", "report", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuclip",
        description="NeuCLIP benchmark harness: data -> train -> eval -> error study -> report.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"neuclip.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = args.func(args)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
