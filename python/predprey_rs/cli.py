"""The ``predprey`` command (``[project.scripts]``): one sub-command per job.

Each sub-command is one entry of ``COMMANDS``: name -> (one-line help, a function that adds its
arguments to an ``argparse`` parser, a function that runs it and returns the exit code). To add
one, write those two functions (here or in a module of their own) and add the entry.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from . import _cli_checkpoint

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

COMMANDS: dict[str, Command] = {
    "compress": _cli_checkpoint.COMMANDS["compress"],
    "inspect": _cli_checkpoint.COMMANDS["inspect"],
    "demo": _cli_checkpoint.COMMANDS["demo"],
    "eval": _cli_checkpoint.COMMANDS["eval"],
    "bench": _cli_checkpoint.COMMANDS["bench"],
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(
        prog="predprey",
        description="Predator-Prey weight compression: ~3-bit ternary planes + FP16 predators.",
    )
    ap.add_argument("--version", action="version", version=f"predprey-rs {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_args(p)
        p.set_defaults(_run=run)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Runs ``predprey ARGV``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:  # `predprey inspect X | head`: not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
