"""Reading what a pickle claims without unpickling anything of it.

PyTorch's loaders trust a pickle's records before they check them: the legacy loader allocates
every storage a pickle claims before it reads the data, the zip loader maps a storage of the
claimed size over the archive, and its (pure Python) unpickler builds every object before we see
one. `scan` reads the pickle first, with Python's C unpickler (fast) in which every global is a
stand-in class of this module: nothing is imported or called but those stand-ins, which only
record their arguments. What it returns (the objects counted, the storages claimed, the tensor
views asked for, the globals named) lets a reader refuse a hostile file before torch touches it.
"""
from __future__ import annotations

import dataclasses
import io
import pickle

# Globals of torch._utils that rebuild tensors hmcompress can read (dense, strided, with data);
# any other `_rebuild_*` (sparse, meta, quantized, nested, wrapper subclasses, device-specific)
# is refused by name, before torch builds it.
TENSOR_REBUILDERS = frozenset({"torch._utils _rebuild_tensor", "torch._utils _rebuild_tensor_v2",
                               "torch._utils _rebuild_tensor_v3"})  # v3: dtypes without typed storages
ACCEPTED_REBUILDERS = TENSOR_REBUILDERS | {"torch._utils _rebuild_parameter",
                                          "torch._utils _rebuild_parameter_with_state",
                                          "torch._tensor _rebuild_from_type_v2"}
KIND_OF_REBUILDER = {"sparse": "a sparse tensor", "meta": "a meta-device tensor (it holds no data)",
                     "qtensor": "a quantized tensor", "nested": "a nested tensor",
                     "wrapper_subclass": "a tensor subclass", "device_tensor": "a device tensor",
                     "xla": "an XLA tensor", "mtia": "an MTIA tensor"}


class Global(str):
    """A ``module name`` pair as a pickle names a global (never imported)."""


class PickleProblem(ValueError):
    """A pickle that is refused: the message says why (no path: the caller adds it)."""


class _Stand:
    """Stand-in for any object a pickle builds from a global: records, runs nothing."""

    __slots__ = ("args", "state", "items")
    global_name: Global = Global("")

    def __new__(cls, *args: object, **kwargs: object) -> "_Stand":  # NEWOBJ calls __new__ alone
        self = object.__new__(cls)
        self.args = args + tuple(kwargs.values())
        self.state = None
        self.items = []
        return self

    def __init__(self, *_args: object, **_kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        self.state = state

    def __setitem__(self, key: object, value: object) -> None:
        self.items += (key, value)

    def append(self, value: object) -> None:
        self.items.append(value)

    def extend(self, values: object) -> None:
        self.items.extend(values)

    def add(self, value: object) -> None:
        self.items.append(value)


class _Persistent(_Stand):
    """What a persistent id (a storage record) stands for."""

    __slots__ = ()


@dataclasses.dataclass
class View:
    """A tensor record: its storage's persistent id, offset, size and stride (as the pickle says),
    and for `_rebuild_tensor_v3` (an untyped storage) the dtype's global name."""

    storage: object
    offset: object
    size: object
    stride: object
    dtype: Global | None = None


@dataclasses.dataclass
class Scan:
    """What a pickle holds, as far as its records show without running anything."""

    objects: int  # distinct objects it builds (containers, their items, stand-ins)
    storages: list[object]  # persistent ids, in order
    views: list[View]  # tensor records
    globals: set[Global]


class _Scanner(pickle.Unpickler):
    def __init__(self, stream: io.BufferedIOBase) -> None:
        super().__init__(stream)
        self.classes: dict[Global, type] = {}
        self.persistent: list[object] = []

    def find_class(self, module: str, name: str) -> type:
        key = Global(f"{module} {name}")
        if key not in self.classes:
            if module == "torch._utils" and name.startswith("_rebuild_") and key not in ACCEPTED_REBUILDERS:
                kind = next((what for part, what in KIND_OF_REBUILDER.items() if part in name), "a tensor")
                raise PickleProblem(f"it holds {kind} ({module}.{name}), which hmcompress does not read")
            self.classes[key] = type("Stand", (_Stand,), {"__slots__": (), "global_name": key})
        return self.classes[key]

    def persistent_load(self, pid: object) -> _Persistent:
        self.persistent.append(pid)
        return _Persistent(pid)


def scan(stream: io.BufferedIOBase, max_objects: int) -> Scan:
    """Read the next pickle of ``stream`` (left after its STOP) with stand-ins for every global.

    Raises `PickleProblem` if it names a tensor kind hmcompress does not read, builds more than
    ``max_objects`` objects, or is malformed.
    """
    scanner = _Scanner(stream)
    try:
        root = scanner.load()
    except PickleProblem:
        raise
    except RecursionError:
        raise PickleProblem("malformed pickle (nested too deeply to read)") from None
    except MemoryError:
        raise PickleProblem("malformed pickle (it claims more data than it holds)") from None
    except Exception as exc:  # the C unpickler's many errors on malformed opcodes
        raise PickleProblem(f"malformed pickle ({exc.__class__.__name__})") from None
    objects, views = _count(root, max_objects)
    return Scan(objects, scanner.persistent, views, set(scanner.classes))


def _count(root: object, limit: int) -> tuple[int, list[View]]:
    """Distinct objects reachable from ``root`` (each counted once), and the tensor records."""
    seen: set[int] = set()
    stack = [root]
    views: list[View] = []
    count = 0
    while stack:
        obj = stack.pop()
        count += 1
        if count > limit:
            raise PickleProblem(f"it holds more than {limit} objects")
        if not isinstance(obj, (dict, list, tuple, set, frozenset, _Stand)) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, dict):
            for key, value in obj.items():
                stack += (key, value)
        elif isinstance(obj, _Stand):
            if obj.global_name in TENSOR_REBUILDERS and len(obj.args) >= 4:
                storage = obj.args[0]
                dtype = None
                if obj.global_name.endswith("_v3"):
                    dtype = getattr(obj.args[6], "global_name", Global("?")) if len(obj.args) > 6 else Global("?")
                views.append(View(storage.args[0] if isinstance(storage, _Persistent) else storage,
                                  *obj.args[1:4], dtype))
            stack += obj.args
            stack += obj.items
            stack.append(obj.state)
        else:
            stack += obj
    return count, views
