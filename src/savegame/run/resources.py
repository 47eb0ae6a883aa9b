"""What an open Checkpointer holds and must give back, in one place: the directory's writer lock, the
mirror's background uploader and the preemption signal handlers.

:func:`acquire` takes them at construction (and gives back whatever it took if a later one fails:
a Checkpointer whose constructor raised holds nothing); :func:`release` gives them back at ``close()``
(the mirror's uploads are finished first, the handlers restored on the main thread, the lock released
last, whatever failed before). Both take the :class:`~savegame.run.checkpointer.Checkpointer` they
serve, like the other modules of the run layer.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from savegame._util.logs import get_logger
from savegame.errors import CheckpointError, ConfigError
from savegame.run.lock import ProcessShare
from savegame.run.preemption import install_preemption

if TYPE_CHECKING:
    from savegame.run.checkpointer import Checkpointer

log = get_logger("savegame.run.checkpointer")


def acquire(ckpt: Checkpointer) -> None:
    """Take the writer lock (local directory, rank 0, ``lock=True``), clean up dead writers' leftovers
    (the directory's owner), start the mirror (rank 0) and install the signal handlers, as
    ``ckpt.options`` say."""
    options = ckpt.options
    mirror = options.mirror
    if mirror is not None and not ckpt.local:
        raise ConfigError("Checkpointer: mirror= needs a local directory (it mirrors local checkpoints to a URL)")
    try:
        if options.lock and ckpt.local and ckpt._coord.is_coordinator:
            ckpt._lock = ProcessShare(ckpt.directory)
        if ckpt._owner:
            ckpt._clean_up()
        if mirror is not None and ckpt._coord.is_coordinator:
            from savegame.engine.mirror import Mirror

            ckpt._mirror = Mirror(ckpt.directory, mirror, storage_options=options.mirror_options).start()
        ckpt._preemption = install_preemption(
            options.save_on_signal, action=options.signal_action, exit_code=options.signal_exit_code
        )
    except BaseException:
        release(ckpt)
        raise


def release(ckpt: Checkpointer) -> None:
    """Finish the mirror's uploads, restore the signal handlers, give the writer lock back."""
    mirror, ckpt._mirror = ckpt._mirror, None
    handler, ckpt._preemption = ckpt._preemption, None
    lock, ckpt._lock = ckpt._lock, None
    try:
        if mirror is not None:
            mirror.close(wait=True)
    except (CheckpointError, OSError) as exc:
        log.warning("Checkpointer(%s): the mirror did not finish: %s", ckpt.directory, exc)
    finally:
        try:
            if handler is not None and threading.current_thread() is threading.main_thread():
                handler.close()
        finally:
            if lock is not None:
                lock.release()
