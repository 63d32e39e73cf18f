"""Reading a pickle's persistent ids without unpickling it.

PyTorch's legacy (non-zip) loader allocates every storage a pickle claims before it reads the
data; a claim of a few bytes can ask for gigabytes. Walking the opcodes with `pickletools` and
a symbolic stack finds the claims first, so a checkpoint that claims more than it holds is
refused before torch allocates anything. Nothing is called or imported: the walk only pushes
literals, tuples and memo references; every other value is an opaque None.
"""
from __future__ import annotations

import io
import pickletools
from collections.abc import Iterator

_MARK = object()
_PUT = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET = frozenset({"GET", "BINGET", "LONG_BINGET"})
_SMALL_TUPLES = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}


class Global(str):
    """A ``module name`` pair as the GLOBAL opcode names it (never imported)."""


def persistent_ids(stream: io.BufferedIOBase) -> Iterator[object]:
    """The persistent ids of the next pickle in ``stream``, in order, as far as literals show them.

    Raises what `pickletools.genops` raises on a malformed pickle (ValueError and friends); the
    stream is left after the pickle's STOP.
    """
    stack: list[object] = []
    memo: dict[object, object] = {}
    for op, arg, _pos in pickletools.genops(stream):
        name = op.name
        if name == "STOP":
            return
        if name in ("BINPERSID", "PERSID"):
            yield stack.pop() if name == "BINPERSID" else arg
            stack.append(None)
        elif name == "MARK":
            stack.append(_MARK)
        elif name in _PUT or name == "MEMOIZE":
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1] if stack else None
        elif name in _GET:
            stack.append(memo.get(arg))
        elif name == "TUPLE":
            stack.append(tuple(_pop_to_mark(stack)))
        elif name in _SMALL_TUPLES:
            count = _SMALL_TUPLES[name]
            items = tuple(stack[len(stack) - count:]) if count else ()
            del stack[len(stack) - count:]
            stack.append(items)
        elif name == "GLOBAL":
            stack.append(Global(arg))
        elif name == "STACK_GLOBAL":
            module, qualname = stack.pop(), stack.pop() if stack else None
            stack.append(Global(f"{qualname} {module}") if isinstance(module, str) and isinstance(qualname, str)
                         else None)
        else:
            _generic(op, arg, stack)


def _pop_to_mark(stack: list[object]) -> list[object]:
    if _MARK not in stack:
        raise ValueError("pickle pops a mark it never set")
    index = len(stack) - 1 - stack[::-1].index(_MARK)
    items = stack[index + 1:]
    del stack[index:]
    return items


def _generic(op: pickletools.OpcodeInfo, arg: object, stack: list[object]) -> None:
    """Apply an opcode's documented stack effect; a literal's value is kept, anything else is None."""
    before, after = op.stack_before, op.stack_after
    if pickletools.markobject in before:
        _pop_to_mark(stack)
        below = before.index(pickletools.markobject)
    else:
        below = len(before)
    if below > len(stack):
        raise ValueError(f"pickle opcode {op.name} underflows the stack")
    del stack[len(stack) - below:]
    literal = not before and len(after) == 1
    if literal and op.name in ("NONE", "NEWTRUE", "NEWFALSE"):
        stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[op.name])
    elif literal and op.arg is not None:
        stack.append(arg)
    else:
        stack.extend(None for _ in after)
