"""A running simulation's state as bytes, and back: what a checkpoint holds.

Everything a run changes is pickled whole, so nothing is forgotten and a resumed run goes on
bit for bit. What the scenario rebuilds is referenced, not copied; tensors travel as their
storages' bytes (views keep sharing); loading allows only known classes, so a checkpoint
cannot run other code.
Details: docs/architecture.md#checkpoints-of-a-simulated-run
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import io
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


class SnapshotError(ValueError):
    """State that cannot be saved, or bytes that cannot be restored."""


@functools.cache
def code_fingerprint() -> str:
    """SHA-256 over edgeddl's sources and torch's version: pickled state fits only the code
    that wrote it."""
    h = hashlib.sha256(torch.__version__.encode())
    root = Path(__file__).parent
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _storage(data: bytes, device: str) -> torch.UntypedStorage:
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0)
    return raw.untyped_storage().to(device=torch.device(device))


def _tensor(
    storage: torch.UntypedStorage,
    dtype: torch.dtype,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool,
    parameter: bool,
) -> torch.Tensor:
    t = torch.empty(0, dtype=dtype, device=storage.device)
    t.set_(storage, offset, size, stride)
    if parameter:
        return torch.nn.Parameter(t, requires_grad=requires_grad)
    return t.requires_grad_(requires_grad) if requires_grad else t


def _generator(device: str, state: torch.Tensor) -> torch.Generator:
    g = torch.Generator(device=torch.device(device))
    g.set_state(state)
    return g


class _Blob:
    """One storage's bytes, pickled once however many tensors view it."""

    def __init__(self, storage: torch.UntypedStorage) -> None:
        self.device = str(storage.device)
        cpu = storage.cpu()
        raw = torch.empty(0, dtype=torch.uint8).set_(cpu)
        self.data = raw.numpy().tobytes()

    def __reduce__(self) -> tuple[Any, ...]:
        return _storage, (self.data, self.device)


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, shared: Mapping[str, object]) -> None:
        super().__init__(file, protocol=5)
        self._shared = {id(v): k for k, v in shared.items()}
        self._shared_storages = {
            _storage_key(v): k for k, v in shared.items() if isinstance(v, torch.Tensor)
        }
        self._blobs: dict[tuple[str, int, int], _Blob] = {}

    def persistent_id(self, obj: object) -> str | None:
        return self._shared.get(id(obj))

    def reducer_override(self, obj: object) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._reduce_tensor(obj)
        if isinstance(obj, torch.Generator):
            return _generator, (str(obj.device), obj.get_state())
        return NotImplemented

    def _reduce_tensor(self, t: torch.Tensor) -> tuple[Any, ...]:
        plain = type(t) in (torch.Tensor, torch.nn.Parameter)
        if t.layout != torch.strided or t.is_quantized or not plain:
            raise SnapshotError(f"cannot save a {type(t).__name__} with layout {t.layout}")
        key = _storage_key(t)
        if key in self._shared_storages and t.untyped_storage().nbytes():
            raise SnapshotError(
                f"a tensor shares memory with {self._shared_storages[key]} but is not it"
            )
        blob = self._blobs.get(key)
        if blob is None:
            blob = self._blobs[key] = _Blob(t.untyped_storage())
        args = (
            blob,
            t.dtype,
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
            t.requires_grad and t.is_leaf,
            isinstance(t, torch.nn.Parameter),
        )
        return _tensor, args


def _storage_key(t: torch.Tensor) -> tuple[str, int, int]:
    s = t.untyped_storage()
    return str(s.device), s.data_ptr(), s.nbytes()


def dumps(state: object, shared: Mapping[str, object]) -> bytes:
    """`state` pickled, with the objects in `shared` referenced by their names."""
    buf = io.BytesIO()
    try:
        _Pickler(buf, shared).dump(state)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        raise SnapshotError(f"the run's state cannot be saved: {e}") from e
    return buf.getvalue()


_SAFE_BUILTINS = {
    "set",
    "frozenset",
    "slice",
    "range",
    "complex",
    "bytearray",
    "object",
    "int",
    "float",
    "bool",
    "str",
    "bytes",
    "tuple",
    "list",
    "dict",
}
_SAFE_FUNCTIONS = {
    (__name__, "_storage"),
    (__name__, "_tensor"),
    (__name__, "_generator"),
    ("copyreg", "_reconstructor"),
    ("copyreg", "__newobj__"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.random._pickle", "__bit_generator_ctor"),
    ("numpy.random._pickle", "__generator_ctor"),
    ("numpy.random._pickle", "__randomstate_ctor"),
    ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"),
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("collections", "deque"),
}
_SAFE_CLASS_ROOTS = ("edgeddl.", "numpy.", "torch.nn.", "torch.optim.")


class _Unpickler(pickle.Unpickler):
    def __init__(
        self, file: io.BytesIO, shared: Mapping[str, object], modules: frozenset[str]
    ) -> None:
        super().__init__(file)
        self._shared, self._modules = shared, modules

    def persistent_load(self, pid: object) -> object:
        if not isinstance(pid, str) or pid not in self._shared:
            raise SnapshotError(f"refers to {pid!r}, which this run does not have")
        return self._shared[pid]

    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        if (module, name) in _SAFE_FUNCTIONS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        found = super().find_class(module, name) if _allowed_module(module, self._modules) else None
        if isinstance(found, type) and _allowed_module(found.__module__, self._modules):
            return found
        raise SnapshotError(f"holds {module}.{name}, which a checkpoint may not load")


def _allowed_module(module: str, extra: frozenset[str]) -> bool:
    return module in extra or module in ("numpy", "torch") or module.startswith(_SAFE_CLASS_ROOTS)


def loads(data: bytes, shared: Mapping[str, object], modules: frozenset[str] = frozenset()) -> Any:
    """What `dumps` wrote, with `shared` standing for the names it referenced; `modules`:
    more modules whose classes may load (a user's model's)."""
    try:
        return _Unpickler(io.BytesIO(data), shared, modules).load()
    except SnapshotError:
        raise
    except Exception as e:  # a damaged file raises about anything
        raise SnapshotError(f"damaged ({type(e).__name__}: {e})") from None
