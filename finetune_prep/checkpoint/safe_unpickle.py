"""A restricted unpickler that reads the tensors of a training checkpoint without running it.

torch's `weights_only=True` refuses a file as soon as it names a global outside its allowlist
(timm's `args` Namespace, Lightning's `hyper_parameters`, numpy scalars...). This unpickler
takes the other way out: a global outside torch's allowlist is never imported or resolved,
it becomes an inert `Global` that only records its name; calling it (REDUCE, NEWOBJ, INST,
OBJ), building it (BUILD) or filling it (APPEND, SETITEM, ADDITEMS) gives a `Foreign` record
of the name and the arguments, and nothing is ever called. Tensors are rebuilt by the real
objects of torch's own allowlist (`torch._weights_only_unpickler._get_allowed_globals`), and
only with arguments free of such records; anything else touching a record becomes a record.

It plugs into `torch.load(pickle_module=...)` so that torch's own zip reader, `persistent_load`
and mmap do the storage work, and it can also walk a zip file's `data.pkl` on its own
(`scan_zip`), with storages replaced by `StorageRef`s, to learn every tensor's storage record,
offset, shape and stride without reading data.
"""

from __future__ import annotations

import functools
import io
import pickle
import struct
import types
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

# modules and names that exist to run code: a file naming one is refused even though the
# unpickler never resolves it (a plain checkpoint has no reason to name them)
DANGEROUS_MODULES = frozenset({
    "os", "posix", "nt", "sys", "subprocess", "shutil", "socket", "pty", "runpy", "importlib",
    "pickle", "_pickle", "marshal", "ctypes", "code", "codeop", "webbrowser", "signal",
    "multiprocessing", "asyncio", "threading", "_thread", "tempfile", "io", "_io", "operator",
    "commands", "popen2", "platform", "pdb", "timeit", "trace", "cProfile", "profile",
})
DANGEROUS_BUILTINS = frozenset({
    "eval", "exec", "compile", "open", "__import__", "getattr", "setattr", "delattr", "globals",
    "locals", "vars", "input", "breakpoint", "exit", "quit", "help",
})
REBUILDS = frozenset({
    "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3", "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state", "torch._tensor._rebuild_from_type_v2",
})


def dangerous(name: str) -> bool:
    """True for a global that can run code (os.system, builtins.eval, subprocess.Popen, ...)."""
    module, _, attr = name.partition(".")
    if module in ("builtins", "__builtin__"):
        return attr in DANGEROUS_BUILTINS
    return module in DANGEROUS_MODULES


class Global:
    """A global the file names, never resolved: only its dotted name is kept."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<global {self.name} (not loaded)>"


class Foreign:
    """What the file would have built from a `Global`: its name and arguments, never run."""

    __slots__ = ("name", "args", "kwargs", "state", "items")

    def __init__(self, name: str, args: tuple = (), kwargs: dict | None = None) -> None:
        self.name, self.args, self.kwargs = name, args, kwargs or {}
        self.state: list[Any] = []
        self.items: list[Any] = []

    def __repr__(self) -> str:
        return f"<{self.name} (not loaded)>"


@dataclass(frozen=True)
class StorageRef:
    """A storage that `scan_zip` did not read: its record key, dtype and element count."""

    key: str
    dtype: torch.dtype
    numel: int


@dataclass
class Record:
    """Every global an unpickling named, in order of first appearance."""

    names: dict[str, None] = field(default_factory=dict)

    @property
    def dangerous(self) -> list[str]:
        return [n for n in self.names if dangerous(n)]


def _allowed() -> dict[str, Any]:
    """torch's own weights-only allowlist: tensor rebuild functions, storages, dtypes, ..."""
    from torch._weights_only_unpickler import _get_allowed_globals

    return _get_allowed_globals()


@functools.lru_cache(maxsize=1)
def _allowed_ids() -> frozenset[int]:
    return frozenset(id(v) for v in _allowed().values())


def _inert(obj: Any, seen: set[int] | None = None, depth: int = 0) -> bool:
    """True when `obj` holds a Global, Foreign or StorageRef (so no real function may get it)."""
    if isinstance(obj, (Global, Foreign, StorageRef)):
        return True
    if depth > 50:
        return True  # too deep to vouch for: treat as tainted
    if isinstance(obj, (list, tuple, set, frozenset, dict)):
        seen = set() if seen is None else seen
        if id(obj) in seen:
            return False
        seen.add(id(obj))
        values = [*obj.keys(), *obj.values()] if isinstance(obj, dict) else obj
        return any(_inert(v, seen, depth + 1) for v in values)
    return False


LARGE_READ = 1 << 20  # reads above this size are checked against what the file holds
OVERSIZED = "oversized pickle item"


class Bounded:
    """A binary file whose large reads may not ask for more than it holds: a pickle opcode
    declaring a huge length (BINBYTES8, BINUNICODE8, LONG4, FRAME) would otherwise make the
    reader allocate that many bytes before finding the file is short."""

    def __init__(self, file: Any) -> None:
        self.file = file
        try:
            here = file.tell()
            self.end: int | None = file.seek(0, io.SEEK_END)
            file.seek(here)
        except (AttributeError, OSError, ValueError):
            self.end = None  # not seekable: no bound known

    def check(self, n: int) -> None:
        """Raise when `n` bytes are more than a large read can find in the file."""
        if n > LARGE_READ and self.end is not None and n > self.end - self.file.tell():
            raise pickle.UnpicklingError(
                f"{OVERSIZED}: it declares {n} bytes but only "
                f"{self.end - self.file.tell()} remain in the file")

    def read(self, n: int | None = -1) -> bytes:
        if n is not None and n > 0:
            self.check(n)
        return self.file.read(n)

    def readinto(self, buffer: Any) -> int:
        self.check(len(memoryview(buffer).cast("B")))
        return self.file.readinto(buffer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


class SafeUnpickler(pickle._Unpickler):  # the pure-Python unpickler: every opcode overridable
    """The stdlib unpickler with every opcode that resolves or calls something replaced."""

    dispatch = dict(pickle._Unpickler.dispatch)
    record: Record = Record()  # replaced per load by `pickle_module`

    def __init__(self, file: Any, **kwargs: Any) -> None:
        kwargs.pop("fix_imports", None)
        self.bounded = file if isinstance(file, Bounded) else Bounded(file)
        super().__init__(self.bounded, fix_imports=True, **kwargs)
        self.record = type(self).record

    def find_class(self, module: str, name: str) -> Any:
        full = _renamed(module, name, self.proto)
        self.record.names.setdefault(full, None)
        allowed = _allowed()
        if full in allowed and not dangerous(full):
            return allowed[full]
        return Global(full)

    def _call(self, func: Any, args: tuple, kwargs: dict | None = None) -> Any:
        """Call a real allowlisted function on plain arguments; anything else is recorded."""
        kwargs = kwargs or {}
        real = not isinstance(func, (Global, Foreign)) and _is_allowed(func)
        if real and not _inert(args) and not _inert(kwargs):
            if func is torch.nn.Parameter:
                return torch.nn.Parameter(*args, **kwargs)
            return func(*args, **kwargs)
        return Foreign(_name_of(func), tuple(args), kwargs)

    def load_bytearray8(self) -> None:
        """BYTEARRAY8 allocates its declared length before reading: check it first."""
        (n,) = struct.unpack("<Q", self.read(8))
        self.bounded.check(n)
        buffer = bytearray(n)
        self.readinto(buffer)
        self.append(buffer)
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], tuple(args) if isinstance(args, tuple)
                                    else (args,))
    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, {}))
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, kwargs))
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _new(self, cls: Any, args: Any, kwargs: Any) -> Any:
        """NEWOBJ as torch's weights-only unpickler does it, for allowlisted classes only."""
        plain = isinstance(args, tuple) and isinstance(kwargs, dict)
        if plain and isinstance(cls, type) and _is_allowed(cls) and not _inert((args, kwargs)):
            if cls is torch.nn.Parameter:
                return torch.nn.Parameter(*args, **kwargs)
            return cls.__new__(cls, *args, **kwargs)
        return Foreign(_name_of(cls), args if isinstance(args, tuple) else (args,),
                       kwargs if isinstance(kwargs, dict) else {})

    def load_inst(self) -> None:
        module = self.readline()[:-1].decode("ascii")
        name = self.readline()[:-1].decode("ascii")
        klass = self.find_class(module, name)
        value = self._call(klass, tuple(self.pop_mark()))  # pop_mark rebinds self.append
        self.append(value)
    dispatch[pickle.INST[0]] = load_inst

    def load_obj(self) -> None:
        args = self.pop_mark()
        cls = args.pop(0)
        value = self._call(cls, tuple(args))
        self.append(value)
    dispatch[pickle.OBJ[0]] = load_obj

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Foreign):
            inst.state.append(state)
        elif type(inst) is torch.Tensor and isinstance(state, tuple) and not _inert(state):
            inst.set_(*state)  # legacy tensors, as torch's unpickler does
        elif type(inst) is torch.nn.Parameter and not _inert(state):
            inst.__setstate__(state)
        elif type(inst) is OrderedDict and isinstance(state, dict) and not _inert(state) \
                and all(type(k) is str and not k.startswith("__") for k in state):
            inst.__dict__.update(state)  # e.g. a state dict's `_metadata`
        elif isinstance(inst, (torch.Tensor, OrderedDict)) and not isinstance(inst, Foreign):
            # tensor state (backward hooks, subclass attributes) made of records: drop it
            pass
        else:
            raise pickle.UnpicklingError(f"BUILD is not allowed on {type(inst).__name__}")
    dispatch[pickle.BUILD[0]] = load_build

    def load_append(self) -> None:
        value = self.stack.pop()
        self._extend(self.stack[-1], [value])
    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._extend(self.stack[-1], items)
    dispatch[pickle.APPENDS[0]] = load_appends

    def _extend(self, target: Any, items: list) -> None:
        if type(target) is list:
            target.extend(items)
        elif isinstance(target, Foreign):
            target.items.extend(items)
        else:
            raise pickle.UnpicklingError(f"APPEND is not allowed on {type(target).__name__}")

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._setitems(self.stack[-1], [key, value])
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self) -> None:
        items = self.pop_mark()
        self._setitems(self.stack[-1], items)
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def _setitems(self, target: Any, items: list) -> None:
        pairs = [(items[i], items[i + 1]) for i in range(0, len(items), 2)]
        if type(target) in (dict, OrderedDict, Counter):
            for k, v in pairs:
                target[k] = v
        elif isinstance(target, Foreign):
            target.items.extend(pairs)
        else:
            raise pickle.UnpicklingError(f"SETITEM is not allowed on {type(target).__name__}")

    def load_additems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is set:
            target.update(items)
        elif isinstance(target, Foreign):
            target.items.extend(items)
        else:
            raise pickle.UnpicklingError(f"ADDITEMS is not allowed on {type(target).__name__}")
    dispatch[pickle.ADDITEMS[0]] = load_additems

    def get_extension(self, code: int) -> None:
        """EXT1/2/4: resolved through `find_class` every time (never pickle's shared cache)."""
        import copyreg

        key = copyreg._inverted_registry.get(code)
        if not key:
            raise pickle.UnpicklingError(f"unregistered extension code {code}")
        self.append(self.find_class(*key))


def _renamed(module: str, name: str, proto: int) -> str:
    """The dotted name, with Python 2 names mapped as torch and pickle map them."""
    from torch._utils import IMPORT_MAPPING, NAME_MAPPING

    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    if proto < 3:
        import _compat_pickle

        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _is_allowed(obj: Any) -> bool:
    return id(obj) in _allowed_ids() and any(obj is v for v in _allowed().values())


def _name_of(obj: Any) -> str:
    if isinstance(obj, (Global, Foreign)):
        return obj.name
    if isinstance(obj, type) or callable(obj):
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"
    return type(obj).__name__


def pickle_module(record: Record) -> types.ModuleType:
    """A module for `torch.load(pickle_module=...)` whose unpickler is `SafeUnpickler`, its
    globals collected in `record`."""
    cls = type("SafeUnpickler", (SafeUnpickler,), {"record": record})

    def load(file: Any, **kwargs: Any) -> Any:
        return cls(file, **kwargs).load()

    module = types.ModuleType("finetune_prep_safe_unpickle")
    module.Unpickler = cls  # type: ignore[attr-defined]
    module.load = load  # type: ignore[attr-defined]
    module.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    return module


def loads(data: bytes, record: Record | None = None,
          persistent_load: Callable[[Any], Any] | None = None) -> Any:
    """Unpickle bytes with `SafeUnpickler` (storages through `persistent_load`, if given)."""
    cls = type("SafeUnpickler", (SafeUnpickler,), {"record": record or Record()})
    unpickler = cls(io.BytesIO(data), encoding="utf-8")
    if persistent_load is not None:
        unpickler.persistent_load = persistent_load  # type: ignore[method-assign]
    return unpickler.load()


def _storage_ref(pid: Any) -> StorageRef:
    """torch's persistent id ('storage', storage type, key, location, numel), not loaded."""
    if not (isinstance(pid, tuple) and len(pid) == 5):
        raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
    kind, storage_type, key, _location, numel = pid
    kind = kind.decode("ascii") if isinstance(kind, bytes) else kind
    if kind != "storage" or not isinstance(numel, int) or numel < 0:
        raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
    dtype = torch.uint8 if storage_type is torch.UntypedStorage else \
        getattr(storage_type, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError(f"unknown storage type in persistent id {pid!r:.80}")
    return StorageRef(str(key), dtype, numel)


def scan(data: bytes) -> tuple[Any, Record]:
    """A torch zip file's data.pkl, unpickled with storages left unread (`StorageRef`s)."""
    record = Record()
    return loads(data, record, _storage_ref), record


@dataclass(frozen=True)
class TensorRef:
    """Where a tensor of a torch zip file lives: its storage record and its view of it."""

    path: str
    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def tensor_refs(obj: Any, path: str = "") -> Iterator[TensorRef]:
    """Every tensor a `scan` result holds, with its dotted path in the file. Each container is
    visited once, however deep or shared, so no tensor escapes the size check."""
    stack: list[tuple[Any, str]] = [(obj, path)]
    seen: set[int] = set()
    while stack:
        item, at = stack.pop()
        if isinstance(item, (dict, list, tuple, Foreign)):
            if id(item) in seen:
                continue
            seen.add(id(item))
        if isinstance(item, Foreign) and item.name in REBUILDS:
            ref = _tensor_ref(item, at)
            if ref is not None:
                yield ref
                continue
        if isinstance(item, dict):
            children = [(v, f"{at}.{k}" if at else str(k)) for k, v in item.items()]
        elif isinstance(item, (list, tuple)):
            children = [(v, f"{at}.{i}" if at else str(i)) for i, v in enumerate(item)]
        elif isinstance(item, Foreign):
            children = [(v, at) for v in (*item.args, *item.state, *item.items)]
        else:
            continue
        stack.extend(reversed(children))


def _tensor_ref(obj: Foreign, path: str) -> TensorRef | None:
    args = obj.args
    if obj.name.startswith("torch._utils._rebuild_parameter"):
        return next(tensor_refs(args[0], path), None) if args else None
    if obj.name == "torch._tensor._rebuild_from_type_v2":
        return next(tensor_refs(args[2], path), None) if len(args) > 2 else None
    if len(args) >= 4 and isinstance(args[0], StorageRef) and isinstance(args[1], int):
        size, stride = args[2], args[3]
        if isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list)):
            return TensorRef(path, args[0], args[1], tuple(size), tuple(stride))
    return None


def foreign_names(obj: Any, depth: int = 0, limit: int = 6) -> list[str]:
    """The names of the records inside `obj`, outermost first, at most `limit`."""
    found: dict[str, None] = {}
    stack = [(obj, depth)]
    seen: set[int] = set()
    while stack and len(found) < limit:
        value, d = stack.pop(0)
        if id(value) in seen or d > 20:
            continue
        seen.add(id(value))
        if isinstance(value, (Global, Foreign)):
            found.setdefault(value.name, None)
        if isinstance(value, Foreign):
            stack += [(v, d + 1) for v in (*value.args, *value.state, *value.items)]
        elif isinstance(value, dict):
            stack += [(v, d + 1) for v in (*value.keys(), *value.values())]
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack += [(v, d + 1) for v in value]
    return list(found)


