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
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from savegame.adapters import torch_if_imported
from savegame.adapters.report import LoadReport as LoadReport
from savegame.adapters.rng import capture_generator, restore_generator
from savegame.errors import StateMismatchError, UnsupportedTypeError
from savegame.format.tree import Encoder, Path, contains, format_path


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict(state)`` can be saved and restored.

    ``load_state_dict`` may also take a keyword ``strict`` (passed through) and a keyword-only ``where``
    (the item's path in the state, e.g. ``"loader"``, for its messages)."""

    def state_dict(self) -> Mapping[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], /) -> Any: ...


def kind_of(obj: object) -> str:
    """A short description of what an item was, recorded in the manifest (informational only)."""
    torch = torch_if_imported()
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
    torch = torch_if_imported()
    if torch is not None and isinstance(obj, torch.nn.Module):
        from savegame.adapters.torch import capture_module

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
    if torch is not None:
        _refuse_plain_loader(obj, path)
    return None


def _refuse_plain_loader(obj: object, path: Path) -> None:
    """A plain torch DataLoader cannot be saved: say how to make its position part of the state."""
    from savegame.adapters.dataloader import plain_loader_message

    message = plain_loader_message(obj)
    if message is not None:
        raise UnsupportedTypeError(f"{format_path(path)}: {message}")


Updates = list[tuple[Any, Any, Any]]
"""Assignments ``container[key] = value`` a restore makes once the whole state matched (see
:func:`restore_items`): plain values replaced in their dict or list."""


def restore_items(
    target: Mapping[str, Any], values: Mapping[str, Any], *, strict: bool, report: LoadReport, where: str
) -> None:
    """Restore the decoded items ``values`` into ``target`` (a dict of items), in place.

    What happens to each value of the target, the way ``torch.distributed.checkpoint.load`` treats its
    state dict:

    * live objects (modules, optimizers, Stateful objects, generators, tensors, arrays) get their state
      back in place, as they always did;
    * dicts are filled in place, recursively; a key of the target that the checkpoint lacks is left as it
      is and reported missing; a key only in the checkpoint is added to a dict of plain data (one that
      holds no live object: it takes the checkpoint's content) and reported unexpected in a dict of live
      objects;
    * lists are filled in place element by element; a list of plain data whose length differs gets the
      checkpoint's contents (``lst[:] = saved``), a list holding live objects reports a length mismatch;
    * anything else (numbers, strings, None, tuples, ...) cannot change in place and is replaced in its
      dict or list (``state["epoch"] = 11``); a read-only ``target`` mapping keeps its top-level values,
      whose new values are in ``report.state``.

    A type mismatch (a dict or a live object in the target, something else in the checkpoint) raises
    :class:`StateMismatchError` when ``strict``, else is listed in ``report.mismatched_types`` and left
    alone. Plain values are replaced only once the walk is over and, when ``strict``, the whole state
    matched: a strict load that fails never changes them (live objects restored before the mismatch
    was found keep their new state, as before). Plain items also go to ``report.state``.
    """
    updates: Updates = []
    mutable = isinstance(target, MutableMapping)
    for name, value in values.items():
        current = target[name]
        if not replaceable(current):
            restore(current, value, strict=strict, path=(name,), report=report, updates=updates)
        else:
            if mutable:
                updates.append((target, name, value))
            report.loaded.append(name)
        if not holds_live(current):
            report.state[name] = value
    if strict and not report.clean:
        raise StateMismatchError(f"{where}: state does not match the target: {report}", report)
    apply_updates(updates)


def apply_updates(updates: Updates) -> None:
    """Make the deferred assignments of a restore."""
    for container, key, value in updates:
        container[key] = value


def holds_live(value: object, depth: int = 0) -> bool:
    """Whether ``value`` is or contains a live object (module, optimizer, tensor, array, generator,
    Stateful), i.e. is more than plain data."""
    return contains(value, lambda v: kind_of(v) != "data", depth)


def replaceable(value: object) -> bool:
    """Whether ``value`` cannot take a saved state in place and is replaced in its container instead
    (numbers, strings, None, tuples...; not dicts, lists or live objects)."""
    return not isinstance(value, (MutableMapping, list)) and kind_of(value) == "data"


def restore(
    target: object, state: object, *, strict: bool, path: Path, report: LoadReport, updates: Updates | None = None
) -> None:
    """Put ``state`` into the live ``target`` in place, recording mismatches in ``report``.

    ``updates``: where replacements of plain values inside dicts and lists are queued (see
    :func:`restore_items`); made at once when None.
    """
    where = format_path(path)
    queue: Updates = [] if updates is None else updates
    _restore(target, state, strict=strict, path=path, where=where, report=report, updates=queue)
    if updates is None:
        apply_updates(queue)


def _restore(
    target: object, state: object, *, strict: bool, path: Path, where: str, report: LoadReport, updates: Updates
) -> None:
    torch = torch_if_imported()
    if torch is not None:
        from savegame.adapters import torch as torch_adapter

        if isinstance(target, torch.nn.Module):
            if not isinstance(state, Mapping):
                _type_mismatch(target, state, where=where, strict=strict, report=report)
                return
            mod_report = torch_adapter.restore_module(target, state, strict=strict, where=where)
            report.missing_keys += [f"{where}.{k}" for k in mod_report.missing_keys]
            report.unexpected_keys += [f"{where}.{k}" for k in mod_report.unexpected_keys]
            report.mismatched_keys += [(f"{where}.{k}", a, b) for k, a, b in mod_report.mismatched_keys]
            report.loaded.append(where)
            return
        if isinstance(target, torch.optim.Optimizer):
            if not isinstance(state, Mapping):
                _type_mismatch(target, state, where=where, strict=strict, report=report)
                return
            torch_adapter.restore_optimizer(target, state, where=where)
            report.loaded.append(where)
            return
        if isinstance(target, torch.Tensor):
            _copy_tensor(target, state, where, report, strict=strict)
            return
    if restore_generator(target, state, where):
        report.loaded.append(where)
        return
    if isinstance(target, np.ndarray):
        _copy_array(target, state, where, report, strict=strict)
        return
    if _is_stateful(target) and not isinstance(target, (dict, list, tuple)):
        load: Callable[..., Any] = target.load_state_dict  # type: ignore[attr-defined]
        takes_strict = _accepts_strict(load)
        named = {"where": where} if _accepts_keyword_only(load, "where") else {}
        try:
            result = load(state, strict=strict, **named) if takes_strict else load(state, **named)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise StateMismatchError(f"{where}: load_state_dict failed: {exc}") from exc
        if takes_strict:
            _merge_report(result, where, report)
        report.loaded.append(where)
        return
    if isinstance(target, MutableMapping):
        if not isinstance(state, Mapping):
            _type_mismatch(target, state, where=where, strict=strict, report=report)
            return
        _restore_dict(target, state, strict=strict, path=path, report=report, updates=updates)
        return
    if isinstance(target, list):
        if not isinstance(state, (list, tuple)):
            _type_mismatch(target, state, where=where, strict=strict, report=report)
            return
        _restore_list(target, state, strict=strict, path=path, where=where, report=report, updates=updates)
        return
    raise StateMismatchError(
        f"{where}: cannot load {type(state).__name__} into {type(target).__name__} in place "
        "(targets are modules, optimizers, Stateful objects, generators, tensors, arrays, and dicts/lists of "
        "them; other values are replaced in the dict or list that holds them)"
    )


def _restore_entry(
    container: Any, key: object, current: object, value: object, *, strict: bool, path: Path,
    report: LoadReport, updates: Updates,
) -> None:  # fmt: skip
    """Restore one value of a dict or list: in place if it can be, else replaced in ``container``."""
    sub = (*path, key)
    if not replaceable(current):
        _restore(current, value, strict=strict, path=sub, where=format_path(sub), report=report, updates=updates)
    else:
        updates.append((container, key, value))


def _restore_dict(
    target: MutableMapping[Any, Any], state: Mapping[Any, Any], *, strict: bool, path: Path, report: LoadReport,
    updates: Updates,
) -> None:  # fmt: skip
    for key, current in target.items():
        if key in state:
            _restore_entry(target, key, current, state[key], strict=strict, path=path, report=report, updates=updates)
        else:
            report.missing_keys.append(format_path((*path, key)))
    extra = [k for k in state if k not in target]
    if not extra:
        return
    if holds_live(target):
        report.unexpected_keys += [format_path((*path, k)) for k in extra]
    else:  # plain data takes the checkpoint's content
        updates += [(target, k, state[k]) for k in extra]


def _restore_list(
    target: list[Any], state: Sequence[Any], *, strict: bool, path: Path, where: str, report: LoadReport,
    updates: Updates,
) -> None:  # fmt: skip
    if len(target) == len(state):
        for i, (current, value) in enumerate(zip(target, state)):
            _restore_entry(target, i, current, value, strict=strict, path=path, report=report, updates=updates)
    elif holds_live(target):
        report.mismatched_keys.append((where, (len(state),), (len(target),)))
    else:  # plain data takes the checkpoint's content
        updates.append((target, slice(None), list(state)))


def _type_mismatch(target: object, state: object, *, where: str, strict: bool, report: LoadReport) -> None:
    """The checkpoint holds something that cannot go into ``target``: raise (strict) or report it."""
    saved, live = type(state).__name__, type(target).__name__
    if strict:
        raise StateMismatchError(
            f"{where}: the checkpoint holds {saved}, the target is {live}; pass strict=False to load the rest "
            "(and leave this one as it is)",
            report,
        )
    report.mismatched_types.append((where, saved, live))


def _accepts_strict(load: Callable[..., Any]) -> bool:
    """Whether ``load_state_dict`` takes a ``strict`` keyword (``torch``-style and :class:`KerasState`)."""
    try:
        parameters = inspect.signature(load).parameters
    except (TypeError, ValueError):
        return False
    param = parameters.get("strict")
    return param is not None and param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _accepts_keyword_only(load: Callable[..., Any], name: str) -> bool:
    """Whether ``load_state_dict`` takes the keyword-only parameter ``name`` (``where``: the item's path,
    which :class:`savegame.data.ResumableLoader` names in its warning)."""
    try:
        param = inspect.signature(load).parameters.get(name)
    except (TypeError, ValueError):
        return False
    return param is not None and param.kind is inspect.Parameter.KEYWORD_ONLY


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


def _copy_tensor(target: Any, state: object, where: str, report: LoadReport, *, strict: bool) -> None:
    import torch

    if not isinstance(state, torch.Tensor):
        _type_mismatch(target, state, where=where, strict=strict, report=report)
        return
    if state.shape != target.shape:
        report.mismatched_keys.append((where, tuple(state.shape), tuple(target.shape)))
        return
    with torch.no_grad():
        target.copy_(state)
    report.loaded.append(where)


def _copy_array(target: np.ndarray, state: object, where: str, report: LoadReport, *, strict: bool) -> None:
    if not isinstance(state, np.ndarray):
        _type_mismatch(target, state, where=where, strict=strict, report=report)
        return
    if state.shape != target.shape:
        report.mismatched_keys.append((where, tuple(state.shape), tuple(target.shape)))
        return
    np.copyto(target, state, casting="same_kind")
    report.loaded.append(where)
