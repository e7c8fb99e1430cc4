"""What every `sparsekit` command shares: an argparse parser whose errors are one line on stderr
(exit status 2, no usage dump), the argument types the commands check with, and the command list
printed when no command is given."""
from __future__ import annotations

import argparse
import sys

from sparsekit._util.bounded import RefusedFile, check_path_length

INT64_MAX = (1 << 63) - 1  # every int a flag takes must fit torch's and numpy's int64
INT64_DIGITS = len(str(INT64_MAX))


class IntBeyond64Bits(ValueError):
    """An int flag's value outside +-INT64_MAX; the message describes the value (the flag is added
    by the caller)."""


def check_int64(flag: str, value: int) -> int:
    """value, if it fits in a signed 64-bit int; IntBeyond64Bits otherwise (before any library sees
    it and fails with "Overflow when unpacking long long", or a loop runs 10**22 steps)."""
    if -INT64_MAX - 1 <= value <= INT64_MAX:
        return value
    digits = len(str(abs(value))) if abs(value) < 10 ** 60 else None
    raise IntBeyond64Bits(str(value) if digits is not None and digits <= 30 else "an integer of that many digits")


def quoted(value, width: int = 60) -> str:
    """repr(value) for a message, cut to about `width` characters (a bad value may be a megabyte)."""
    text = repr(value) if not isinstance(value, (list, dict, tuple)) or len(value) < 100 else type(value).__name__
    return text if len(text) <= width else f"{text[:width - 5]}...{text[-2:]}"


def int64(text: str) -> int:
    """An argument type: an int that fits in 64 bits."""
    digits = text.strip().lstrip("+-").replace("_", "").lstrip("0")
    if digits.isdigit() and len(digits) > INT64_DIGITS:
        raise argparse.ArgumentTypeError(f"an integer of {len(digits):,} digits does not fit in 64 bits "
                                         f"(an int must lie within +-{INT64_MAX:,})")
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {quoted(text)}") from None
    try:
        return check_int64("", value)
    except IntBeyond64Bits as error:
        raise argparse.ArgumentTypeError(f"{error} does not fit in 64 bits (an int must lie within "
                                         f"+-{INT64_MAX:,})") from None


def path_arg(text: str) -> str:
    """An argument type: a path a file system could hold (``check_path_length``)."""
    try:
        return check_path_length(text)
    except RefusedFile as error:
        raise argparse.ArgumentTypeError(error.reason) from None


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
    """An argument type: an int >= 1 that fits in 64 bits."""
    value = int64(text)
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
