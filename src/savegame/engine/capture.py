"""Live objects <-> nested state: the walk that hands each live object to its adapter.

What "the state" of a module, optimizer, generator or Stateful object is, and how a saved state goes
back into one, is the adapters' job (:mod:`savegame.adapters.registry`: one table, one adapter shape).
This module walks the state: on save, the tree codec's hook replaces each live object by what its
adapter captures; on load into a *target*, the saved state is walked together with the target, every
live object is restored in place by its adapter, dicts and lists are filled in place, and plain values
are replaced in their containers once the whole state matched (:func:`restore_items`).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from savegame.adapters.registry import Stateful as Stateful
from savegame.adapters.registry import adapter_for, type_mismatch
from savegame.adapters.report import LoadReport as LoadReport
from savegame.errors import StateMismatchError
from savegame.format.tree import Encoder, Path, contains, format_path


def kind_of(obj: object) -> str:
    """A short description of what an item was, recorded in the manifest (informational only): its
    adapter's kind (:mod:`savegame.adapters.registry`), ``"data"`` for plain data."""
    adapter = adapter_for(obj)
    return adapter.kind(obj) if adapter is not None else "data"


def live_object_hook(obj: object, path: Path, enc: Encoder) -> dict[str, Any] | None:
    """Tree-codec hook: replace a live object by the state its adapter captures, then encode that state."""
    adapter = adapter_for(obj)
    if adapter is None:
        return None
    fast = getattr(adapter, "encode_live", None)  # adapters written to the protocol alone may lack it
    if fast is not None:
        encoded: dict[str, Any] | None = fast(obj, path, enc)
        if encoded is not None:
            return encoded
    state = adapter.capture(obj, format_path(path))
    if state is None:  # tensors and arrays: the codec stores them itself
        return None
    node: dict[str, Any] = enc.encode(state, path)
    return node


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
    matched: a strict load that fails never changes them. Before a strict load restores anything, the adapter
    of every live item after the first checks its state (``check``: a module's keys and shapes, an
    optimizer's parameter groups), so such a mismatch leaves every item as it was; an object whose own
    ``load_state_dict`` raises part-way is the one case where items restored before it keep their new
    state. Plain items also go to ``report.state``.
    """
    updates: Updates = []
    mutable = isinstance(target, MutableMapping)
    _check_writable(target, values, ())
    if strict:
        _check_later_items(target, values)
    for name, value in values.items():
        current = target[name]
        adapter = adapter_for(current)
        if adapter is not None:  # a live object (the usual item): its adapter, asked once, restores it
            restore_live(adapter, current, value, strict=strict, where=format_path((name,)), report=report,
                         updates=updates)  # fmt: skip
            continue
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


def _check_later_items(target: Mapping[str, Any], values: Mapping[str, Any]) -> None:
    """Ask the adapter of every live item after the first whether a strict restore would refuse its state
    (:meth:`BaseAdapter.check`), before any item is restored: the first item's own restore refuses before
    changing it, but a later model whose shapes differ, or an optimizer with other parameter groups, would
    otherwise be found only after the earlier items were restored."""
    first = True
    for name, value in values.items():
        current = target[name]
        adapter = adapter_for(current)
        if adapter is None:
            continue
        if not first:
            check = getattr(adapter, "check", None)
            if check is not None:
                check(current, value, where=format_path((name,)))
        first = False


def _check_writable(target: object, value: object, path: Path) -> None:
    """Before anything is restored: every tensor or array of the target (in its dicts and lists) that the
    checkpoint has a value for must take it in place (:meth:`BaseAdapter.check_writable`: not an expanded
    tensor, an inference tensor, a meta tensor or a read-only array), so one that cannot does not fail
    with torch's bare error after the tensors before it were overwritten."""
    adapter = adapter_for(target)
    if adapter is not None:
        check = getattr(adapter, "check_writable", None)
        if check is not None:
            check(target, where=format_path(path))
        return
    if isinstance(target, Mapping) and isinstance(value, Mapping):
        for key, sub in value.items():
            if key in target:
                _check_writable(target[key], sub, (*path, key))
    elif isinstance(target, list) and isinstance(value, list) and len(target) == len(value):
        for i, (live, sub) in enumerate(zip(target, value)):
            _check_writable(live, sub, (*path, i))


class _CopyInto:
    """A deferred in-place copy as an :data:`Updates` entry: ``_CopyInto(...)[target] = state`` copies."""

    def __init__(self, adapter: Any, where: str, report: LoadReport) -> None:
        self.adapter, self.where, self.report = adapter, where, report

    def __setitem__(self, target: object, state: object) -> None:
        self.adapter.copy_into(target, state, where=self.where, report=self.report)


def restore_live(
    adapter: Any, target: object, state: object, *, strict: bool, where: str, report: LoadReport, updates: Updates
) -> None:  # fmt: skip
    """Restore a live object by its adapter. A tensor or array (an adapter with ``matches`` and
    ``copy_into``) in a strict load is only checked now and copied with the plain values, once the whole
    state matched: a mismatch found later must not leave the tensors before it overwritten."""
    matches = getattr(adapter, "matches", None)
    if strict and matches is not None:
        if matches(target, state, strict=strict, where=where, report=report):
            updates.append((_CopyInto(adapter, where, report), target, state))
        return
    adapter.restore(target, state, strict=strict, where=where, report=report)


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
    adapter = adapter_for(target)
    if adapter is not None:
        restore_live(adapter, target, state, strict=strict, where=where, report=report, updates=updates)
        return
    if isinstance(target, MutableMapping):
        if not isinstance(state, Mapping):
            type_mismatch(target, state, where=where, strict=strict, report=report)
            return
        _restore_dict(target, state, strict=strict, path=path, report=report, updates=updates)
        return
    if isinstance(target, list):
        if not isinstance(state, (list, tuple)):
            type_mismatch(target, state, where=where, strict=strict, report=report)
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
