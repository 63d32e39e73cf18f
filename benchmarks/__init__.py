"""`make bench`: speed and compression figures, each a ratio against a baseline run in-process."""
from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable


def print_table(title: str, headers: list[str], rows: Iterable[list[str]]) -> None:
    """A title line, then a Markdown table, each row printed (and flushed) as soon as it is known."""
    print(f"{title}\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers), flush=True)
    for row in rows:
        print("| " + " | ".join(row) + " |", flush=True)


def parse_options(doc: str, smaller: str,
                  add_options: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """Parse a benchmark's command line: ``--quick`` (``smaller`` says what it shrinks) and any
    options ``add_options`` adds."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--quick", action="store_true", help=smaller)
    if add_options:
        add_options(parser)
    return parser.parse_args()


def quick_requested(doc: str, smaller: str) -> bool:
    """Parse a benchmark's command line: only ``--quick``."""
    return parse_options(doc, smaller).quick
