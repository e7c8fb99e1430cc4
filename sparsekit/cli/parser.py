"""What every `sparsekit` command shares: an argparse parser whose errors are one line on stderr
(exit status 2, no usage dump), the argument types the commands check with, and the command list
printed when no command is given."""
from __future__ import annotations

import argparse
import sys

from sparsekit._util.bounded import RefusedFile, check_path_length

INT64_MAX = (1 << 63) - 1  # every int a flag takes must fit torch's and numpy's int64
SHOWN_DIGITS = 40          # a bad int up to this many digits is quoted in the message; a longer one is counted


class IntBeyond64Bits(ValueError):
    """An int flag's value outside +-INT64_MAX; the message describes the value (the flag is added
    by the caller)."""


def too_many_digits(text: str) -> IntBeyond64Bits | None:
    """The error for an int written with more than SHOWN_DIGITS digits (checked before int(), which
    refuses over 4,300 digits with its own message), else None."""
    digits = text.strip().lstrip("+-").replace("_", "").lstrip("0")
    if digits.isdigit() and len(digits) > SHOWN_DIGITS:
        return IntBeyond64Bits(f"an integer of {len(digits):,} digits")
    return None


def check_int64(value: int) -> int:
    """value, if it fits in a signed 64-bit int; IntBeyond64Bits otherwise (before any library sees
    it and fails with "Overflow when unpacking long long", or a loop runs 10**22 steps)."""
    if -INT64_MAX - 1 <= value <= INT64_MAX:
        return value
    digits = len(str(abs(value)))
    raise IntBeyond64Bits(str(value) if digits <= SHOWN_DIGITS else f"an integer of {digits:,} digits")


def beyond_64_bits(where: str, error: IntBeyond64Bits) -> str:
    """The message for `where` (a flag or a config key) holding the value `error` describes."""
    return f"{where}: {error} does not fit in 64 bits (an int must lie within +-{INT64_MAX:,})"


def quoted(value, width: int = 60) -> str:
    """repr(value) for a message, cut to about `width` characters (a bad value may be a megabyte)."""
    text = repr(value) if not isinstance(value, (list, dict, tuple)) or len(value) < 100 else type(value).__name__
    return text if len(text) <= width else f"{text[:width - 5]}...{text[-2:]}"


def int64(text: str) -> int:
    """An argument type: an int that fits in 64 bits."""
    try:
        error = too_many_digits(text)
        if error is not None:
            raise error
        return check_int64(int(text))  # a ValueError: argparse's "invalid <type> value: 'x'"
    except IntBeyond64Bits as error:
        raise argparse.ArgumentTypeError(beyond_64_bits("", error)[2:]) from None


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
