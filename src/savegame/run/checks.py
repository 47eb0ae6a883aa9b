"""Checks of what a caller hands the Checkpointer that need more than a type check: a run root that is
really a checkpoint or a ``latest``/``best`` alias (:func:`check_run_root`, refused before anything is
written there), and epochs whose ``step()`` calls never carried the monitored metric
(:class:`UnjudgedEpochs`, warned once). Moved here verbatim from :mod:`savegame.run.checkpointer`, which
re-exports ``check_run_root``.
"""

from __future__ import annotations

import os

from savegame._util.logs import warn
from savegame.errors import ConfigError
from savegame.run.index import ALIASES
from savegame.storage import LocalStorage, is_url, path_text
from savegame.storage.base import MANIFEST

__all__ = ["UnjudgedEpochs", "check_run_root"]


def check_run_root(directory: str | os.PathLike[str]) -> None:
    """Refuse a local path that is a checkpoint, or a ``latest``/``best`` alias of a root, as a
    Checkpointer directory, before anything is written there (ConfigError naming the run root).

    A committed checkpoint is read with ``savegame.load``; a Checkpointer there would find no
    checkpoints in it (``restore`` returning None) and write its lock file into the checkpoint.
    ``ROOT/best`` would become a real directory that hides the alias from ``savegame`` commands.
    """
    if isinstance(directory, str) and is_url(directory):
        return
    path = os.path.abspath(path_text(directory, "Checkpointer: the checkpoint directory"))
    parent, base = os.path.split(path)
    if os.path.isfile(os.path.join(path, MANIFEST)):
        raise ConfigError(
            f"Checkpointer: {path} is a checkpoint, not a directory of checkpoints; pass its run root "
            f"{parent} (Checkpointer({parent!r}).restore(state, which={base!r}) loads this one, "
            "savegame.load() reads it directly)"
        )
    if base in ALIASES and os.path.isdir(parent) and LocalStorage(parent, create=False).committed():
        if not os.path.isdir(path) or not LocalStorage(path, create=False).committed():
            raise ConfigError(
                f"Checkpointer: {path} names the {base!r} checkpoint of the run root {parent}, not a "
                f"directory of checkpoints; pass Checkpointer({parent!r}) and restore(state, which={base!r})"
            )


class UnjudgedEpochs:
    """Warns once when a whole epoch went by without the monitored metric in any ``step()`` call.

    Calls without ``metrics=`` are per-batch calls and do not judge improvement; so an epoch-end call
    that forgets ``metrics=`` would make save-on-improvement silently never fire. Calls are grouped by
    their ``epoch`` value (the per-batch calls of epoch e and the end call of epoch e-1, or of e, share
    one value whichever way the loop counts); leaving a group in which no call carried the metric warns.
    The first group seen is exempt: it may hold only per-batch calls (the first epoch, or after a resume).
    """

    def __init__(self) -> None:
        self._epoch: int | None = None
        self._judged = False
        self._first = True
        self._warned = False

    def note(self, epoch: int, *, judged: bool, monitor: str) -> None:
        if epoch != self._epoch:
            if self._epoch is not None and not self._judged and not self._first and not self._warned:
                self._warned = True
                warn(
                    f"Checkpointer.step: no call with epoch={self._epoch} passed metrics= with {monitor!r}, so "
                    f"improvement of monitor={monitor!r} was not judged for that epoch (calls without metrics= "
                    "count as per-batch calls); pass metrics={...} at the end of each epoch",
                    UserWarning, stacklevel=4,
                )  # fmt: skip
            self._first = self._epoch is None
            self._epoch, self._judged = epoch, False
        self._judged = self._judged or judged
