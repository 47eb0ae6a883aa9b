"""The one rule deciding whether an unfinished write may still belong to a running writer.

Used by everything that removes the debris of interrupted saves: :meth:`LocalStorage.cleanup` (the
``.staging-HOST-PID-ID`` folders; the Checkpointer runs it when it opens a directory), ``savegame gc``
(its plan, through :func:`savegame.storage.local.staging_is_live`) and :meth:`RemoteStorage.cleanup`
(version folders with a ``.staging`` marker, or none). Before, local cleanup waited a day for another
host's staging folder and remote cleanup an hour; the longer, safer wait now applies to both (an
unfinished write of a live writer on another host is never removed while it may still be written).

The rule: a writer on this host is live while its process runs; a writer elsewhere (its process cannot
be checked from here) while its last sign of life (a heartbeat, the folder's or newest object's time)
is younger than the grace period, :data:`FOREIGN_WRITER_GRACE_SECONDS` unless a storage is configured
otherwise (``RemoteStorage(grace_seconds=...)``).
"""

from __future__ import annotations

import os
import socket
import time

from savegame._util.processes import pid_alive

__all__ = ["FOREIGN_WRITER_GRACE_SECONDS", "writer_is_live"]

FOREIGN_WRITER_GRACE_SECONDS = 24 * 3600.0
"""How long an unfinished write of another host (or of an unknown writer) is kept after its last sign
of life: a day, so a slow save over a shared filesystem or object store is never cut short."""


def writer_is_live(
    *,
    host: object,
    pid: object,
    touched: float | None,
    grace: float = FOREIGN_WRITER_GRACE_SECONDS,
    now: float | None = None,
    this_process: bool = True,
) -> bool:
    """Whether the writer of an unfinished write may still be running (see the module docstring).

    ``host`` / ``pid``: the writer as its folder or marker names it (None or malformed: unknown);
    ``touched``: unix time of its last sign of life (None: none known); ``this_process``: whether a
    write named by this very process counts as live (another thread's save, for local staging
    folders; a remote storage knows its own live uploads by owner and passes False).
    """
    if host == socket.gethostname() and isinstance(pid, int) and not isinstance(pid, bool):
        if pid == os.getpid():
            return this_process
        return pid_alive(pid)
    if touched is None:
        return False
    return (time.time() if now is None else now) - touched < grace
