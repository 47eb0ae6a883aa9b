"""Checkpoints on a local (POSIX) filesystem: staging directory, fsync, manifest last, atomic rename.

The commit protocol, step by step (each step's failure leaves older checkpoints untouched):

1. create ``ROOT/.staging-<host>-<pid>-<uuid>/`` (invisible to readers: names starting with ``.`` are
   never checkpoints);
2. write each data file there and ``fsync`` it (the writer does this on worker threads, overlapped);
3. write ``manifest.json`` and ``fsync`` it (overlapping the data files' fsyncs still running: nothing in
   a staging directory is ever read), wait until every file is durable, then ``fsync`` the staging
   directory;
4. publish: ``rename(staging, ROOT/NAME)`` (which replaces at most an empty directory). Only a savegame
   checkpoint is ever replaced: anything else at NAME (a file, a symlink, a non-empty directory without
   a savegame manifest) raises :class:`OccupiedPathError` and is left untouched (checked by ``begin``,
   again here, and once more on what a swap took out). If NAME exists and overwriting was asked for, the two
   directories are swapped atomically (``renameat2(RENAME_EXCHANGE)``) and the old one removed after;
   where the kernel or filesystem lacks that, the old one is first renamed to ``.trash-...`` (a crash
   in between leaves it there, complete, and :meth:`LocalStorage.cleanup` puts it back);
5. ``fsync(ROOT)`` so the rename itself is durable.

When :meth:`LocalTransaction.commit` returns, the checkpoint survives a power loss. Every system call
goes through a :class:`FileOps` object so tests can inject ENOSPC / EIO at any step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import re
import shutil
import socket
import stat
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from savegame.errors import (
    CheckpointNotFoundError,
    CommitError,
    InvalidManifestError,
    InvalidNameError,
    NotACheckpointError,
    OccupiedPathError,
    StorageError,
    TruncatedFileError,
)
from savegame.format.naming import check_checkpoint_name as check_checkpoint_name  # re-exported: its old home
from savegame.format.naming import validate_name
from savegame.format.tensorfile import check_allocated
from savegame.storage.base import MANIFEST, QUARANTINE_PREFIX, STAGING_PREFIX, TRASH_PREFIX, CheckpointRef
from savegame.storage.liveness import FOREIGN_WRITER_GRACE_SECONDS, writer_is_live

_RENAME_EXCHANGE = 2
STALE_FOREIGN_SECONDS = FOREIGN_WRITER_GRACE_SECONDS  # the one grace period (storage.liveness)


class FileOps:
    """The system calls the commit protocol makes; subclass to inject faults in tests."""

    def open_new(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)

    def write(self, fd: int, data: memoryview) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def mkdir(self, path: str) -> None:
        os.mkdir(path, 0o755)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def exchange(self, a: str, b: str) -> bool:
        """Atomically swap two paths; False if the platform cannot (then the caller falls back)."""
        return _renameat2_exchange(a, b)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rmtree(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)


DEFAULT_OPS = FileOps()


def _renameat2_exchange(a: str, b: str) -> bool:
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


ABSENT = "absent"
EMPTY_DIRECTORY = "empty directory"
CHECKPOINT = "checkpoint"
_SAVEGAME_MANIFEST = re.compile(rb'^\s*\{\s*"format"\s*:\s*"savegame"')
"""How every manifest savegame writes begins (also a damaged one, whose tail no longer parses)."""


def starts_like_manifest(head: bytes) -> bool:
    """Whether ``head`` (the first bytes of a ``manifest.json``) is the start of a savegame manifest,
    as opposed to another program's file of that common name."""
    return _SAVEGAME_MANIFEST.match(head) is not None


def occupant(path: str) -> str:
    """What is at ``path``, as far as saving there goes: :data:`ABSENT`, :data:`EMPTY_DIRECTORY`,
    :data:`CHECKPOINT` (a directory, not a link, whose ``manifest.json`` is a regular file that starts
    like a savegame manifest), or a description of anything else ("a regular file", ...), which a save
    must never replace."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return ABSENT
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if stat.S_ISREG(st.st_mode):
        return "a regular file"
    if not stat.S_ISDIR(st.st_mode):
        return "a special file"
    with os.scandir(path) as entries:
        if next(entries, None) is None:
            return EMPTY_DIRECTORY
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(os.path.join(path, MANIFEST), flags)
    except OSError:
        return f"a non-empty directory without a savegame {MANIFEST}"
    try:
        head = os.read(fd, 256) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    finally:
        os.close(fd)
    if starts_like_manifest(head):
        return CHECKPOINT
    return f"a non-empty directory whose {MANIFEST} is not a savegame manifest"


def check_save_target(path: str, *, overwrite: bool) -> str:
    """Refuse to save over anything at ``path`` but a committed checkpoint (and that one only with
    ``overwrite``); return :func:`occupant`'s answer otherwise. Nothing is changed at ``path``.

    Raises :class:`OccupiedPathError` for a file, a link or a non-empty directory that is not a
    checkpoint, and :class:`CommitError` (EEXIST) for a checkpoint when ``overwrite`` is False.
    """
    kind = occupant(path)
    if kind in (ABSENT, EMPTY_DIRECTORY):
        return kind
    if kind == CHECKPOINT:
        if not overwrite:
            raise CommitError(errno.EEXIST, f"{path} already exists")
        return kind
    raise occupied_error(path, kind)


def occupied_error(path: str, kind: str) -> OccupiedPathError:
    """The error for a save refused because ``path`` holds ``kind`` (see :func:`occupant`)."""
    return OccupiedPathError(
        errno.EEXIST,
        f"{path} is {kind}, not a savegame checkpoint: nothing was saved and it was left untouched "
        "(overwrite=True replaces savegame checkpoints only); save to another path, or move it away first",
    )


def _io_error(exc: OSError, what: str) -> StorageError:
    err = StorageError(exc.errno, f"{what}: {exc.strerror or exc}")
    err.filename = exc.filename
    return err


class LocalFileSink:
    """An unbuffered file written with large ``write`` calls and made durable by ``close``.

    ``close`` may be called from several threads (the writer fsyncs finished files on a worker while the
    commit waits for them): the first call fsyncs and closes, every later one waits for it to finish and
    raises its error, if any (a failed fsync is never retried: its data may be lost).
    """

    def __init__(self, path: str, ops: FileOps) -> None:
        self.path = path
        self._ops = ops
        self._fd: int | None = ops.open_new(path)
        self.bytes_written = 0
        self._close_lock = threading.Lock()
        self._closed = False
        self._close_error: BaseException | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        assert self._fd is not None, "write after close"
        view = memoryview(data).cast("B") if not isinstance(data, memoryview) or data.format != "B" else data
        total = len(view)
        done = 0
        while done < total:
            n = self._ops.write(self._fd, view[done:])
            if n <= 0:
                raise OSError(errno.EIO, "write returned 0", self.path)
            done += n
        self.bytes_written += total
        return total

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
            if self._fd is not None:
                fd, self._fd = self._fd, None
                try:
                    os.close(fd)
                except OSError:
                    pass


@dataclass
class LocalTransaction:
    """A checkpoint being written into a staging directory (see the module docstring)."""

    storage: LocalStorage
    name: str
    staging: str
    overwrite: bool
    _sinks: list[LocalFileSink] = field(default_factory=list)
    _done: bool = False

    @property
    def token(self) -> str:
        """Names this transaction to other processes that write into it (:meth:`LocalStorage.join`)."""
        return os.path.basename(self.staging)

    def open(self, file: str) -> LocalFileSink:
        check_checkpoint_name(file)
        if file == MANIFEST:
            raise InvalidNameError(f"{MANIFEST} is written by commit(), not open()")
        try:
            sink = LocalFileSink(os.path.join(self.staging, file), self.storage.ops)
        except OSError as exc:
            raise _io_error(exc, f"cannot create {file} in {self.staging}") from exc
        self._sinks.append(sink)
        return sink

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
            swapped = occupant(self.staging)
            if swapped != CHECKPOINT:  # replaced between the check and the swap: put it back as it was
                self._put_back(self.staging, final, swapped, exchange=True)
            return self.staging  # now holds the old checkpoint
        trash = os.path.join(self.storage.root, f"{TRASH_PREFIX}{self.name}-{uuid.uuid4().hex[:8]}")
        ops.rename(final, trash)
        moved = occupant(trash)
        if moved != CHECKPOINT:
            self._put_back(trash, final, moved, exchange=False)
        try:
            ops.rename(self.staging, final)
        except BaseException:
            ops.rename(trash, final)
            raise
        return trash

    def _put_back(self, moved: str, final: str, kind: str, *, exchange: bool) -> None:
        """Undo a swap (or move aside) of ``final`` that found ``kind``, not a checkpoint, there; raise.

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
                f"saving {final}: {kind} appeared there during the commit and moving it back failed "
                f"({exc.strerror or exc}); it is now at {moved}: move it back by hand",
            ) from exc
        raise occupied_error(final, kind)

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


class JoinedTransaction:
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

    @property
    def token(self) -> str:
        return os.path.basename(self.staging)

    def open(self, file: str) -> LocalFileSink:
        check_checkpoint_name(file)
        if file == MANIFEST:
            raise InvalidNameError(f"{MANIFEST} is written by the owner's commit(), not open()")
        try:
            sink = LocalFileSink(os.path.join(self.staging, file), self.storage.ops)
        except OSError as exc:
            raise _io_error(exc, f"cannot create {file} in {self.staging}") from exc
        self._sinks.append(sink)
        return sink

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


class LocalStorage:
    """A directory of checkpoints on a local filesystem."""

    def __init__(self, root: str | os.PathLike[str], *, ops: FileOps | None = None, create: bool = True) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.ops = ops or DEFAULT_OPS
        if create:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise _io_error(exc, f"cannot create checkpoint root {self.root}") from exc

    def path(self, name: str) -> str:
        return os.path.join(self.root, check_checkpoint_name(name))

    def url(self, name: str) -> str:
        """The checkpoint's directory path (the same as :meth:`path`)."""
        return self.path(name)

    def exists(self, name: str) -> bool:
        """Whether ``name`` is a committed checkpoint (a directory with a manifest)."""
        path = self.path(name)
        return os.path.isdir(path) and _is_regular_file(os.path.join(path, MANIFEST))

    def reader(self, name: str) -> LocalCheckpointReader:
        """Open committed checkpoint ``name`` for reading (files are memory-mapped)."""
        return open_local_checkpoint(self.path(name))

    def ref(self, name: str) -> CheckpointRef:
        """A handle on checkpoint ``name`` for ``savegame.load/verify/read_manifest``."""
        return CheckpointRef(self, check_checkpoint_name(name))

    def check_target(self, name: str, *, overwrite: bool) -> None:
        """Raise now what saving ``name`` would raise at its commit because of what is at ``ROOT/NAME``:
        :class:`OccupiedPathError` (not a checkpoint) or :class:`CommitError` (a checkpoint, and not
        ``overwrite``). Changes nothing."""
        path = self.path(name)
        try:
            check_save_target(path, overwrite=overwrite)
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            raise _io_error(exc, f"cannot inspect {path}") from exc

    def begin(self, name: str, *, overwrite: bool = False) -> LocalTransaction:
        """Start writing checkpoint ``name`` into a staging directory (see the module docstring).

        Refuses at once (:class:`OccupiedPathError`), before anything is written, when ``ROOT/NAME`` holds
        something a checkpoint must not replace; the commit checks again.
        """
        validate_name(name)  # a new checkpoint gets a portable name, whichever save path chose it
        self.check_target(name, overwrite=True)  # an existing checkpoint without overwrite: at the commit
        staging = os.path.join(
            self.root, f"{STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        )
        try:
            self.ops.mkdir(staging)
        except OSError as exc:
            raise _io_error(exc, f"cannot create staging directory in {self.root}") from exc
        return LocalTransaction(self, name, staging, overwrite)

    def join(self, name: str, token: str, *, timeout: float = 60.0) -> JoinedTransaction:
        """Write into the transaction another process began with ``begin(name)`` (``token`` = its ``txn.token``).

        Waits up to ``timeout`` seconds for the staging directory to become visible (on a shared
        filesystem another host's new directory can show up late). The token must name a staging
        directory directly inside this root, so a token received from elsewhere cannot point outside it.
        """
        check_checkpoint_name(name)
        if not token.startswith(STAGING_PREFIX) or "/" in token or "\\" in token or "\0" in token or len(token) > 255:
            raise InvalidNameError(f"{token[:80]!r} does not name a staging directory of {self.root}")
        staging = os.path.join(self.root, token)
        deadline = time.monotonic() + timeout
        while not os.path.isdir(staging):
            if time.monotonic() >= deadline:
                raise StorageError(errno.ENOENT, f"staging directory {staging} did not appear within {timeout} s")
            time.sleep(0.02)
        return JoinedTransaction(self, name, staging)

    def committed(self) -> list[str]:
        """Names of committed checkpoints (folders with a manifest that is a regular file), sorted by name."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        names = []
        for e in entries:
            if e.name.startswith(".") or not e.is_dir(follow_symlinks=False):
                continue
            if _is_regular_file(os.path.join(e.path, MANIFEST)):
                names.append(e.name)
        return sorted(names)

    def quarantined(self) -> list[str]:
        """Folder names of quarantined checkpoints (kept for inspection, never loaded as latest)."""
        try:
            return sorted(n for n in os.listdir(self.root) if n.startswith(QUARANTINE_PREFIX))
        except FileNotFoundError:
            return []

    def delete(self, name: str) -> None:
        """Remove a checkpoint: it disappears atomically (rename), then its files are removed."""
        path = self.path(name)
        trash = os.path.join(self.root, f"{TRASH_PREFIX}del-{name}-{uuid.uuid4().hex[:8]}")
        try:
            self.ops.rename(path, trash)
            self.ops.fsync_dir(self.root)
        except OSError as exc:
            raise _io_error(exc, f"cannot delete checkpoint {path}") from exc
        self.ops.rmtree(trash)

    def quarantine(self, name: str) -> str:
        """Move a damaged checkpoint out of the way without deleting it; return its new folder name."""
        path = self.path(name)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        new = f"{QUARANTINE_PREFIX}{name}-{stamp}-{uuid.uuid4().hex[:6]}"
        try:
            self.ops.rename(path, os.path.join(self.root, new))
            self.ops.fsync_dir(self.root)
        except OSError as exc:
            raise _io_error(exc, f"cannot quarantine {path}") from exc
        return new

    def cleanup(self) -> list[str]:
        """Remove what crashed writers left behind; return the removed folder names.

        Staging folders of live processes on this host are kept; those of dead processes are removed;
        those of other hosts (shared filesystems) only after a day. A ``.trash-NAME-*`` folder whose
        checkpoint NAME is missing (a crash mid-overwrite) is renamed back instead of removed.
        """
        removed: list[str] = []
        host = socket.gethostname()
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return removed
        for e in entries:
            if e.name.startswith(STAGING_PREFIX):
                if staging_is_live(e.name[len(STAGING_PREFIX) :], host, e):
                    continue
                self.ops.rmtree(e.path)
                removed.append(e.name)
            elif e.name.startswith(TRASH_PREFIX):
                rest = e.name[len(TRASH_PREFIX) :]
                original = rest.rsplit("-", 1)[0]
                if not rest.startswith("del-") and original and not os.path.lexists(os.path.join(self.root, original)):
                    if os.path.isfile(os.path.join(e.path, MANIFEST)):
                        self.ops.rename(e.path, os.path.join(self.root, original))
                        continue
                self.ops.rmtree(e.path)
                removed.append(e.name)
        return removed


def staging_is_live(tag: str, host: str, entry: os.DirEntry[str], *, now: float | None = None) -> bool:
    """Whether the staging folder ``entry`` (``.staging-HOST-PID-ID``; ``tag`` without the prefix) may
    still be written, by :func:`savegame.storage.liveness.writer_is_live`: this host's writer process
    is running (this process's own: another thread's save), or another host's folder was touched within
    :data:`STALE_FOREIGN_SECONDS` (its owner cannot be checked from here)."""
    parts = tag.rsplit("-", 2)
    if len(parts) != 3:
        return False
    owner_host, pid_text, _ = parts
    if owner_host == host:
        try:
            pid = int(pid_text)
        except ValueError:
            return False
        return writer_is_live(host=socket.gethostname(), pid=pid, touched=None)
    try:
        mtime = entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return False
    return writer_is_live(host=None, pid=None, touched=mtime, now=now)


# ---------------------------------------------------------------------------------------------------
# Reading


def _is_regular_file(path: str) -> bool:
    """Whether ``path`` is a regular file itself (a symlink to one is not: readers refuse it)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def open_local_checkpoint(path: str | os.PathLike[str]) -> LocalCheckpointReader:
    """Check that ``path`` is a committed checkpoint directory and open it for reading.

    The directory is opened once, here, and every later read goes through that handle (``openat``), so
    a reader sees one version even if the checkpoint is overwritten (swapped) while it reads.

    Raises :class:`CheckpointNotFoundError` (nothing there), :class:`NotACheckpointError` (not a
    directory, a staging directory, or no manifest that is a regular file).
    """
    full = os.path.abspath(os.fspath(path))
    if not os.path.lexists(full):
        raise CheckpointNotFoundError(f"{full}: no such checkpoint")
    if os.path.basename(full).startswith(STAGING_PREFIX):
        raise NotACheckpointError(f"{full}: an unfinished save (staging directory), not a checkpoint")
    reader = LocalCheckpointReader(full)
    try:
        reader.dir_fd()
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{full}: no such checkpoint") from None
    except NotADirectoryError:
        raise NotACheckpointError(f"{full}: not a directory (a savegame checkpoint is a directory)") from None
    except OSError as exc:
        raise StorageError(exc.errno, f"{full}: cannot open the checkpoint: {exc.strerror or exc}") from exc
    try:
        st = os.stat(MANIFEST, dir_fd=reader.dir_fd(), follow_symlinks=False)
    except FileNotFoundError:
        reader.close()
        raise NotACheckpointError(f"{full}: no {MANIFEST}, so not a committed savegame checkpoint") from None
    except OSError as exc:
        reader.close()
        raise StorageError(exc.errno, f"{full}/{MANIFEST}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        reader.close()
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise NotACheckpointError(f"{os.path.join(full, MANIFEST)}: {kind}, so not a committed savegame checkpoint")
    return reader


ITER_PIECE_BYTES = 32 << 20
"""The largest piece :meth:`LocalCheckpointReader.iter_file` reads at once."""

SMALL_FILE_BYTES = 256 << 10
"""Data files up to this size are read into memory rather than mapped (see ``read_file``)."""


def _read_aligned(fd: int, size: int, where: str) -> memoryview:
    """All ``size`` bytes of ``fd`` in fresh, writable memory starting on a 64-byte boundary (the alignment
    a framework's own allocations have, so tensors can be views of it; see ``api._zero_copy_for``)."""
    block = np.empty(size + 63, dtype=np.uint8)
    start = -block.ctypes.data % 64
    view = block[start : start + size].data  # a memoryview of the aligned part
    done = 0
    while done < size:
        got = os.readv(fd, [view[done:]])
        if got == 0:
            raise TruncatedFileError(f"{where}: ended after {done} of {size} bytes (changed while reading)")
        done += got
    return view


_READ_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


class LocalCheckpointReader:
    """A checkpoint directory opened for reading: data files are memory-mapped copy-on-write, so a load
    touches only the pages it uses and hashing reads straight from the page cache (files of at most
    :data:`SMALL_FILE_BYTES` are read into aligned memory instead).

    The directory is opened once (on first use; :func:`open_local_checkpoint` does it at once) and every
    file is opened relative to it without following symlinks, so all reads come from one version of the
    checkpoint even when it is overwritten meanwhile. :meth:`close` releases the handle (it is also
    released when the reader is garbage-collected).
    """

    def __init__(self, directory: str) -> None:
        self.where = directory
        self._fd: int | None = None
        self._finalizer: weakref.finalize[[int], LocalCheckpointReader] | None = None

    def dir_fd(self) -> int:
        """The open directory (opened on first call)."""
        if self._fd is None:
            fd = os.open(self.where, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
            self._fd = fd
            self._finalizer = weakref.finalize(self, os.close, fd)
        return self._fd

    def close(self) -> None:
        """Release the directory handle (reading again reopens the path)."""
        if self._finalizer is not None:
            self._finalizer()
        self._fd = None
        self._finalizer = None

    def __enter__(self) -> LocalCheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self, file: str) -> int:
        """A read-only descriptor of a regular file of the directory (never through a symlink)."""
        try:
            fd = os.open(file, _READ_FLAGS, dir_fd=self.dir_fd())
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR, errno.ENOENT):
                self._check_still_there(file)
                raise FileNotFoundError(errno.ENOENT, "missing or not a regular file", self.file_where(file)) from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FileNotFoundError(errno.ENOENT, "not a regular file", self.file_where(file))
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check_still_there(self, file: str) -> None:
        """Raise if the opened directory was removed or replaced at its path (an overwrite raced the read)."""
        try:
            here = os.fstat(self.dir_fd())
            there = os.stat(self.where)
        except OSError:
            there = None
        if there is None or (here.st_dev, here.st_ino) != (there.st_dev, there.st_ino) or here.st_nlink == 0:
            raise NotACheckpointError(
                f"{self.file_where(file)}: the checkpoint was removed or replaced while being read (overwritten?); "
                "read it again"
            )

    def manifest_bytes(self) -> bytes:
        from savegame.format.manifest import MAX_MANIFEST_BYTES

        where = os.path.join(self.where, MANIFEST)
        try:
            fd = self._open(MANIFEST)
        except FileNotFoundError:
            raise NotACheckpointError(
                f"{self.where}: no {MANIFEST} (or not a regular file), so not a committed savegame checkpoint"
            ) from None
        except OSError as exc:
            raise StorageError(exc.errno, f"{where}: {exc.strerror or exc}") from exc
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_MANIFEST_BYTES:
                raise InvalidManifestError(f"{where}: manifest of {size} bytes exceeds {MAX_MANIFEST_BYTES}")
            return f.read(size + 1)  # +1: a file that grew since fstat fails the hash check

    def file_where(self, file: str) -> str:
        return os.path.join(self.where, file)

    def file_size(self, file: str) -> int:
        """Size of a regular file (a symlink or anything else counts as missing)."""
        where = self.file_where(file)
        try:
            st = os.stat(file, dir_fd=self.dir_fd(), follow_symlinks=False)
        except FileNotFoundError:
            self._check_still_there(file)
            raise
        if not stat.S_ISREG(st.st_mode):
            raise FileNotFoundError(errno.ENOENT, "not a regular file", where)
        return st.st_size

    def iter_file(self, file: str, size: int) -> Iterator[memoryview]:
        """The file in order, in pieces of up to :data:`ITER_PIECE_BYTES` read into one reused buffer
        (each piece is valid until the next is asked for); a file that is not ``size`` bytes long
        raises :class:`TruncatedFileError`."""
        where = self.file_where(file)
        fd = self._open(file)
        try:
            buffer = memoryview(bytearray(min(ITER_PIECE_BYTES, size)))
            done = 0
            while done < size:
                got = os.readv(fd, [buffer[: size - done]])
                if got == 0:
                    raise TruncatedFileError(f"{where}: ended after {done} of {size} bytes (changed while reading)")
                done += got
                yield buffer[:got]
            if os.fstat(fd).st_size != size:
                raise TruncatedFileError(f"{where}: not {size} bytes (changed while reading)")
        finally:
            os.close(fd)

    def read_file(self, file: str, size: int) -> mmap.mmap | memoryview | bytes:
        """The whole file as private memory: a copy-on-write mapping (writes to arrays never reach the
        file), or for a file of at most :data:`SMALL_FILE_BYTES` a 64-byte aligned copy read at once
        (cheaper than mapping, faulting in and unmapping a few pages)."""
        where = self.file_where(file)
        fd = self._open(file)
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise TruncatedFileError(f"{where}: {actual} bytes, expected {size} (changed while reading)")
            if size == 0:
                return b""
            if size <= SMALL_FILE_BYTES:
                return _read_aligned(fd, size, where)
            check_allocated(fd, size, where)  # a sparse file is not mapped (its holes would cost memory)
            return mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)
