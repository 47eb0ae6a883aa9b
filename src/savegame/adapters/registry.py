"""The adapter registry: the one table of the live objects savegame knows, and what to do with each.

An :class:`Adapter` says whether it ``handles`` an object, what ``kind`` the manifest records for it,
what state to ``capture`` in its place on save, how to ``restore`` a saved state into it in place, how
a restore may share the file's memory (``zero_copy``), whether it is model weights (what a
``weights_only`` checkpoint keeps) and, through ``encode_hook``, how the tree codec encodes the
framework's values wherever they stand in a state (torch tensors, dtypes, sizes, devices; arrays of
another framework), collected by :func:`encode_hooks` for each encoder. :func:`adapter_for` asks the
adapters in order and returns the first that handles the object; an object no adapter handles is plain
data (dicts, lists, numbers...), encoded and restored by the tree codec and
:mod:`savegame.engine.capture` themselves.

The built-in order: torch modules, torch optimizers, torch tensors, generator objects (RNG), NumPy
arrays, a plain torch ``DataLoader`` (refused with what to do instead), then any :class:`Stateful`
object (``state_dict()`` / ``load_state_dict()``) last. :func:`register` puts a new adapter in front, so
a framework's own adapter (``savegame.adapters.keras`` registers :class:`KerasState`'s) wins over the
generic ones. The torch adapters answer only when this process imported torch (they never import it).

Who uses it: :mod:`savegame.engine.capture` (``kind_of``, the save-time hook, the in-place restore),
``engine.writer.make_encoder`` (:func:`encode_hooks`), ``adapters.zero_copy_for`` and
``adapters.is_model_weights``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from savegame.adapters.report import LoadReport
from savegame.adapters.rng import capture_generator, restore_generator
from savegame.errors import StateMismatchError, UnsupportedTypeError
from savegame.format.tree import ArrayHook, Encoder, Path

__all__ = [
    "Adapter", "BaseAdapter", "Stateful", "adapter_for", "adapters", "encode_hooks", "is_stateful", "register",
    "type_mismatch", "unregister",
]  # fmt: skip

ZeroCopy = bool | Literal["aligned"]


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict(state)`` can be saved and restored.

    ``load_state_dict`` may also take a keyword ``strict`` (passed through) and a keyword-only ``where``
    (the item's path in the state, e.g. ``"loader"``, for its messages)."""

    def state_dict(self) -> Mapping[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], /) -> Any: ...


class Adapter(Protocol):
    """One kind of live object. Only the adapter that ``handles`` an object is asked the rest."""

    def handles(self, obj: object) -> bool:
        """Whether this adapter is the one for ``obj``."""
        ...

    def kind(self, obj: object) -> str:
        """What the manifest records the item as (informational, e.g. ``"torch.nn.Module"``)."""
        ...

    def capture(self, obj: object, where: str) -> object | None:
        """The state to store in place of ``obj`` (encoded by the tree codec), or None to let the codec
        store ``obj`` itself (tensors and arrays are arrays already)."""
        ...

    def restore(self, target: object, state: object, *, strict: bool, where: str, report: LoadReport) -> None:
        """Put ``state`` into ``target`` in place, recording what loaded (or differed) in ``report``."""
        ...

    def zero_copy(self, target: object) -> ZeroCopy:
        """How a restore into ``target`` may share the file's memory (see ``adapters.zero_copy_for``)."""
        ...

    def model_weights(self, obj: object) -> bool:
        """Whether ``obj`` is model weights (kept by ``weights_only`` checkpoints)."""
        ...

    def encode_hook(self) -> ArrayHook | None:
        """A tree-codec hook ``(obj, path, enc) -> node | None`` for this framework's values anywhere in
        a state (arrays that are neither NumPy arrays nor handled by ``capture``), or None. Asked once
        per encoder; None while the framework is not imported."""
        ...


class BaseAdapter:
    """Defaults for an :class:`Adapter`: subclasses define ``handles``, ``kind``, ``capture`` and ``restore``."""

    def zero_copy(self, target: object) -> ZeroCopy:
        """No sharing: the restore gets fresh memory."""
        return False

    def model_weights(self, obj: object) -> bool:
        """Not model weights."""
        return False

    def encode_hook(self) -> ArrayHook | None:
        """No values of its own for the tree codec."""
        return None

    def encode_live(self, obj: object, path: Path, enc: Encoder) -> dict[str, Any] | None:
        """No fast path: the live-object hook encodes what :meth:`capture` returns. An adapter may return
        the skeleton of ``obj``'s state itself instead (the torch module adapter does, for snapshots); the
        result must be what encoding ``capture(obj)`` would give."""
        return None

    def check(self, target: object, state: object, *, where: str) -> None:
        """Raise the :class:`StateMismatchError` a strict :meth:`restore` of ``state`` into ``target`` would
        raise, changing nothing; nothing to check by default. Optional (an adapter without it is not
        checked): a strict load asks it for every item after the first before restoring any, so that a
        mismatch in a later item does not leave the earlier ones restored."""


def type_mismatch(target: object, state: object, *, where: str, strict: bool, report: LoadReport) -> None:
    """The checkpoint holds something that cannot go into ``target``: raise (strict) or report it."""
    saved, live = type(state).__name__, type(target).__name__
    message = (f"{where}: the checkpoint holds {saved}, the target is {live}; pass strict=False to load the rest "
               "(and leave this one as it is)")  # fmt: skip
    _refuse_or_report(message, (where, saved, live), strict=strict, report=report)


def _refuse_or_report(message: str, entry: tuple[str, str, str], *, strict: bool, report: LoadReport) -> None:
    """Raise :class:`StateMismatchError` with ``message`` (strict), else list ``entry`` in ``mismatched_types``."""
    if strict:
        raise StateMismatchError(message, report)
    report.mismatched_types.append(entry)


_KIND_RANK = {"b": 0, "u": 1, "i": 1, "f": 2, "c": 3}
"""How much of a value each dtype kind holds: bool < integers < floating point < complex."""


def dtype_fits(
    saved: str, live: str, saved_dtype: object, live_dtype: object, *, where: str, strict: bool, report: LoadReport
) -> bool:  # fmt: skip
    """Whether a value of dtype kind ``saved`` may be copied into a tensor or array of kind ``live``: the
    same kind or a wider one (an int into a float, a float16 into a float32, a float32 into a float16 as
    ``load_state_dict`` does). A narrower kind (a float into an int, which truncates and wraps -300.5 to
    -44 in int8; anything into a bool; a complex into a real) is raised (strict) or reported in
    ``mismatched_types``, and nothing is copied."""
    if saved == live or _KIND_RANK.get(saved, -1) <= _KIND_RANK.get(live, -2):
        return True
    saved_name, live_name = str(saved_dtype).removeprefix("torch."), str(live_dtype).removeprefix("torch.")
    message = (f"{where}: the checkpoint holds {saved_name} values and the target is {live_name}: copying would "
               "truncate or wrap them; give the target the saved dtype, or pass strict=False to leave it as it is")
    _refuse_or_report(message, (where, saved_name, live_name), strict=strict, report=report)
    return False


def _tensor_kind(tensor: Any) -> str:
    """A torch tensor's dtype kind, in NumPy's letters (``b``, ``i``, ``f``, ``c``)."""
    if tensor.dtype == _torch().bool:
        return "b"
    return "c" if tensor.is_complex() else "f" if tensor.is_floating_point() else "i"


def _torch() -> Any:
    from savegame.adapters import torch_if_imported

    return torch_if_imported()


class TorchModuleAdapter(BaseAdapter):
    """``torch.nn.Module``: its state dict (tied weights kept tied), restored strictly with a report."""

    def handles(self, obj: object) -> bool:
        torch = _torch()
        return torch is not None and isinstance(obj, torch.nn.Module)

    def kind(self, obj: object) -> str:
        return "torch.nn.Module"

    def capture(self, obj: object, where: str) -> object:
        from savegame.adapters.torch_modules import capture_module

        return capture_module(obj)  # type: ignore[arg-type]

    def encode_live(self, obj: object, path: Path, enc: Encoder) -> dict[str, Any] | None:
        """A snapshot's module state from the live tensors when ``state_dict()`` would only detach them
        (``adapters.torch_modules.encode_module``; None falls back to :meth:`capture`)."""
        from savegame.adapters.torch_modules import encode_module

        return encode_module(obj, path, enc)  # type: ignore[arg-type]

    def restore(self, target: object, state: object, *, strict: bool, where: str, report: LoadReport) -> None:
        from savegame.adapters.torch_restore import restore_module

        if not isinstance(state, Mapping):
            type_mismatch(target, state, where=where, strict=strict, report=report)
            return
        mod = restore_module(target, state, strict=strict, where=where)  # type: ignore[arg-type]
        report.missing_keys += [f"{where}.{k}" for k in mod.missing_keys]
        report.unexpected_keys += [f"{where}.{k}" for k in mod.unexpected_keys]
        report.mismatched_keys += [(f"{where}.{k}", a, b) for k, a, b in mod.mismatched_keys]
        report.loaded.append(where)

    def check(self, target: object, state: object, *, where: str) -> None:
        from savegame.adapters.torch_restore import check_module

        if not isinstance(state, Mapping):
            type_mismatch(target, state, where=where, strict=True, report=LoadReport())
        check_module(target, state, where=where)  # type: ignore[arg-type]

    def zero_copy(self, target: object) -> ZeroCopy:
        """A module copies the values into its own parameters: views of the file, no copy on our side."""
        return True

    def model_weights(self, obj: object) -> bool:
        return True


class TorchOptimizerAdapter(BaseAdapter):
    """``torch.optim.Optimizer``: its state dict, checked against the optimizer's parameter groups."""

    def handles(self, obj: object) -> bool:
        torch = _torch()
        return torch is not None and isinstance(obj, torch.optim.Optimizer)

    def kind(self, obj: object) -> str:
        return "torch.optim.Optimizer"

    def capture(self, obj: object, where: str) -> object:
        return _state_of(obj, where)

    def restore(self, target: object, state: object, *, strict: bool, where: str, report: LoadReport) -> None:
        from savegame.adapters.torch_restore import check_optimizer, restore_optimizer

        if not isinstance(state, Mapping):
            type_mismatch(target, state, where=where, strict=strict, report=report)
            return
        try:  # torch's load_state_dict takes another algorithm's groups and state of other shapes silently
            check_optimizer(target, state, where=where)  # type: ignore[arg-type]
        except StateMismatchError as exc:
            if strict:
                raise
            report.mismatched_types.append((where, "optimizer state", f"{type(target).__name__} ({exc})"))
            return  # strict=False: left as it is, reported
        restore_optimizer(target, state, where=where)  # type: ignore[arg-type]
        report.loaded.append(where)

    def check(self, target: object, state: object, *, where: str) -> None:
        from savegame.adapters.torch_restore import check_optimizer

        if not isinstance(state, Mapping):
            type_mismatch(target, state, where=where, strict=True, report=LoadReport())
        check_optimizer(target, state, where=where)  # type: ignore[arg-type]

    def zero_copy(self, target: object) -> ZeroCopy:
        """An optimizer keeps the state tensors it is given (``load_state_dict`` only casts them): aligned
        views of the copy-on-write mapping, like a safetensors load; its in-place updates then copy each
        page on first write, privately (the file never changes)."""
        return "aligned"


class TorchTensorAdapter(BaseAdapter):
    """A ``torch.Tensor``: stored as an array; restored by copying into its memory (same shape)."""

    def handles(self, obj: object) -> bool:
        torch = _torch()
        return torch is not None and isinstance(obj, torch.Tensor)

    def kind(self, obj: object) -> str:
        return "torch.Tensor"

    def capture(self, obj: object, where: str) -> None:
        return None

    def encode_hook(self) -> ArrayHook | None:
        """Tensors (zero-copy, tied ones once), dtypes, sizes and devices: ``adapters.torch.encode_hook``."""
        if _torch() is None:
            return None
        from savegame.adapters.torch import encode_hook

        return encode_hook

    def check_writable(self, target: object, *, where: str) -> None:
        """StateMismatchError unless ``target`` can take a value in place (``copy_``)."""
        from savegame.adapters.torch import unwritable_reason

        reason = unwritable_reason(target)
        if reason is not None:
            raise StateMismatchError(f"{where}: the target tensor cannot be loaded in place: {reason}", LoadReport())

    def matches(self, target: object, state: object, *, strict: bool, where: str, report: LoadReport) -> bool:
        """Whether ``state`` can be copied into ``target``: a tensor of its shape whose values its dtype
        holds (:func:`lossy_cast`); a mismatch is raised (strict) or reported, nothing is changed."""
        torch = _torch()
        if not isinstance(state, torch.Tensor):
            type_mismatch(target, state, where=where, strict=strict, report=report)
            return False
        if state.shape != target.shape:  # type: ignore[attr-defined]
            report.mismatched_keys.append((where, tuple(state.shape), tuple(target.shape)))  # type: ignore[attr-defined]
            return False
        return dtype_fits(_tensor_kind(state), _tensor_kind(target), state.dtype, target.dtype,  # type: ignore[attr-defined]
                          where=where, strict=strict, report=report)  # fmt: skip

    def copy_into(self, target: object, state: object, *, where: str, report: LoadReport) -> None:
        """Copy a matching ``state`` into ``target`` (after :meth:`matches`)."""
        with _torch().no_grad():
            target.copy_(state)  # type: ignore[attr-defined]
        report.loaded.append(where)

    def restore(self, target: object, state: object, *, strict: bool, where: str, report: LoadReport) -> None:
        if self.matches(target, state, strict=strict, where=where, report=report):
            self.copy_into(target, state, where=where, report=report)


class GeneratorAdapter(BaseAdapter):
    """Generator objects (``random.Random``, NumPy and torch generators): their state (:mod:`adapters.rng`)."""

    def handles(self, obj: object) -> bool:
        return capture_generator(obj) is not None

    def kind(self, obj: object) -> str:
        return "generator"

    def capture(self, obj: object, where: str) -> object:
        return capture_generator(obj)

    def restore(self, target: object, state: object, *, strict: bool, where: str, report: LoadReport) -> None:
        restore_generator(target, state, where)
        report.loaded.append(where)


class NumpyArrayAdapter(BaseAdapter):
    """A NumPy array: stored as an array; restored by copying into its memory (same shape)."""

    def handles(self, obj: object) -> bool:
        return isinstance(obj, np.ndarray)

    def kind(self, obj: object) -> str:
        return "numpy.ndarray"

    def capture(self, obj: object, where: str) -> None:
        return None

    def check_writable(self, target: object, *, where: str) -> None:
        """StateMismatchError for a read-only array (a view of a read-only buffer): it cannot be loaded into."""
        assert isinstance(target, np.ndarray)
        if not target.flags.writeable:
            raise StateMismatchError(
                f"{where}: the target array is read-only (flags.writeable is False), so it cannot be loaded in "
                "place; pass a writable array (np.array(x)) or leave it out of the target", LoadReport()
            )

    def matches(self, target: object, state: object, *, strict: bool, where: str, report: LoadReport) -> bool:
        """Whether ``state`` can be copied into ``target`` (as :meth:`TorchTensorAdapter.matches`)."""
        assert isinstance(target, np.ndarray)
        if not isinstance(state, np.ndarray):
            type_mismatch(target, state, where=where, strict=strict, report=report)
            return False
        if state.shape != target.shape:
            report.mismatched_keys.append((where, tuple(state.shape), tuple(target.shape)))
            return False
        return dtype_fits(state.dtype.kind, target.dtype.kind, state.dtype, target.dtype, where=where, strict=strict,
                          report=report)  # fmt: skip

    def copy_into(self, target: object, state: object, *, where: str, report: LoadReport) -> None:
        """Copy a matching ``state`` into ``target`` (after :meth:`matches`)."""
        np.copyto(target, state, casting="unsafe")  # type: ignore[arg-type]  # dtype_fits allowed it
        report.loaded.append(where)

    def restore(self, target: object, state: object, *, strict: bool, where: str, report: LoadReport) -> None:
        if self.matches(target, state, strict=strict, where=where, report=report):
            self.copy_into(target, state, where=where, report=report)


class PlainDataLoaderAdapter(BaseAdapter):
    """A plain torch ``DataLoader`` has no position to save: refused, saying to wrap it
    (``savegame.data.resumable``)."""

    def handles(self, obj: object) -> bool:
        if _torch() is None:
            return False
        from savegame.adapters.dataloader import plain_loader_message

        return plain_loader_message(obj) is not None

    def kind(self, obj: object) -> str:
        return "torch.utils.data.DataLoader"

    def capture(self, obj: object, where: str) -> object:
        from savegame.adapters.dataloader import plain_loader_message

        raise UnsupportedTypeError(f"{where}: {plain_loader_message(obj)}")

    def restore(self, target: object, state: object, *, strict: bool, where: str, report: LoadReport) -> None:
        from savegame.adapters.dataloader import plain_loader_message

        raise StateMismatchError(f"{where}: {plain_loader_message(target)}")


class StatefulAdapter(BaseAdapter):
    """Any other object with ``state_dict()`` and ``load_state_dict()`` (schedulers, scalers, samplers,
    your own classes); ``strict=`` and a keyword-only ``where=`` are passed when it takes them."""

    def handles(self, obj: object) -> bool:
        return is_stateful(obj) and not isinstance(obj, (dict, list, tuple))

    def kind(self, obj: object) -> str:
        cls = type(obj)
        return f"stateful:{cls.__module__}.{cls.__qualname__}"[:200]

    def capture(self, obj: object, where: str) -> object:
        return _state_of(obj, where)

    def restore(self, target: object, state: object, *, strict: bool, where: str, report: LoadReport) -> None:
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


def is_stateful(obj: object) -> bool:
    """Whether ``obj`` has callable ``state_dict`` and ``load_state_dict`` (the :class:`Stateful` shape)."""
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _state_of(obj: object, where: str) -> object:
    try:
        state = obj.state_dict()  # type: ignore[attr-defined]
    except Exception as exc:
        raise UnsupportedTypeError(f"{where}: {type(obj).__name__}.state_dict() failed: {exc}") from exc
    if state is obj:
        raise UnsupportedTypeError(f"{where}: state_dict() returned the object itself")
    return state


def _accepts_strict(load: Callable[..., Any]) -> bool:
    """Whether ``load_state_dict`` takes a ``strict`` keyword (``torch``-style and :class:`KerasState`)."""
    try:
        param = inspect.signature(load).parameters.get("strict")
    except (TypeError, ValueError):
        return False
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


_ADAPTERS: list[Adapter] = [
    TorchModuleAdapter(), TorchOptimizerAdapter(), TorchTensorAdapter(), GeneratorAdapter(), NumpyArrayAdapter(),
    PlainDataLoaderAdapter(), StatefulAdapter(),
]  # fmt: skip


def register(adapter: Adapter) -> None:
    """Put ``adapter`` in front of the table (it is asked before the built-in ones); registering the same
    adapter object again moves it to the front."""
    if adapter in _ADAPTERS:
        _ADAPTERS.remove(adapter)
    _ADAPTERS.insert(0, adapter)


def unregister(adapter: Adapter) -> None:
    """Take ``adapter`` out of the table (a no-op if it is not there); the built-in ones included."""
    if adapter in _ADAPTERS:
        _ADAPTERS.remove(adapter)


def adapters() -> tuple[Adapter, ...]:
    """The table, in the order it is asked."""
    return tuple(_ADAPTERS)


def encode_hooks() -> list[ArrayHook]:
    """The adapters' encode hooks, in the table's order (each once): what an encoder asks, after NumPy
    and before the live-object hook, about a value the tree codec does not know."""
    hooks: list[ArrayHook] = []
    for adapter in _ADAPTERS:
        hook = adapter.encode_hook()
        if hook is not None and hook not in hooks:
            hooks.append(hook)
    return hooks


def adapter_for(obj: object) -> Adapter | None:
    """The first adapter that handles ``obj``, or None (plain data)."""
    for adapter in _ADAPTERS:
        if adapter.handles(obj):
            return adapter
    return None
