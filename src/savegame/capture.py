"""Live objects <-> nested state: what "the state" of a module, optimizer or generator is.

On save, any object in the state that is a known framework object or follows the :class:`Stateful`
protocol is replaced by its state (``state_dict()``); generator objects by their generator state. On
load into a *target*, the saved state is walked together with the target and every live object gets its
state back **in place**: modules strictly (with a report of what differs), optimizers, schedulers,
scalers and other Stateful objects through ``load_state_dict``, tensors and arrays by copying into
their memory.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .adapters.rng import capture_generator, restore_generator
from .errors import StateMismatchError, UnsupportedTypeError
from .tree import Encoder, Path, format_path


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict(state)`` can be saved and restored."""

    def state_dict(self) -> Mapping[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], /) -> Any: ...


def kind_of(obj: object) -> str:
    """A short description of what an item was, recorded in the manifest (informational only)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        if isinstance(obj, torch.nn.Module):
            return "torch.nn.Module"
        if isinstance(obj, torch.optim.Optimizer):
            return "torch.optim.Optimizer"
        if isinstance(obj, torch.Tensor):
            return "torch.Tensor"
    if capture_generator(obj) is not None:
        return "generator"
    if isinstance(obj, np.ndarray):
        return "numpy.ndarray"
    if _is_stateful(obj):
        cls = type(obj)
        return f"stateful:{cls.__module__}.{cls.__qualname__}"[:200]
    return "data"


def _is_stateful(obj: object) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def live_object_hook(obj: object, path: Path, enc: Encoder) -> dict[str, Any] | None:
    """Tree-codec hook: replace live objects by their state, then encode that state."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.nn.Module):
        from .adapters.torch import capture_module

        node: dict[str, Any] = enc.encode(capture_module(obj), path)
        return node
    gen = capture_generator(obj)
    if gen is not None:
        node = enc.encode(gen, path)
        return node
    if _is_stateful(obj) and not isinstance(obj, (dict, list, tuple)):
        try:
            state = obj.state_dict()  # type: ignore[attr-defined]
        except Exception as exc:
            raise UnsupportedTypeError(f"{format_path(path)}: {type(obj).__name__}.state_dict() failed: {exc}") from exc
        if state is obj:
            raise UnsupportedTypeError(f"{format_path(path)}: state_dict() returned the object itself")
        node = enc.encode(state, path)
        return node
    return None


@dataclass
class LoadReport:
    """The result of loading into live objects.

    ``state``: the decoded values of the items that were not loaded in place (e.g. ``epoch``), by item.
    ``missing_keys`` / ``unexpected_keys``: qualified names (``model.fc.bias``) only in the target / only in
    the checkpoint. ``mismatched_keys``: ``(name, checkpoint shape, target shape)``. ``loaded``: what was
    restored in place. ``manifest``: the checkpoint's manifest.
    """

    state: dict[str, Any] = field(default_factory=dict)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    manifest: Any = field(default=None, repr=False)

    @property
    def clean(self) -> bool:
        """True when everything in the target was found and matched."""
        return not (self.missing_keys or self.unexpected_keys or self.mismatched_keys)


def restore(target: object, state: object, *, strict: bool, path: Path, report: LoadReport) -> None:
    """Put ``state`` into the live ``target`` in place, recording mismatches in ``report``."""
    where = format_path(path)
    torch = sys.modules.get("torch")
    if torch is not None:
        from .adapters import torch as torch_adapter

        if isinstance(target, torch.nn.Module):
            mod_report = torch_adapter.restore_module(target, state, strict=strict, where=where)
            report.missing_keys += [f"{where}.{k}" for k in mod_report.missing_keys]
            report.unexpected_keys += [f"{where}.{k}" for k in mod_report.unexpected_keys]
            report.mismatched_keys += [(f"{where}.{k}", a, b) for k, a, b in mod_report.mismatched_keys]
            report.loaded.append(where)
            return
        if isinstance(target, torch.optim.Optimizer):
            torch_adapter.restore_optimizer(target, state, where=where)
            report.loaded.append(where)
            return
        if isinstance(target, torch.Tensor):
            _copy_tensor(target, state, where, report)
            return
    if restore_generator(target, state, where):
        report.loaded.append(where)
        return
    if isinstance(target, np.ndarray):
        _copy_array(target, state, where, report)
        return
    if _is_stateful(target) and not isinstance(target, (dict, list, tuple)):
        load: Callable[..., Any] = target.load_state_dict  # type: ignore[attr-defined]
        takes_strict = _accepts_strict(load)
        try:
            result = load(state, strict=strict) if takes_strict else load(state)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise StateMismatchError(f"{where}: load_state_dict failed: {exc}") from exc
        if takes_strict:
            _merge_report(result, where, report)
        report.loaded.append(where)
        return
    if isinstance(target, dict) and isinstance(state, Mapping):
        for key, sub in target.items():
            if key in state:
                restore(sub, state[key], strict=strict, path=(*path, key), report=report)
            else:
                report.missing_keys.append(format_path((*path, key)))
        report.unexpected_keys += [format_path((*path, k)) for k in state if k not in target]
        return
    if isinstance(target, list) and isinstance(state, (list, tuple)) and len(target) == len(state):
        for i, (sub, value) in enumerate(zip(target, state)):
            restore(sub, value, strict=strict, path=(*path, i), report=report)
        return
    raise StateMismatchError(
        f"{where}: cannot load {type(state).__name__} into {type(target).__name__} in place "
        "(targets are modules, optimizers, Stateful objects, generators, tensors, arrays, and dicts/lists of them)"
    )


def _accepts_strict(load: Callable[..., Any]) -> bool:
    """Whether ``load_state_dict`` takes a ``strict`` keyword (``torch``-style and :class:`KerasState`)."""
    try:
        parameters = inspect.signature(load).parameters
    except (TypeError, ValueError):
        return False
    param = parameters.get("strict")
    return param is not None and param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _merge_report(result: object, where: str, report: LoadReport) -> None:
    """Add what a non-strict ``load_state_dict`` reported as missing/unexpected/mismatched to ``report``.

    Understands torch's ``(missing_keys, unexpected_keys)`` result and reports with ``missing``,
    ``unexpected`` and ``mismatched`` lists (:class:`savegame.adapters.keras.KerasLoadReport`).
    """
    missing = getattr(result, "missing_keys", None)
    if missing is None:
        missing = getattr(result, "missing", None)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected is None:
        unexpected = getattr(result, "unexpected", None)
    mismatched = getattr(result, "mismatched", None)
    if isinstance(missing, (list, tuple)):
        report.missing_keys += [f"{where}.{k}" for k in missing]
    if isinstance(unexpected, (list, tuple)):
        report.unexpected_keys += [f"{where}.{k}" for k in unexpected]
    if isinstance(mismatched, (list, tuple)):
        for entry in mismatched:
            if isinstance(entry, tuple) and len(entry) == 3:
                name, saved, live = entry
                report.mismatched_keys.append((f"{where}.{name}", tuple(saved), tuple(live)))


def _copy_tensor(target: Any, state: object, where: str, report: LoadReport) -> None:
    import torch

    if not isinstance(state, torch.Tensor):
        raise StateMismatchError(f"{where}: checkpoint holds {type(state).__name__}, target is a tensor")
    if state.shape != target.shape:
        report.mismatched_keys.append((where, tuple(state.shape), tuple(target.shape)))
        return
    with torch.no_grad():
        target.copy_(state)
    report.loaded.append(where)


def _copy_array(target: np.ndarray, state: object, where: str, report: LoadReport) -> None:
    if not isinstance(state, np.ndarray):
        raise StateMismatchError(f"{where}: checkpoint holds {type(state).__name__}, target is an array")
    if state.shape != target.shape:
        report.mismatched_keys.append((where, tuple(state.shape), tuple(target.shape)))
        return
    np.copyto(target, state, casting="same_kind")
    report.loaded.append(where)
