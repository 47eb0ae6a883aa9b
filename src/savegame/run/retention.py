"""Retention for a Checkpointer: which of its checkpoints the keep policy deletes now (planned by
:meth:`savegame.run.index.RunIndex.doomed`, the one rule shared with ``savegame prune``), deleting them
(a failed deletion warns and keeps the checkpoint), and applying it after each commit on the
coordinating rank only (:func:`retain`), with the mirror told.

The functions take the :class:`~savegame.run.checkpointer.Checkpointer` whose checkpoints they thin out;
moved here verbatim from its methods.

Guarantees: a checkpoint is deleted only after a newer one was committed; the newest committed
checkpoint, the best one, the best recorded by any run's manifests and pinned ones are never deleted
by retention, nor anything while a ``KeepBest`` of the keep policy ranks by a metric no checkpoint
recorded (a typo: :func:`prune` raises, retention after a commit warns once); checkpoints the
Checkpointer did not write (no ``progress.checkpointer``) or another run wrote are never deleted; an
existing name is never overwritten (``-v1``, ``-v2``, ... are appended instead).
"""

from __future__ import annotations

import builtins
import weakref
from typing import TYPE_CHECKING

from savegame._util.logs import get_logger, warn
from savegame.errors import CheckpointError, ConfigError
from savegame.policies.keep import monitors_of
from savegame.run.events import DeletedInfo

if TYPE_CHECKING:
    from savegame.run.checkpointer import Checkpointer

__all__ = ["apply_retention", "doomed_names", "retain"]

log = get_logger("savegame.run.checkpointer")
_warned: weakref.WeakKeyDictionary[Checkpointer, set[str]] = weakref.WeakKeyDictionary()
"""The unrecorded keep-policy metrics each Checkpointer warned about (once each)."""


def doomed_names(ckpt: Checkpointer, *, all_runs: bool = False) -> builtins.list[str]:
    """Names retention would delete now (:meth:`RunIndex.doomed`): the keep policy applied to this
    run's checkpoints, or to each run's separately (``all_runs``), this run's best kept too."""
    return ckpt._index.doomed(ckpt.keep_policy, run=None if all_runs else ckpt.run_id,
                              best=ckpt._best.name if ckpt._best is not None else None,
                              monitor=ckpt.monitor, mode=ckpt.mode, now=ckpt._wall_clock())  # fmt: skip


def unrecorded_keep_monitors(ckpt: Checkpointer, *, all_runs: bool = False) -> builtins.list[ConfigError]:
    """The error for each metric a ``KeepBest`` of the keep policy ranks by that none of the checkpoints
    retention looks at recorded (a typo such as ``KeepBest(3, "val_los")``, or a metric not reported yet):
    ranking by it keeps nothing, and the policy's other parts would delete the real best."""
    errors = []
    for monitor in dict.fromkeys(monitors_of(ckpt.keep_policy)):
        try:
            ckpt._index.check_monitor_recorded(monitor, run=None if all_runs else ckpt.run_id,
                                               where=f"Checkpointer({ckpt.directory!r}) keep policy")  # fmt: skip
        except ConfigError as exc:
            errors.append(exc)
    return errors


def apply_retention(ckpt: Checkpointer, *, dry_run: bool, all_runs: bool = False) -> builtins.list[str]:
    unrecorded = unrecorded_keep_monitors(ckpt, all_runs=all_runs)
    if unrecorded:  # nothing is deleted by a ranking that cannot rank (after each commit: say so once)
        said = _warned.setdefault(ckpt, set())
        for exc in unrecorded:
            if str(exc) not in said:
                said.add(str(exc))
                message = f"retention deletes nothing until the metric is recorded: {exc}"
                log.warning(message)
                warn(message, stacklevel=3)
        return []
    doomed = doomed_names(ckpt, all_runs=all_runs)
    if dry_run:
        return doomed
    deleted = []
    for name in doomed:
        try:
            ckpt.storage.delete(name)
        except (CheckpointError, OSError) as exc:
            message = f"retention could not delete checkpoint {name}: {exc}"
            log.warning(message)
            warn(message, stacklevel=3)
            continue
        ckpt._index.note_gone(name)
        deleted.append(name)
        ckpt._events.emit("on_deleted", DeletedInfo(name, ckpt.storage.path(name)))
    return deleted


def retain(ckpt: Checkpointer) -> builtins.list[str]:
    """Apply retention after a commit, on the coordinating rank only; every rank forgets what went."""
    deleted: builtins.list[str] = ckpt._coord.on_coordinator(lambda: apply_retention(ckpt, dry_run=False))
    for name in deleted:
        ckpt._index.note_gone(name)
    if deleted and ckpt._mirror is not None:
        ckpt._mirror.notify()
    return deleted


def prune(ckpt: Checkpointer, *, dry_run: bool, all_runs: bool) -> list[str]:
    """:meth:`Checkpointer.prune` once the save in flight settled and the index is fresh: check that the
    monitor was recorded (deleting nothing otherwise), apply the keep policy on rank 0, and tell the
    index what went."""
    ckpt._index.check_monitor_recorded(ckpt.monitor, run=None if all_runs else ckpt.run_id,
                                       where=f"Checkpointer({ckpt.directory!r})")  # fmt: skip
    unrecorded = unrecorded_keep_monitors(ckpt, all_runs=all_runs)
    if unrecorded:
        raise unrecorded[0]
    names: list[str] = ckpt._coord.on_coordinator(lambda: apply_retention(ckpt, dry_run=dry_run, all_runs=all_runs))
    if not dry_run:
        for name in names:
            ckpt._index.note_gone(name)
    return names
