"""Which checkpoint an incremental save of a Checkpointer links from (``Checkpointer(incremental=True)``).

The base is the newest committed checkpoint of the Checkpointer's own run, as its :class:`RunIndex` knows
it (its manifest as written or read); :mod:`savegame.engine.incremental` checks again, at link time, that
it is still committed with that manifest and verifies every file it links. The first save of a run (or
one after the base was deleted or damaged) is written in full and records the hashes the next one uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from savegame.engine.incremental import Base, Incremental

if TYPE_CHECKING:
    from savegame.run.checkpointer import Checkpointer

__all__ = ["incremental_for"]


def incremental_for(ckpt: Checkpointer) -> Incremental | None:
    """What the next save of ``ckpt`` passes as ``incremental=`` (None when it is not incremental)."""
    if not ckpt.incremental:
        return None
    entries = ckpt._index.run_entries(ckpt.run_id)
    if not entries:
        return Incremental()
    newest = entries[-1]
    return Incremental(Base(ckpt.storage, newest.name, newest.manifest))
