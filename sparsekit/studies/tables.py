"""Result rows as the LM studies write them: a CSV file (atomically) and a Markdown table."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from sparsekit._util.atomic import atomic_write_bytes


def write_rows_csv(rows: list[dict], path: Path) -> None:
    """rows (dicts with the first row's keys) as a CSV file at path, written atomically; nothing when empty."""
    if not rows:
        return
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(Path(path), buffer.getvalue().encode())


def markdown_table(rows: list[dict], columns: list | tuple) -> list[str]:
    """The lines of a Markdown table of rows' columns (a missing value is an empty cell)."""
    return ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns),
            *("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows)]
