"""Lists in messages written as prose: ``joined(["topk", "batchtopk", "relu"])`` -> "topk, batchtopk and relu"."""
from __future__ import annotations


def joined(items, last: str = "and") -> str:
    """The items as strings, comma-separated, the final pair joined by ``last`` ("and", "or")."""
    words = [str(item) for item in items]
    if len(words) <= 1:
        return "".join(words)
    return f"{', '.join(words[:-1])} {last} {words[-1]}"
