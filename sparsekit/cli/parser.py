"""What every `sparsekit` command shares: an argparse parser whose errors are one line on stderr
(exit status 2, no usage dump), the argument types the commands check with, and the command list
printed when no command is given."""
from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser that reports a bad argument as `prog: error: message` and exits 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def fraction(text: str) -> float:
    """An argument type: a number in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    return value


def positive(text: str) -> int:
    """An argument type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text}")
    return value


def non_negative(text: str) -> float:
    """An argument type: a finite number >= 0."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def list_commands_if_asked(argv: list, usage: str, heading: str, commands: dict) -> None:
    """With no arguments or -h/--help: print usage and the commands, then exit (2 or 0)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {usage}\n\n{heading}:")
        for name, text in commands.items():
            print(f"  {name:10s} {text}")
        raise SystemExit(0 if argv else 2)
