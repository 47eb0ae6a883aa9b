"""The system calls of the local commit protocol, behind one seam: :class:`FileOps`.

Every call that creates, writes, fsyncs, renames or removes something of a checkpoint goes through a
:class:`FileOps` object, so tests can inject ENOSPC / EIO (or a kill) at any step. The writing side
(:mod:`savegame.storage.local.write`) and :class:`~savegame.storage.local.root.LocalStorage` use it;
a storage made without ``ops=`` uses :data:`DEFAULT_OPS`, looked up when the storage is made (tests
swap it by setting ``savegame.storage.local.ops.DEFAULT_OPS``). Also here: the ``OSError`` ->
:class:`StorageError` translation both sides use.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil

from savegame.errors import StorageError
from savegame.storage.local import direct

_RENAME_EXCHANGE = 2


class FileOps:
    """The system calls the commit protocol makes; subclass to inject faults in tests."""

    direct_io: bool = direct.ENABLED
    """Whether large data files may bypass the page cache (:mod:`savegame.storage.local.direct`)."""

    def open_new(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)

    def write(self, fd: int, data: memoryview) -> int:
        return os.write(fd, data)

    def set_direct(self, fd: int, on: bool) -> bool:
        """Turn ``O_DIRECT`` on or off for ``fd``; False where the OS or the filesystem refuses."""
        if not direct.O_DIRECT:
            return False
        import fcntl  # POSIX only, as O_DIRECT is

        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | direct.O_DIRECT if on else flags & ~direct.O_DIRECT)
        except OSError:
            return False
        return True

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def link(self, src: str, dst: str) -> None:
        """A hard link ``dst`` to the existing file ``src`` (incremental checkpoints)."""
        os.link(src, dst, follow_symlinks=False)

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
        """Remove the folder ``path``, best effort; a symlink is removed itself, never what it points to."""
        if os.path.islink(path):
            with contextlib.suppress(OSError):
                os.unlink(path)
            return
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


def _io_error(exc: OSError, what: str) -> StorageError:
    """``exc`` as a :class:`StorageError` saying ``what`` failed (keeping its errno and file name)."""
    err = StorageError(exc.errno, f"{what}: {exc.strerror or exc}")
    err.filename = exc.filename
    return err
