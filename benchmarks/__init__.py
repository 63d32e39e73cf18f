"""`make bench`: speed and compression figures, each a ratio against a baseline run in-process."""
from __future__ import annotations

import argparse
from collections.abc import Iterable


def print_table(title: str, headers: list[str], rows: Iterable[list[str]]) -> None:
    """A title line, then a Markdown table, each row printed (and flushed) as soon as it is known."""
    print(f"{title}\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers), flush=True)
    for row in rows:
        print("| " + " | ".join(row) + " |", flush=True)


def quick_requested(doc: str, smaller: str) -> bool:
    """Parse a benchmark's command line: only ``--quick`` (``smaller`` says what it shrinks)."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--quick", action="store_true", help=smaller)
    return parser.parse_args().quick
