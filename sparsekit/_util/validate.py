"""Argument validators shared by every layer: each returns the value it accepts and raises a
ValueError that names the argument and what was expected (never an assert, never a crash later)."""
from __future__ import annotations


def is_int(value) -> bool:
    """value is an int and not a bool (True is an int to Python, never a count to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """value is an int or a float and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(name: str, value) -> int:
    """value must be an int >= 1 (bools refused)."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def positive_number(name: str, value) -> float:
    if not is_number(value) or not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_seed(value) -> int:
    """A seed: an int >= 0 (bools refused)."""
    if not is_int(value) or value < 0:
        raise ValueError(f"seed must be a non-negative int, got {value!r}")
    return value


def check_epochs(value) -> int | None:
    """How many passes a source makes: None (forever) or an int >= 1."""
    return None if value is None else positive_int("epochs", value)


def check_state(kind: str, state, expected: dict) -> None:
    """state must be a dict saved by a `kind` source whose settings equal `expected`."""
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict from {kind}.state_dict(), got {type(state).__name__}")
    if state.get("kind") != kind:
        raise ValueError(f"state was saved by {state.get('kind')!r}, not {kind}")
    for field, value in expected.items():
        if state.get(field) != value:
            raise ValueError(f"state field {field!r} is {state.get(field)!r} but this {kind} has {value!r}: "
                             f"it was saved from a source with different settings")


def state_int(state: dict, field: str) -> int:
    value = state.get(field)
    if not is_int(value) or value < 0:
        raise ValueError(f"state field {field!r} must be a non-negative int, got {value!r}")
    return value
