"""Checkpoints on a local (POSIX) filesystem: staging directory, fsync, manifest last, atomic rename.

The commit protocol, step by step (each step's failure leaves older checkpoints untouched):

1. create ``ROOT/.staging-<host>-<pid>-<uuid>/`` (invisible to readers: names starting with ``.`` are
   never checkpoints);
2. write each data file there and ``fsync`` it;
3. write ``manifest.json`` last and ``fsync`` it, then ``fsync`` the staging directory;
4. publish: ``rename(staging, ROOT/NAME)``. If NAME exists and overwriting was asked for, the two
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
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field

from ..errors import CommitError, InvalidNameError, StorageError
from .base import MANIFEST, QUARANTINE_PREFIX, STAGING_PREFIX, TRASH_PREFIX

_RENAME_EXCHANGE = 2
_STALE_FOREIGN_SECONDS = 24 * 3600


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


def check_checkpoint_name(name: str) -> str:
    """A checkpoint name is one path component, not hidden, without separators or NUL."""
    if (
        not name
        or name in (".", "..")
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or len(name) > 255
    ):
        raise InvalidNameError(
            f"invalid checkpoint name {name!r}: it must be one path component, not start with '.', "
            "and contain no '/', '\\' or NUL"
        )
    return name


def _io_error(exc: OSError, what: str) -> StorageError:
    err = StorageError(exc.errno, f"{what}: {exc.strerror or exc}")
    err.filename = exc.filename
    return err


class LocalFileSink:
    """An unbuffered file written with large ``write`` calls and made durable by ``close``."""

    def __init__(self, path: str, ops: FileOps) -> None:
        self.path = path
        self._ops = ops
        self._fd: int | None = ops.open_new(path)
        self.bytes_written = 0

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
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self._ops.fsync(fd)
        finally:
            self._ops.close(fd)

    def discard(self) -> None:
        """Close without fsync (after an error)."""
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
        """Write the manifest, make everything durable and publish; return the final path."""
        ops = self.storage.ops
        final = os.path.join(self.storage.root, self.name)
        try:
            for sink in self._sinks:
                sink.close()
            sink = LocalFileSink(os.path.join(self.staging, MANIFEST), ops)
            try:
                sink.write(manifest)
            except BaseException:
                sink.discard()
                raise
            sink.close()
            ops.fsync_dir(self.staging)
            self._publish(final)
            ops.fsync_dir(self.storage.root)
        except OSError as exc:
            self.abort()
            raise CommitError(
                exc.errno, f"saving {final} failed, nothing was published: {exc.strerror or exc}"
            ) from exc
        except BaseException:
            self.abort()
            raise
        self._done = True
        return final

    def _publish(self, final: str) -> None:
        ops = self.storage.ops
        if not os.path.lexists(final):
            ops.rename(self.staging, final)  # fails (EEXIST/ENOTEMPTY) if someone else created it: no overwrite
            return
        if not self.overwrite:
            raise CommitError(errno.EEXIST, f"{final} already exists")
        if ops.exchange(self.staging, final):
            ops.rmtree(self.staging)  # now holds the old checkpoint
            return
        trash = os.path.join(self.storage.root, f"{TRASH_PREFIX}{self.name}-{uuid.uuid4().hex[:8]}")
        ops.rename(final, trash)
        try:
            ops.rename(self.staging, final)
        except BaseException:
            ops.rename(trash, final)
            raise
        ops.rmtree(trash)

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        for sink in self._sinks:
            sink.discard()
        self.storage.ops.rmtree(self.staging)


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

    def begin(self, name: str, *, overwrite: bool = False) -> LocalTransaction:
        check_checkpoint_name(name)
        staging = os.path.join(
            self.root, f"{STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        )
        try:
            self.ops.mkdir(staging)
        except OSError as exc:
            raise _io_error(exc, f"cannot create staging directory in {self.root}") from exc
        return LocalTransaction(self, name, staging, overwrite)

    def committed(self) -> list[str]:
        """Names of committed checkpoints (folders with a manifest), sorted by name."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        names = []
        for e in entries:
            if e.name.startswith(".") or not e.is_dir(follow_symlinks=False):
                continue
            if os.path.isfile(os.path.join(e.path, MANIFEST)):
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
                if _staging_is_live(e.name[len(STAGING_PREFIX) :], host, e):
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


def _staging_is_live(tag: str, host: str, entry: os.DirEntry[str]) -> bool:
    parts = tag.rsplit("-", 2)
    if len(parts) != 3:
        return False
    owner_host, pid_text, _ = parts
    if owner_host != host:
        try:
            return time.time() - entry.stat(follow_symlinks=False).st_mtime < _STALE_FOREIGN_SECONDS
        except OSError:
            return False
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    if pid == os.getpid():
        return True  # our own (possibly another thread's) save in progress
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
