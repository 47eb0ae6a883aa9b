"""Writing one local checkpoint: file sinks, the staging directory's transaction, commit by rename.

:class:`LocalFileSink` writes one file with large ``write`` calls and makes it durable on ``close``;
:class:`LocalTransaction` is a checkpoint being written into ``ROOT/.staging-...``: it writes the
manifest last, fsyncs the staging directory, publishes it by rename (or an atomic swap to overwrite,
refusing anything but a checkpoint: :mod:`savegame.storage.local.occupancy`) and fsyncs the root
(the protocol step by step: :mod:`savegame.storage.local`); :class:`JoinedTransaction` is another
process's share of it (multi-process saves). :class:`~savegame.storage.local.root.LocalStorage` makes
them (``begin``, ``join``); the engine's write loop (:mod:`savegame.engine.write_loop`) writes through
their sinks.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from savegame._util.logs import get_logger
from savegame.errors import CommitError, InvalidNameError, OccupiedPathError
from savegame.format.naming import check_checkpoint_name
from savegame.storage.base import MANIFEST, TRASH_PREFIX
from savegame.storage.local import direct
from savegame.storage.local.occupancy import (
    CHECKPOINT,
    check_save_target,
    foreign_files_error,
    occupant,
    occupied_error,
    unaccounted,
)
from savegame.storage.local.ops import FileOps, _io_error

if TYPE_CHECKING:
    from savegame.storage.local.root import LocalStorage

log = get_logger("savegame")


class LocalFileSink:
    """An unbuffered file written with large ``write`` calls and made durable by ``close``.

    Once :data:`~savegame.storage.local.direct.DIRECT_FROM_BYTES` went to it (and ``ops.direct_io``), the
    rest bypasses the page cache (:mod:`savegame.storage.local.direct`).

    ``close`` may be called from several threads (the writer fsyncs finished files on a worker while the
    commit waits for them): the first call fsyncs and closes, every later one waits for it to finish and
    raises its error, if any (a failed fsync is never retried: its data may be lost).
    """

    def __init__(self, path: str, ops: FileOps) -> None:
        self.path = path
        self._ops = ops
        self._fd: int | None = ops.open_new(path)
        self.bytes_written = 0
        self._direct: direct.DirectStager | None = None
        self._may_go_direct = ops.direct_io
        self._close_lock = threading.Lock()
        self._closed = False
        self._close_error: BaseException | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        assert self._fd is not None, "write after close"
        view = memoryview(data).cast("B") if not isinstance(data, memoryview) or data.format != "B" else data
        total = len(view)
        if self._direct is None and self._may_go_direct and self.bytes_written + total >= direct.DIRECT_FROM_BYTES:
            view = self._go_direct(view)
        if self._direct is not None:
            self._direct.write(view)
        else:
            self._write_all(view)
        self.bytes_written += total
        return total

    def _write_all(self, view: memoryview) -> None:
        assert self._fd is not None
        done, total = 0, len(view)
        while done < total:
            n = self._ops.write(self._fd, view[done:])
            if n <= 0:
                raise OSError(errno.EIO, "write returned 0", self.path)
            done += n

    def _go_direct(self, view: memoryview) -> memoryview:
        """Write the head of ``view`` that aligns the file position, turn direct I/O on; return the rest
        (written buffered by the caller when the filesystem is not suited or refuses direct I/O)."""
        assert self._fd is not None
        self._may_go_direct = False
        head = -self.bytes_written % direct.BLOCK
        if head >= len(view):
            self._may_go_direct = True  # not aligned yet: try again with the next write
            return view
        if head:
            self._write_all(view[:head])
        if direct.suits(self._fd) and self._ops.set_direct(self._fd, True):
            self._direct = direct.DirectStager(self._fd, self._ops, self.path)
        return view[head:]

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                if self._close_error is not None:
                    raise self._close_error
                return
            self._closed = True
            fd, self._fd = self._fd, None
            if fd is None:
                return
            try:
                try:
                    if self._direct is not None:
                        stager, self._direct = self._direct, None
                        stager.finish(self.bytes_written)
                    self._ops.fsync(fd)
                finally:
                    self._ops.close(fd)
            except BaseException as exc:
                self._close_error = exc
                raise

    def discard(self) -> None:
        """Close without fsync (after an error); a close running on another thread is waited for."""
        with self._close_lock:
            self._closed = True
            if self._direct is not None:
                stager, self._direct = self._direct, None
                stager.abandon()
            if self._fd is not None:
                fd, self._fd = self._fd, None
                try:
                    os.close(fd)
                except OSError:
                    pass


class _StagingFiles:
    """What both kinds of transaction on a staging directory do alike: name it to other processes, and
    open the data files in it (the manifest is the committing process's, never opened)."""

    storage: LocalStorage
    staging: str
    _sinks: list[LocalFileSink]
    _manifest_writer = "commit()"

    @property
    def token(self) -> str:
        """Names this transaction to other processes that write into it (:meth:`LocalStorage.join`)."""
        return os.path.basename(self.staging)

    def open(self, file: str) -> LocalFileSink:
        check_checkpoint_name(file)
        if file == MANIFEST:
            raise InvalidNameError(f"{MANIFEST} is written by {self._manifest_writer}, not open()")
        try:
            sink = LocalFileSink(os.path.join(self.staging, file), self.storage.ops)
        except OSError as exc:
            raise _io_error(exc, f"cannot create {file} in {self.staging}") from exc
        self._sinks.append(sink)
        return sink


@dataclass
class LocalTransaction(_StagingFiles):
    """A checkpoint being written into a staging directory (the commit protocol: :mod:`savegame.storage.local`)."""

    storage: LocalStorage
    name: str
    staging: str
    overwrite: bool
    _sinks: list[LocalFileSink] = field(default_factory=list)
    _done: bool = False

    def link(
        self, file: str, *, source_checkpoint: str, source_file: str, identity: tuple[int, int] | None = None
    ) -> bool:
        """Hard-link data file ``source_file`` of committed checkpoint ``source_checkpoint`` as ``file``
        (the commit's fsync of the staging directory makes the new entry durable; the data already is).
        False when the system refuses (another filesystem, no hard links, too many links...): the caller
        writes the bytes instead. Only a regular file inside a checkpoint of this root is linked.
        ``identity``: the ``(st_dev, st_ino)`` of the file the caller verified; if the link is another
        file (the checkpoint was overwritten meanwhile: the name now holds other bytes), it is removed
        again and False returned."""
        check_checkpoint_name(file)
        check_checkpoint_name(source_checkpoint)
        check_checkpoint_name(source_file)
        if MANIFEST in (file, source_file):
            raise InvalidNameError(f"{MANIFEST} is never linked")
        source = os.path.join(self.storage.root, source_checkpoint, source_file)
        try:
            if not stat.S_ISREG(os.lstat(source).st_mode):
                return False
            dest = os.path.join(self.staging, file)
            self.storage.ops.link(source, dest)
            if identity is not None:
                st = os.lstat(dest)
                if (st.st_dev, st.st_ino) != identity:
                    os.unlink(dest)
                    log.info("%s changed since it was verified (overwritten?); writing it instead", source)
                    return False
        except OSError as exc:
            log.info("cannot hard-link %s into %s (%s); writing it instead", source, self.staging, exc)
            return False
        return True

    def commit(self, manifest: bytes) -> str:
        """Write the manifest, make everything durable and publish; return the final path.

        The root directory is fsynced after the rename and *before* an overwritten version is removed: if
        that fsync fails the rename is undone (the old version, if any, is put back), so a failed commit
        leaves nothing new visible, as the error says. Should the undo itself fail, the error says so.
        """
        ops = self.storage.ops
        final = os.path.join(self.storage.root, self.name)
        try:
            # The manifest is fsynced while data files still being fsynced on the writer's workers finish
            # (their close() below waits for those): on a journaling filesystem the flushes then share
            # commits. Order within the staging directory does not matter: only the rename publishes.
            manifest_sink = LocalFileSink(os.path.join(self.staging, MANIFEST), ops)
            self._sinks.append(manifest_sink)
            manifest_sink.write(manifest)
            manifest_sink.close()
            for sink in self._sinks:
                sink.close()
            ops.fsync_dir(self.staging)
            old = self._publish(final)
        except OccupiedPathError:
            self.abort()
            raise
        except OSError as exc:
            self.abort()
            raise CommitError(
                exc.errno, f"saving {final} failed, nothing was published: {exc.strerror or exc}"
            ) from exc
        except BaseException:
            self.abort()
            raise
        try:
            ops.fsync_dir(self.storage.root)
        except OSError as exc:
            raise self._unpublish(final, old, exc) from exc
        except BaseException:
            self._unpublish(final, old, None)
            raise
        self._done = True
        if old is not None:
            ops.rmtree(old)  # the overwritten version, moved aside; a crash here leaves debris for cleanup()
        return final

    def finish(self) -> None:
        """Nothing to release: :meth:`commit` and :meth:`abort` end the transaction."""
        return None

    def _publish(self, final: str) -> str | None:
        """Make the staging directory visible as ``final``; return where the overwritten version now is.

        Only nothing, an empty directory or (with ``overwrite``) a committed checkpoint is replaced
        (:func:`check_save_target`). What was swapped out is checked again after the swap, so something
        put there in between is swapped back, untouched, and refused.
        """
        ops = self.storage.ops
        if check_save_target(final, overwrite=self.overwrite) != CHECKPOINT:
            # rename() replaces at most an empty directory: it fails (EEXIST/ENOTEMPTY) if anything
            # appeared there meanwhile, and nothing is overwritten
            ops.rename(self.staging, final)
            return None
        if ops.exchange(self.staging, final):
            refusal = _refusal(self.staging, final)
            if refusal is not None:  # replaced or added to between the check and the swap: put it back
                self._put_back(self.staging, final, refusal, exchange=True)
            return self.staging  # now holds the old checkpoint
        trash = os.path.join(self.storage.root, f"{TRASH_PREFIX}{self.name}-{uuid.uuid4().hex[:8]}")
        ops.rename(final, trash)
        refusal = _refusal(trash, final)
        if refusal is not None:
            self._put_back(trash, final, refusal, exchange=False)
        try:
            ops.rename(self.staging, final)
        except BaseException:
            ops.rename(trash, final)
            raise
        return trash

    def _put_back(self, moved: str, final: str, refusal: OccupiedPathError, *, exchange: bool) -> None:
        """Undo a swap (or move aside) of ``final`` that found what a save must not replace there; raise
        ``refusal``.

        Should the undo fail, the transaction is marked done first so that no abort removes ``moved``
        (it may hold what the user had at ``final``), and the error says where it is.
        """
        ops = self.storage.ops
        try:
            if exchange:
                if not ops.exchange(moved, final):
                    raise OSError(errno.ENOTSUP, "cannot exchange back")
            else:
                ops.rename(moved, final)
        except OSError as exc:
            self._done = True
            raise CommitError(
                exc.errno or errno.EIO,
                f"saving {final}: what appeared there during the commit ({refusal.strerror}) could not be moved "
                f"back ({exc.strerror or exc}); it is now at {moved}: move it back by hand",
            ) from exc
        raise refusal

    def _unpublish(self, final: str, old: str | None, exc: OSError | None) -> CommitError:
        """Undo :meth:`_publish` after the root fsync failed; return the error that says what is visible."""
        ops = self.storage.ops
        self._done = True
        reason = (exc.strerror or str(exc)) if exc is not None else "interrupted"
        code = exc.errno if exc is not None else errno.EINTR
        new_at_final = True
        try:
            if old == self.staging:
                if not ops.exchange(self.staging, final):  # swap back: the old version is at final again
                    raise OSError(errno.ENOTSUP, "cannot exchange back")
            else:
                ops.rename(final, self.staging)
                new_at_final = False
                if old is not None:
                    ops.rename(old, final)
        except OSError as undo:
            if new_at_final:
                state = f"the new checkpoint is visible at {final} but may not survive a power loss"
                if old is not None:
                    state += f"; the previous version is at {old}"
            else:
                state = f"nothing is visible at {final}: the previous version is at {old}, the new one at "
                state += self.staging
            return CommitError(
                code,
                f"saving {final}: the fsync of {self.storage.root} after the rename failed ({reason}) and undoing "
                f"the rename failed too ({undo.strerror or undo}): {state}",
            )
        for sink in self._sinks:
            sink.discard()
        ops.rmtree(self.staging)
        return CommitError(
            code,
            f"saving {final} failed, nothing was published: the fsync of {self.storage.root} after the "
            f"rename failed ({reason}), so the rename was undone"
            + (" and the previous version put back" if old is not None else ""),
        )

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        for sink in self._sinks:
            sink.discard()
        self.storage.ops.rmtree(self.staging)


class JoinedTransaction(_StagingFiles):
    """One process's share of a transaction another process began (multi-process saves).

    Rank 0 calls :meth:`LocalStorage.begin` and hands ``txn.token`` to the other ranks; each calls
    :meth:`LocalStorage.join` and writes its own files into the same staging directory (``close`` makes
    each durable). Only the owner publishes, after every rank reported its files, so a participant's
    :meth:`commit` refuses; :meth:`abort` removes only the files this participant created (the owner's
    abort removes the whole staging directory).
    """

    def __init__(self, storage: LocalStorage, name: str, staging: str) -> None:
        self.storage = storage
        self.name = name
        self.staging = staging
        self._sinks: list[LocalFileSink] = []
        self._done = False

    _manifest_writer = "the owner's commit()"

    def commit(self, manifest: bytes) -> str:
        raise CommitError(
            errno.EPERM, f"only the process that began the transaction for {self.name} commits it (joined here)"
        )

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        for sink in self._sinks:
            sink.discard()
            try:
                os.unlink(sink.path)
            except OSError:
                pass

    def finish(self) -> None:
        """Nothing to release (each file was made durable by its sink's ``close``)."""
        return None


def _refusal(moved: str, final: str) -> OccupiedPathError | None:
    """Why what was just moved from ``final`` to ``moved`` must not be replaced (it is not a checkpoint, or
    holds entries savegame did not write: :func:`unaccounted`), or None when it may."""
    kind = occupant(moved)
    if kind != CHECKPOINT:
        return occupied_error(final, kind)
    foreign = unaccounted(moved)
    return foreign_files_error(final, foreign) if foreign else None
