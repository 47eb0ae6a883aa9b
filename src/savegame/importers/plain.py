"""Loaded source data -> what ``savegame.save`` stores exactly, with a note for every change.

``torch.load(weights_only=True)``, safetensors and h5py give tensors, arrays and containers, but not
only the exact built-in types the tree codec takes: ``OrderedDict`` is fine, while a ``Counter``, a
``set``, a ``bytearray``, an ``nn.Parameter`` or a sparse tensor is not. :func:`plain` rebuilds the
data with exact types (a ``set`` as a sorted list, a ``Parameter`` as its tensor...) and records each
change in ``converted`` and each value it cannot store in ``skipped`` (with the reason), so nothing is
changed or dropped silently. The walk is bounded (:data:`MAX_NODES` values, ``MAX_DEPTH`` levels).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from savegame.errors import DamagedSourceError
from savegame.format.dtypes import numpy_code
from savegame.format.tree import MAX_DEPTH

__all__ = ["MAX_NODES", "Plain", "array_stats"]

MAX_NODES = 10_000_000
"""Most values (containers and leaves) one source may hold: a bound on the walk over untrusted data."""

_SCALARS = (bool, int, float, str, bytes, type(None))


class Plain:
    """One conversion: call :meth:`value` on each loaded item; read ``converted`` / ``skipped`` after."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.converted: list[str] = []
        self.skipped: list[str] = []
        self._nodes = 0

    def value(self, obj: Any, path: str, depth: int = 0) -> tuple[bool, Any]:
        """``(keep, value)``: the storable form of ``obj`` at ``path`` (``keep`` False: left out)."""
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise DamagedSourceError(f"{self.source}: more than {MAX_NODES:,} values; refusing to walk further")
        if depth >= MAX_DEPTH:
            raise DamagedSourceError(f"{self.source}: {path[:200]}...: nested deeper than {MAX_DEPTH} levels")
        if type(obj) in _SCALARS:
            return True, obj
        if isinstance(obj, np.ndarray) or isinstance(obj, np.generic):
            return self._array(obj, path)
        tensor = _torch_tensor_type()
        if tensor is not None and isinstance(obj, tensor):
            return self._tensor(obj, path)
        if _is_torch_value(obj):  # torch.dtype, torch.device, torch.Size: the codec has tags for them
            return True, obj
        if isinstance(obj, Mapping):
            return True, self._mapping(obj, path, depth)
        if isinstance(obj, (list, tuple)):
            items = [self.value(v, f"{path}.{i}", depth + 1) for i, v in enumerate(obj)]
            kept = [v for keep, v in items if keep]
            if type(obj) not in (list, tuple):
                kind = "tuple" if isinstance(obj, tuple) else "list"
                self.converted.append(f"{path}: {type(obj).__name__} stored as a {kind}")
            if len(kept) != len(items):  # positions matter: keep the rest as None rather than shift them
                kept = [v if keep else None for keep, v in items]
            return True, tuple(kept) if isinstance(obj, tuple) else kept
        return self._other(obj, path, depth)

    def _mapping(self, obj: Mapping[Any, Any], path: str, depth: int) -> dict[Any, Any]:
        out: dict[Any, Any] = OrderedDict() if type(obj) is OrderedDict else {}
        if type(obj) not in (dict, OrderedDict):
            self.converted.append(f"{path}: {type(obj).__name__} stored as a dict")
        for key, v in obj.items():
            if type(key) not in (str, int, float, bool, tuple, type(None)):
                self.skipped.append(f"{path}: a key of type {type(key).__name__} (only str, int, float, tuple keys)")
                continue
            keep, stored = self.value(v, f"{path}.{key}", depth + 1)
            if keep:
                out[key] = stored
        return out

    def _array(self, obj: Any, path: str) -> tuple[bool, Any]:
        try:  # the codec's own test: objects, records, byte and text strings, longdouble have no exact form
            numpy_code(obj.dtype)
        except KeyError:
            self.skipped.append(f"{path}: a NumPy value of dtype {obj.dtype} (objects, records, strings or "
                                "extended precision: no exact pickle-free form)")  # fmt: skip
            return False, None
        if isinstance(obj, np.generic):
            return True, obj
        if type(obj) is not np.ndarray:
            self.converted.append(f"{path}: {type(obj).__name__} stored as a NumPy array")
            obj = np.asarray(obj)
        return True, obj

    def _tensor(self, obj: Any, path: str) -> tuple[bool, Any]:
        import torch

        if obj.layout != torch.strided or obj.is_quantized or obj.is_nested:
            self.skipped.append(f"{path}: a {obj.layout} / quantized / nested tensor (only dense tensors are stored)")
            return False, None
        if type(obj) is not torch.Tensor:
            self.converted.append(f"{path}: {type(obj).__name__} stored as a plain tensor")
            obj = obj.detach().as_subclass(torch.Tensor)
        return True, obj

    def _other(self, obj: Any, path: str, depth: int) -> tuple[bool, Any]:
        if isinstance(obj, (set, frozenset)):
            try:
                values = sorted(obj)
            except TypeError:
                values = list(obj)
            self.converted.append(f"{path}: {type(obj).__name__} stored as a list")
            return self.value(values, path, depth)
        if isinstance(obj, bytearray):
            self.converted.append(f"{path}: bytearray stored as bytes")
            return True, bytes(obj)
        plain_type = next((t for t in (bool, int, float, str, bytes) if isinstance(obj, t)), None)
        if plain_type is not None:  # a subclass (IntEnum, a str enum): its plain value
            self.converted.append(f"{path}: {type(obj).__name__} stored as {plain_type.__name__}")
            return True, plain_type(obj)
        self.skipped.append(f"{path}: a {type(obj).__name__} value (no exact pickle-free form)")
        return False, None


def _torch_tensor_type() -> Any:
    from savegame.adapters import torch_if_imported

    torch = torch_if_imported()
    return torch.Tensor if torch is not None else None


def _is_torch_value(obj: object) -> bool:
    from savegame.adapters import torch_if_imported

    torch = torch_if_imported()
    return torch is not None and isinstance(obj, (torch.dtype, torch.device, torch.Size))


def array_stats(value: Any, depth: int = 0) -> tuple[int, int]:
    """``(arrays, bytes)`` in a converted value (tensors and NumPy arrays; a tied tensor at each of its places)."""
    if depth > MAX_DEPTH:
        return 0, 0
    if isinstance(value, np.ndarray):
        return 1, int(value.nbytes)
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(value, tensor):
        return 1, int(value.numel() * value.element_size())
    values = value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else ()
    count = size = 0
    for v in values:
        c, s = array_stats(v, depth + 1)
        count, size = count + c, size + s
    return count, size
