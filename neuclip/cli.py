"""The `neuclip` command line: one subcommand per pipeline stage.

Each stage lives in `neuclip/commands/<name>.py` and exposes `register(subparsers)`, which adds its parser
and sets `func` (called with the parsed args; its return value is the exit status). Stages are imported
lazily so `neuclip data --help` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from neuclip.atomic import disk_full

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
    try:
        status = args.func(args)
    except Exception as err:  # noqa: BLE001 - a user's mistake gets one line; anything else its traceback
        line = user_error_line(err)
        if line is None or os.environ.get("NEUCLIP_DEBUG"):
            raise
        print(f"neuclip {args.command}: error: {line}", file=sys.stderr)
        return 1
    return int(status or 0)


def user_error_line(err: BaseException) -> str | None:
    """One line for a failure that is the input's or the machine's, not the code's (None: a bug, which keeps its
    traceback). Set NEUCLIP_DEBUG=1 for the traceback of any failure."""
    if disk_full(err):
        where = getattr(err, "filename", None) or "the output folder"
        return f"no space left on device writing {where}; free space there and rerun (finished work is kept)"
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)  # only modules that ran can have raised
        if cls is not None and isinstance(err, cls):
            return " ".join(str(err).split("\n")) or type(err).__name__
    return None


# Errors that describe bad input or a state the user must act on; their messages name the file, key or folder.
USER_ERRORS = [
    ("neuclip.train.config", "ConfigError"),
    ("neuclip.data.check", "DataError"),
    ("neuclip.data.shards", "ShardError"),
    ("neuclip.data.download", "DownloadError"),
    ("neuclip.train.checkpoint", "CheckpointsUnreadable"),
    ("neuclip.train.runtime", "RunLocked"),
    ("neuclip.train.step", "TrainingDiverged"),
    ("neuclip.eval.runner", "MissingDataError"),
    ("neuclip.eval.runner", "ForeignResultsError"),
    ("neuclip.eval.fetch", "FetchError"),
    ("neuclip.grid.preflight", "PreflightError"),
    ("neuclip.estimators.options", "OptionError"),
    ("neuclip.yamlio", "DuplicateKeyError"),
    ("neuclip.jobs.launch", "SubmissionFailed"),
]


if __name__ == "__main__":
    sys.exit(main())
