"""What happened in a Checkpointer's run, as events: the infos (frozen values), the INFO log line of
each, and the dispatcher that hands them to the user's callbacks (``Checkpointer(callbacks=[...])``).

The public face is :mod:`savegame.events` (the protocol, the built-in TensorBoard / MLflow / W&B
loggers); this module is the part the run layer needs (``saving``, ``retention``, ``resume``,
``preemption`` emit through :class:`EventDispatcher`), so it imports nothing above the run layer.

Rules the dispatcher keeps (documented for users in docs/events.md):

* **Which hooks**: a callback is any object; a hook it does not define is skipped, so a callback only
  needs the methods it uses. An object that defines none of :data:`HOOKS` is refused at construction
  (a misspelt hook would otherwise never be called).
* **When and on which thread**: every hook runs on the thread that called the Checkpointer (the
  training thread), synchronously, inside the call that observed the event. A background save commits
  on the writer thread, but its ``on_save_committed`` is delivered by the next Checkpointer call on the
  training thread (the next ``step``, ``save``, ``wait``, ``restore`` or ``close``; ``step`` checks at
  every call), with the durable time measured on the writer thread when the commit finished. Callbacks
  therefore need no locking, and a slow callback delays training, not the writer.
* **A failing callback**: an exception (``Exception``, not ``KeyboardInterrupt``/``SystemExit``) raised
  by a hook is logged at ERROR level with its traceback (logger ``savegame.events``: shown on stderr
  even when logging is not configured) and kept in :attr:`EventDispatcher.failures`; the other
  callbacks still get the event and the save goes on. It is never re-raised: hooks run around the
  save, most of them after its commit, and a logger that is down must neither lose a checkpoint nor
  end a training run whose checkpoint is safe on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from savegame._util.logs import get_logger
from savegame.errors import ConfigError

__all__ = [
    "HOOKS",
    "CallbackFailure",
    "DeletedInfo",
    "EventDispatcher",
    "PreemptionInfo",
    "QuarantinedInfo",
    "RestoredInfo",
    "SaveCommittedInfo",
    "SaveFailedInfo",
    "SaveStartedInfo",
    "describe",
    "frozen_metrics",
]

log = get_logger("savegame.run.checkpointer")
"""The logger of the event lines (the Checkpointer's own)."""
callback_log = get_logger("savegame.events")
"""The logger of failing callbacks."""


@dataclass(frozen=True)
class SaveStartedInfo:
    """A save begins (``name`` is the name it is written under unless another writer takes it)."""

    name: str
    path: str
    epoch: int | None
    step: int | None
    background: bool


@dataclass(frozen=True)
class SaveCommittedInfo:
    """A save is committed and durable.

    ``bytes``: the data files' size. ``linked_bytes``: the part of ``bytes`` an incremental save
    (``Checkpointer(incremental=True)``) shared with an earlier checkpoint by hard link or server-side
    copy instead of writing it (0 for a full save); ``bytes - linked_bytes`` is what this save wrote.
    ``blocking_seconds``: how long the save call blocked training
    (for a background save: waiting for the previous save, the host snapshot). ``durable_seconds``:
    from the start of the save call until the commit was durable (for a background save: measured on
    the writer thread). ``throughput``: bytes written (``bytes - linked_bytes``) per second of
    ``durable_seconds``.
    """

    name: str
    path: str
    epoch: int | None
    step: int | None
    metrics: Mapping[str, float]
    bytes: int
    blocking_seconds: float
    durable_seconds: float
    throughput: float
    is_best: bool
    background: bool
    linked_bytes: int = 0


@dataclass(frozen=True)
class SaveFailedInfo:
    """A save failed: nothing was committed under ``name``; earlier checkpoints are unchanged."""

    name: str | None
    path: str | None
    epoch: int | None
    step: int | None
    error: BaseException
    background: bool


@dataclass(frozen=True)
class DeletedInfo:
    """Retention deleted a checkpoint (after a newer one was committed, or by ``prune``)."""

    name: str
    path: str
    reason: str = "retention"


@dataclass(frozen=True)
class QuarantinedInfo:
    """A damaged checkpoint was found while resuming: moved aside (never deleted) to the folder
    ``moved_to`` of the checkpoint directory (``.quarantine-NAME-...``), or skipped and left in place
    (``moved_to`` None: a Checkpointer without the writer lock, or the move failed)."""

    name: str
    moved_to: str | None
    error: str


@dataclass(frozen=True)
class RestoredInfo:
    """A checkpoint was loaded into the live state in ``seconds`` (verification included)."""

    name: str
    path: str
    epoch: int | None
    step: int | None
    seconds: float
    quarantined: tuple[str, ...] = ()


@dataclass(frozen=True)
class PreemptionInfo:
    """A preemption signal arrived and checkpoint ``name`` is durable: ``save_seconds`` for the save and
    the wait, ``since_signal`` from the signal to durable (None when the signal came on another rank)."""

    signal: str
    name: str
    path: str
    save_seconds: float
    since_signal: float | None


HOOKS: dict[str, type] = {
    "on_save_started": SaveStartedInfo,
    "on_save_committed": SaveCommittedInfo,
    "on_save_failed": SaveFailedInfo,
    "on_deleted": DeletedInfo,
    "on_quarantined": QuarantinedInfo,
    "on_restored": RestoredInfo,
    "on_preemption_saved": PreemptionInfo,
}
"""The hooks a callback may define, and the info each receives."""


@dataclass(frozen=True)
class CallbackFailure:
    """A hook that raised: which callback, which hook, the info it was given and the exception."""

    callback: object
    hook: str
    info: object
    error: Exception


def _rate(bytes_per_second: float) -> str:
    return f"{bytes_per_second / 1e6:.1f} MB/s"


def describe(info: object) -> str:
    """The log line of an event (the same data the hooks receive, one format)."""
    if isinstance(info, SaveCommittedInfo):
        linked = f" ({info.linked_bytes} of them linked, not written)" if info.linked_bytes else ""
        return (f"saved checkpoint {info.path}{' (best)' if info.is_best else ''}: {info.bytes} bytes{linked}, "
                f"training blocked {info.blocking_seconds:.3f} s, durable after {info.durable_seconds:.3f} s "
                f"({_rate(info.throughput)})")  # fmt: skip
    if isinstance(info, SaveStartedInfo):
        return f"saving checkpoint {info.path}{' in the background' if info.background else ''}"
    if isinstance(info, SaveFailedInfo):
        return f"saving checkpoint {info.path or '(unnamed)'} failed: {info.error}"
    if isinstance(info, DeletedInfo):
        return f"{info.reason} deleted checkpoint {info.name}"
    if isinstance(info, QuarantinedInfo):
        where = f"moved to {info.moved_to}" if info.moved_to is not None else "skipped, left in place"
        return f"checkpoint {info.name} is damaged ({where}): {info.error}"
    if isinstance(info, RestoredInfo):
        return f"restored checkpoint {info.path} (epoch={info.epoch}, step={info.step}) in {info.seconds:.3f} s"
    if isinstance(info, PreemptionInfo):
        since = info.since_signal if info.since_signal is not None else info.save_seconds
        return (f"savegame: {info.signal} received; checkpoint {info.name} durable {since:.2f} s later "
                f"(save and wait: {info.save_seconds:.2f} s)")  # fmt: skip
    return repr(info)


_LEVELS = {"on_save_started": logging.DEBUG, "on_save_failed": logging.ERROR, "on_quarantined": logging.WARNING,
           "on_preemption_saved": logging.WARNING}  # fmt: skip


def _defined_hooks(callback: object) -> list[str]:
    hooks = []
    for hook in HOOKS:
        method = getattr(callback, hook, None)
        if method is None:
            continue
        if not callable(method):
            raise ConfigError(f"Checkpointer(callbacks=...): {type(callback).__name__}.{hook} is not callable")
        hooks.append(hook)
    return hooks


@dataclass
class EventDispatcher:
    """Logs each event and calls the hooks of the callbacks that define it (see the module docstring)."""

    callbacks: tuple[object, ...] = ()
    failures: list[CallbackFailure] = field(default_factory=list)
    """Every hook call that raised, oldest first."""

    @classmethod
    def of(cls, callbacks: Iterable[object] | None) -> EventDispatcher:
        """A dispatcher for ``callbacks``; :class:`ConfigError` for one that defines no hook."""
        if callbacks is None:
            return cls()
        if isinstance(callbacks, (str, bytes, Mapping)) or not isinstance(callbacks, Iterable):
            raise ConfigError(
                f"Checkpointer: callbacks must be a list of callback objects, got {type(callbacks).__name__}"
            )
        chosen = tuple(callbacks)
        for callback in chosen:
            if not _defined_hooks(callback):
                raise ConfigError(
                    f"Checkpointer(callbacks=...): {type(callback).__name__} defines none of the hooks "
                    f"{', '.join(HOOKS)} (see savegame.events); is one misspelt?"
                )
        return cls(chosen)

    def emit(self, hook: str, info: object, *, log_line: bool = True) -> None:
        """Log ``info`` (unless ``log_line`` is False: the caller logged it) and call ``hook`` of every
        callback that has it; a hook's exception is logged and recorded, never raised."""
        assert isinstance(info, HOOKS[hook]), (hook, info)
        if log_line:
            log.log(_LEVELS.get(hook, logging.INFO), "%s", describe(info))
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is None:
                continue
            try:
                method(info)
            except Exception as exc:
                self.failures.append(CallbackFailure(callback, hook, info, exc))
                callback_log.error(
                    "savegame: callback %s.%s raised (ignored: the checkpoint is not affected and training "
                    "goes on): %s: %s", type(callback).__name__, hook, type(exc).__name__, exc, exc_info=exc,
                )  # fmt: skip


def frozen_metrics(metrics: Mapping[str, float]) -> Mapping[str, float]:
    """A read-only copy of ``metrics`` for an info."""
    return MappingProxyType(dict(metrics))
