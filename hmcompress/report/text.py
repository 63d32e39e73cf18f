"""Printing text that is data (tensor names, paths): never markup, one logical line each."""
from __future__ import annotations

from rich.console import Console


def print_line(console: Console, text: str) -> None:
    """``text`` as it is, one logical line the terminal may wrap."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)
