"""`make bench`: speed and compression figures, each a ratio against a baseline run in-process."""
from __future__ import annotations

from collections.abc import Iterable


def print_table(title: str, headers: list[str], rows: Iterable[list[str]]) -> None:
    """A title line, then a Markdown table, each row printed (and flushed) as soon as it is known."""
    print(f"{title}\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers), flush=True)
    for row in rows:
        print("| " + " | ".join(row) + " |", flush=True)
