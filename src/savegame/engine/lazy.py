"""The lazy snapshot of a background save (``snapshot="lazy"``): parameters and optimizer state are
copied during the next forward/backward, and only the next ``optimizer.step()`` waits for them.

An eager background save (the default) copies every tensor into snapshot buffers before the save call
returns. Parameters and optimizer state do not change between two ``optimizer.step()`` calls, so a
lazy save copies those (the *owned* tensors, :mod:`savegame.adapters.torch_owned`) on the snapshot
worker after the call returned, while training runs its next forward and backward; everything else
(buffers, the RNG state, plain values, bare tensor items) is still captured before the call returns.
The approach of CheckFreq's snapshot/persist split and DataStates-LLM.

Guarantees, and how they are kept:

* **The next step waits.** Each optimizer whose tensors are copied lazily gets a step pre-hook
  (``Optimizer.register_step_pre_hook``) that waits for the copies of its tensors before the step may
  change them. The hooks are removed as soon as the copies are confirmed, when the save fails, at
  ``wait()``/``close()``/interpreter exit, and in a forked child (which has no copy thread).
* **Never a torn checkpoint.** The ``_version`` counter of every lazily copied tensor is read at the save
  call; it is compared again on the training thread, once the copy is done (in the step pre-hook, in
  ``result()``/``wait()``/``close()``, or in a Checkpointer's next ``step()`` when the copies are done by
  then: :meth:`LazySnapshot.confirm_if_copied`): every in-place change the training thread made through torch
  before that point has been counted. If a counter moved, the copy may mix old and new values: the save
  fails with :class:`~savegame.errors.TornSnapshotError` naming the tensor, and is never committed.
  The persist phase writes the copied bytes as soon as the copies are done but waits for that
  confirmation before it commits (else it aborts), so a lazy save commits only after the next ``step()``
  (or a wait) of the training thread.
* **Errors surface at the next step.** A failed copy or a torn tensor is raised by the next
  ``optimizer.step()`` (through the hook; the step does not run), else by ``result()``, the next save,
  ``wait()`` or ``close()``, and only once.

Global step pre-hooks (``torch.optim.optimizer.register_optimizer_step_pre_hook``), which torch runs
before an optimizer's own, are preceded by one of savegame's while any is registered.

What version counters cannot see: writes through ``tensor.data``, NumPy views (``t.numpy()``), or
other processes/threads sharing the memory, made between the save call and the next ``step()``. What they
see too much of: parameters that are views of one flat buffer share its counter, so an optimizer stepping
some of them fails a save whose other ones another optimizer has not stepped yet (a false alarm, never a
torn commit: step every optimizer over one buffer before the next save, or stay eager). Such
code must use eager snapshots, which is why eager stays the default. Only CPU tensors over the
small-tensor limit (64 KB) are deferred: small ones are still copied in one eager batch
(:mod:`savegame.adapters.torch`), and CUDA tensors keep their (asynchronous, pinned) eager copy.
"""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, Literal

from savegame._util.copyqueue import _BATCH_BYTES, CopyQueue, snapshot_pool
from savegame.adapters import torch_if_imported
from savegame.errors import BackgroundSaveError, ConfigError, TornSnapshotError

SnapshotMode = Literal["eager", "lazy"]
SNAPSHOT_MODES = ("eager", "lazy")


def check_snapshot_mode(value: object, *, background: bool, where: str) -> SnapshotMode:
    """``value`` as a :data:`SnapshotMode`; :class:`ConfigError` for anything else, and for ``"lazy"``
    without a background save (a synchronous save copies nothing: there is nothing to defer)."""
    if value not in SNAPSHOT_MODES:
        raise ConfigError(f"{where}: snapshot must be 'eager' or 'lazy', got {value!r}")
    if value == "lazy" and not background:
        raise ConfigError(f"{where}: snapshot='lazy' needs background=True (a synchronous save takes no snapshot)")
    return "lazy" if value == "lazy" else "eager"


@dataclass
class _Copy:
    dest: Any
    src: Any
    version: int
    name: str
    nbytes: int


@dataclass
class _Group:
    """The lazily copied tensors that the same optimizers' steps change."""

    optimizers: list[Any]
    copies: list[_Copy] = field(default_factory=list)
    futures: list[Future[None]] = field(default_factory=list)
    confirmed: bool = False


def _copy_batch(batch: list[_Copy]) -> None:
    """Run on the snapshot worker: copy one batch (``Tensor.copy_`` releases the GIL)."""
    for c in batch:
        c.dest.copy_(c.src)


class LazySnapshot:
    """The deferred part of one lazy background save (see the module docstring).

    Made by :func:`lazy_snapshot` before the walk; the encoder of each module/optimizer item copies
    through :meth:`queue`, which defers owned tensors here; :meth:`start` (end of the walk) hands them
    to the snapshot worker and hooks the optimizers; :meth:`settle` (training thread) and the step
    hooks confirm them; the persist job waits in :meth:`wait_confirmed`.
    """

    def __init__(
        self, owned: Mapping[Any, Any], key_of: Callable[[object], Any], covers: Callable[[object], bool]
    ) -> None:
        self._owned = owned
        self._key_of = key_of
        self._covers = covers
        self._groups: dict[tuple[int, ...], _Group] = {}
        self._hooks: dict[int, tuple[Any, Any]] = {}  # id(optimizer) -> (optimizer, its hook's handle)
        self._stepping: Any = None  # the optimizer whose step pre-hooks are being run (training thread)
        self._lock = threading.RLock()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._raised = False
        self.on_failure: Callable[[], None] | None = None
        """Called (training thread) once a failure was found, before the step hook raises it: the save's
        handle marks it delivered so that it is not raised a second time."""

    # -- the walk (save call) ---------------------------------------------------------------------
    def queue(self, value: object, eager: CopyQueue) -> CopyQueue:
        """The copy queue for the encoder of item ``value``: lazy for modules and optimizers."""
        return _DeferringQueue(self, eager) if self._covers(value) else eager

    def defer(self, dest: Any, src: Any, nbytes: int) -> bool:
        """Take ``dest.copy_(src)`` for later if ``src`` is owned by an optimizer; else return False."""
        key = self._key_of(src)
        owned = self._owned.get(key) if key is not None else None
        if owned is None:
            return False
        optimizers = owned.optimizers
        gkey = tuple(id(o) for o in optimizers)
        group = self._groups.get(gkey)
        if group is None:
            group = self._groups[gkey] = _Group(list(optimizers))
        group.copies.append(_Copy(dest, src, int(src._version), owned.name, nbytes))
        return True

    @property
    def deferred(self) -> int:
        """How many tensors are copied lazily."""
        return sum(len(g.copies) for g in self._groups.values())

    def start(self) -> None:
        """Submit the deferred copies to the snapshot worker and hook the next step of each optimizer.

        Called once the walk succeeded, after the eager copies were queued (they go first), before the
        save call returns (so no step can run unhooked)."""
        if not self._groups:
            self._done.set()
            return
        pool = snapshot_pool()
        for group in self._groups.values():
            batch: list[_Copy] = []
            size = 0
            for c in group.copies:
                batch.append(c)
                size += c.nbytes
                if size >= _BATCH_BYTES:
                    group.futures.append(pool.submit(_copy_batch, batch))
                    batch, size = [], 0
            if batch:
                group.futures.append(pool.submit(_copy_batch, batch))
        with self._lock:
            for group in self._groups.values():
                for opt in group.optimizers:
                    if id(opt) not in self._hooks:
                        self._hooks[id(opt)] = (opt, _register_first(opt, self._before_step))
            _live.add(self)
            _run_before_global_hooks()

    def abandon(self, reason: BaseException) -> None:
        """The save failed before it was handed over: wait for any copy started, drop the hooks."""
        self._fail(BackgroundSaveError(f"lazy snapshot abandoned: {reason}"))

    # -- confirmation (training thread) -----------------------------------------------------------
    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Step pre-hook: wait for the copies of ``optimizer``'s tensors; raise a failure found."""
        self._stepping = optimizer
        try:
            self._confirm(lambda g: any(o is optimizer for o in g.optimizers))
        finally:
            self._stepping = None
        self._raise_failure()

    def settle(self, timeout: float | None = None) -> None:
        """Wait for every copy and confirm it (call on the training thread: before waiting for the save).

        ``timeout``: raise ``TimeoutError`` if the copies are not all done within it (nothing is confirmed
        or failed then: a later call or step does it)."""
        if timeout is not None:
            pending = [f for g in list(self._groups.values()) for f in list(g.futures)]
            if wait_futures(pending, timeout).not_done:
                raise TimeoutError(f"the lazy snapshot's copies were not done within {timeout} s")
        self._confirm(lambda g: True)
        sweep_hooks()

    def confirm_if_copied(self) -> None:
        """Confirm the copies now if every one is done, else do nothing (no wait; training thread).

        What polls a save (a Checkpointer's next ``step``) calls this: a save whose optimizer never steps
        again (a new optimizer took over its parameters) would otherwise stay unconfirmed, uncommitted
        and "in flight" until a wait, and ``if_busy="skip"`` skipped every save meanwhile."""
        if self._done.is_set() or not all(f.done() for g in list(self._groups.values()) for f in list(g.futures)):
            return
        self._confirm(lambda g: True)
        sweep_hooks()

    def _confirm(self, which: Callable[[_Group], bool]) -> None:
        with self._lock:
            if self._done.is_set():
                return
            for group in self._groups.values():
                if group.confirmed or not which(group):
                    continue
                try:
                    _wait_all(group.futures)
                except Exception as exc:
                    self._fail(BackgroundSaveError(f"the lazy snapshot could not copy {group.copies[0].name} or "
                                                   f"another tensor of its optimizer: {exc}"))  # fmt: skip
                    return
                changed = [c.name for c in group.copies if int(c.src._version) != c.version]
                if changed:
                    self._fail(TornSnapshotError(_torn_message(changed)))
                    return
                group.confirmed = True
                group.copies = []  # the live tensors are not needed any more
            self._unhook_confirmed()
            if all(g.confirmed for g in self._groups.values()):
                self._finish()

    def _unhook_confirmed(self) -> None:
        pending = {id(o) for g in self._groups.values() if not g.confirmed for o in g.optimizers}
        for oid in [oid for oid in self._hooks if oid not in pending]:
            self._remove_hook(*self._hooks.pop(oid))

    def _remove_hook(self, optimizer: Any, handle: Any) -> None:
        """Remove a step pre-hook; from inside that optimizer's hook loop only if it is the last hook
        there (torch iterates over the dict: removing an entry before the end breaks the loop), else at
        the next :func:`sweep_hooks` (the next lazy save, ``result()``/``wait()``/``close()``)."""
        if optimizer is self._stepping:
            hooks = optimizer._optimizer_step_pre_hooks
            if hooks and next(reversed(hooks)) != handle.id:
                _stale.append(handle)
                return
        handle.remove()

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._error = exc
            for group in self._groups.values():  # no copy may still write into buffers handed back
                try:
                    _wait_all(group.futures)
                except Exception:  # the first failure is the one reported
                    pass
            self._finish()

    def _finish(self) -> None:
        for optimizer, handle in self._hooks.values():
            self._remove_hook(optimizer, handle)
        self._hooks.clear()
        for group in self._groups.values():
            group.copies = []
        _live.discard(self)
        self._done.set()

    def _raise_failure(self) -> None:
        error = self._error
        if error is None or self._raised:
            return
        self._raised = True
        if self.on_failure is not None:
            self.on_failure()
        raise error

    # -- the persist job --------------------------------------------------------------------------
    def wait_copied(self) -> None:
        """Block the persist job until every deferred copy finished (failed or not: :meth:`wait_confirmed`
        says whether they may be committed)."""
        for group in list(self._groups.values()):
            for future in list(group.futures):
                future.exception()

    def wait_confirmed(self) -> None:
        """Block the persist job until every copy was confirmed; raise the failure if one was found."""
        self._done.wait()
        if self._error is not None:
            raise self._error

    def hooked(self) -> int:
        """How many optimizers are hooked now (0 once confirmed or failed)."""
        return len(self._hooks)

    def _forget_in_child(self) -> None:
        """After ``fork``: the child has no copy thread; never wait for it, never commit this save."""
        for _, handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._lock = threading.RLock()
        self._error = BackgroundSaveError("a lazy snapshot does not survive fork (the copy ran in the parent)")
        self._raised = True
        self._done.set()


class _DeferringQueue(CopyQueue):
    """The copy queue of a module/optimizer item's encoder: owned tensors go to the lazy snapshot, the
    rest to the save's eager queue."""

    def __init__(self, lazy: LazySnapshot, eager: CopyQueue) -> None:
        super().__init__()
        self._lazy = lazy
        self._eager = eager

    def add(self, dest: Any, src: Any, nbytes: int) -> None:
        if not self._lazy.defer(dest, src, nbytes):
            self._eager.add(dest, src, nbytes)

    def run(self, job: Callable[[], None]) -> None:
        self._eager.run(job)  # (batched copies of small tensors: eager, awaited with the save's own queue)

    def wait(self) -> None:
        self._eager.wait()


def _register_first(optimizer: Any, hook: Callable[[Any, Any, Any], None]) -> Any:
    """Register ``hook`` as ``optimizer``'s first step pre-hook; return its handle. A pre-hook is part of
    the step and may change the parameters (a weight clip): the copies must be waited for before any of
    them runs (else every lazy save of such an optimizer was torn)."""
    handle = optimizer.register_step_pre_hook(hook)
    hooks = optimizer._optimizer_step_pre_hooks
    key = getattr(handle, "id", None)
    if hasattr(hooks, "move_to_end") and key in hooks:  # an OrderedDict (torch >= 2.0)
        hooks.move_to_end(key, last=False)
    return handle


_global_handle: Any = None
"""The handle of :func:`_before_any_step` among torch's global step pre-hooks, once registered."""


def _run_before_global_hooks() -> None:
    """torch runs the global step pre-hooks (``torch.optim.optimizer.register_optimizer_step_pre_hook``)
    before an optimizer's own, so a global weight clip ran before the copies were waited for and every
    lazy save failed as torn: while any global pre-hook is registered, :func:`_before_any_step` runs first
    among them (registered once, moved to the front at each lazy save; a no-op for optimizers no lazy
    save waits for)."""
    global _global_handle
    torch = torch_if_imported()
    if torch is None:
        return
    optim = inspect.getmodule(torch.optim.Optimizer)  # torch.optim.optimizer (not an attribute of torch.optim)
    hooks = getattr(optim, "_global_optimizer_pre_hooks", None)
    if optim is None or not hooks or not hasattr(hooks, "move_to_end"):
        return  # no global pre-hook (or a torch without them): the optimizers' own first hooks suffice
    if _global_handle is None or _global_handle.id not in hooks:
        _global_handle = optim.register_optimizer_step_pre_hook(_before_any_step)
    if next(iter(hooks)) != _global_handle.id:
        hooks.move_to_end(_global_handle.id, last=False)


def _before_any_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    """Global step pre-hook: what the optimizer's own savegame hook does, before the other global hooks."""
    for snapshot in list(_live):
        if id(optimizer) in snapshot._hooks:
            snapshot._before_step(optimizer, args, kwargs)


def _wait_all(futures: list[Future[None]]) -> None:
    first: BaseException | None = None
    for future in futures:
        try:
            future.result()
        except BaseException as exc:  # raised below, once no copy of the group runs any more
            first = first or exc
    if first is not None:
        raise first


def _torn_message(changed: list[str]) -> str:
    shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    return (
        f"lazy snapshot torn: {shown} changed in place outside optimizer.step() (of the optimizers in the saved "
        "state) before its copy was confirmed, so the copy may mix old and new values; this save was not "
        "committed (earlier checkpoints are unchanged). Do not modify parameters or optimizer state between the "
        "save and the next optimizer.step(), nor step another optimizer over them, or use snapshot='eager'"
    )


def lazy_snapshot(state: Mapping[str, Any]) -> LazySnapshot | None:
    """The lazy part of a save of ``state``, or None when nothing can be deferred (no torch, no optimizer)."""
    if torch_if_imported() is None:
        return None
    from savegame.adapters.torch_owned import lazy_item, optimizer_owned, tensor_key

    sweep_hooks()
    owned = optimizer_owned(state)
    if not owned:
        return None
    return LazySnapshot(owned, tensor_key, lazy_item)


_live: set[LazySnapshot] = set()
"""Lazy snapshots whose hooks are installed (forgotten in a forked child, see below)."""
_stale: list[Any] = []
"""Handles of finished hooks that could not be removed from inside their optimizer's hook loop (another
pre-hook came after them); they do nothing any more and are removed by :func:`sweep_hooks`."""


def sweep_hooks() -> None:
    """Remove the finished hooks left in :data:`_stale` (call outside any ``optimizer.step()``)."""
    while _stale:
        _stale.pop().remove()


def _forget_after_fork() -> None:
    for snapshot in list(_live):
        snapshot._forget_in_child()
    _live.clear()
    sweep_hooks()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
