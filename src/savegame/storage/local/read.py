"""Reading one local checkpoint: :func:`open_local_checkpoint` and :class:`LocalCheckpointReader`.

The directory is opened once and every file relative to that handle, without following symlinks, so a
reader sees one version of the checkpoint even while it is overwritten; data files are mapped
copy-on-write (small ones read into aligned memory). Used by
:meth:`~savegame.storage.local.root.LocalStorage.reader`, and directly by :mod:`savegame.api` for
plain paths.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import sys
import weakref
from collections.abc import Iterable, Iterator

import numpy as np

from savegame.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    InvalidManifestError,
    NotACheckpointError,
    StorageError,
    TruncatedFileError,
)
from savegame.format.tensorfile import check_allocated
from savegame.storage.base import MANIFEST, STAGING_PREFIX


def open_local_checkpoint(path: str | os.PathLike[str]) -> LocalCheckpointReader:
    """Check that ``path`` is a committed checkpoint directory and open it for reading.

    The directory is opened once, here, and every later read goes through that handle (``openat``), so
    a reader sees one version even if the checkpoint is overwritten (swapped) while it reads.

    Raises :class:`CheckpointNotFoundError` (nothing there), :class:`NotACheckpointError` (not a
    directory, a staging directory, or no manifest that is a regular file).
    """
    full = os.path.abspath(os.fspath(path))
    reader = LocalCheckpointReader(full)
    try:
        reader.dir_fd()  # nothing there (a dangling symlink included) raises FileNotFoundError: no stat first
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{full}: no such checkpoint") from None
    except NotADirectoryError:
        if not os.path.lexists(full):  # a path through a file ("a.txt/ckpt"): nothing there
            raise CheckpointNotFoundError(f"{full}: no such checkpoint") from None
        raise NotACheckpointError(f"{full}: not a directory (a savegame checkpoint is a directory)") from None
    except OSError as exc:
        raise StorageError(exc.errno, f"{full}: cannot open the checkpoint: {exc.strerror or exc}") from exc
    if os.path.basename(full).startswith(STAGING_PREFIX):
        reader.close()
        raise NotACheckpointError(f"{full}: an unfinished save (staging directory), not a checkpoint")
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


PREFETCH_MAX_FILES = 64
"""At most this many data files are held open by :meth:`LocalCheckpointReader.prefetch` at once."""


def _read_aligned(fd: int, size: int, where: str) -> memoryview:
    """All ``size`` bytes of ``fd`` in fresh, writable memory starting on a 64-byte boundary (the alignment
    a framework's own allocations have, so tensors can be views of it; see ``api._zero_copy_for``)."""
    block = np.empty(size + 63, dtype=np.uint8)
    start = -block.__array_interface__["data"][0] % 64  # not .ctypes: a Python helper object per call
    view = block[start : start + size].data  # a memoryview of the aligned part
    done = 0
    while done < size:
        got = os.readv(fd, [view[done:]])
        if got == 0:
            raise TruncatedFileError(f"{where}: ended after {done} of {size} bytes (changed while reading)")
        done += got
    return view


def _read_upto(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes from ``fd`` (fewer only at the end of the file)."""
    chunks = []
    while limit > 0:
        chunk = os.read(fd, limit)
        if not chunk:
            break
        chunks.append(chunk)
        limit -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _close_all(fd: int, opened: dict[str, tuple[int, int]]) -> None:
    """Close the directory handle ``fd`` and the prefetched descriptors in ``opened`` (emptied)."""
    for file_fd, _ in opened.values():
        os.close(file_fd)
    opened.clear()
    os.close(fd)


_FADV_WILLNEED: int | None = getattr(os, "POSIX_FADV_WILLNEED", None)

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
        self._opened: dict[str, tuple[int, int]] = {}  # prefetched data files: name -> (descriptor, size)
        self._finalizer: weakref.finalize[[int, dict[str, tuple[int, int]]], LocalCheckpointReader] | None = None

    def dir_fd(self) -> int:
        """The open directory (opened on first call)."""
        if self._fd is None:
            fd = os.open(self.where, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
            self._fd = fd
            self._finalizer = weakref.finalize(self, _close_all, fd, self._opened)
        return self._fd

    def close(self) -> None:
        """Release the directory handle and any prefetched file (reading again reopens the path)."""
        if self._finalizer is not None:
            self._finalizer()
        self._fd = None
        self._finalizer = None
        self._opened = {}

    def prefetch(self, files: Iterable[str] | None) -> None:
        """Open ``files`` now (at most :data:`PREFETCH_MAX_FILES` held open) and ask the kernel to start
        reading the small ones, which are read whole next (``POSIX_FADV_WILLNEED``), so that on a cold
        cache their reads overlap instead of waiting for the disk one after another (large files are
        mapped and read in order by the hash, where the kernel's own readahead does this). ``None``:
        the manifest and every other file in the directory, before the manifest says which are data
        files, so the manifest's read overlaps theirs too.

        The opened descriptors (and their sizes) are what :meth:`manifest_bytes`, :meth:`file_size` and
        :meth:`read_file` use next, so the size checked is the size of the very file read. A file that
        cannot be opened here is left alone: the later calls raise for it exactly as without a prefetch.
        """
        if files is None:
            try:
                names = sorted(os.listdir(self.dir_fd()))
            except OSError:
                return
            files = [MANIFEST, *(n for n in names if n != MANIFEST and not n.startswith("."))]
        for file in files:
            if len(self._opened) >= PREFETCH_MAX_FILES:
                break
            if file in self._opened:
                continue
            try:
                fd, size = self._open(file)
            except (OSError, NotACheckpointError):  # raised again, as it should be, by the later call
                continue
            self._opened[file] = (fd, size)
            if _FADV_WILLNEED is not None and 0 < size <= SMALL_FILE_BYTES:
                try:
                    os.posix_fadvise(fd, 0, size, _FADV_WILLNEED)
                except OSError:  # a hint only (some file systems refuse it)
                    pass

    def __enter__(self) -> LocalCheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self, file: str) -> tuple[int, int]:
        """A read-only descriptor of a regular file of the directory (never through a symlink), and the
        file's size (from the one ``fstat`` that checked it is a regular file)."""
        try:
            fd = os.open(file, _READ_FLAGS, dir_fd=self.dir_fd())
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR, errno.ENOENT):
                self._check_still_there(file)
                raise FileNotFoundError(errno.ENOENT, "missing or not a regular file", self.file_where(file)) from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FileNotFoundError(errno.ENOENT, "not a regular file", self.file_where(file))
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd, st.st_size

    def _take(self, file: str) -> tuple[int, int]:
        """The prefetched descriptor and size of ``file`` (handed over: the caller closes it), or a fresh one."""
        opened = self._opened.pop(file, None)
        return opened if opened is not None else self._open(file)

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
            fd, size = self._take(MANIFEST)
        except FileNotFoundError:
            raise NotACheckpointError(
                f"{self.where}: no {MANIFEST} (or not a regular file), so not a committed savegame checkpoint"
            ) from None
        except OSError as exc:
            raise StorageError(exc.errno, f"{where}: {exc.strerror or exc}") from exc
        try:
            if size > MAX_MANIFEST_BYTES:
                raise InvalidManifestError(f"{where}: manifest of {size} bytes exceeds {MAX_MANIFEST_BYTES}")
            return _read_upto(fd, size + 1)  # +1: a file that grew since fstat fails the hash check
        finally:
            os.close(fd)

    def file_where(self, file: str) -> str:
        """``os.path.join(self.where, file)`` (asked several times per file of every load: the plain case
        without the call)."""
        where = self.where
        if where and where[-1] != "/" and file[:1] != "/":
            return f"{where}/{file}"
        return os.path.join(where, file)

    def file_size(self, file: str) -> int:
        """Size of a regular file (a symlink or anything else counts as missing)."""
        where = self.file_where(file)
        opened = self._opened.get(file)
        if opened is not None:  # prefetched: the size of the very file read_file will read
            return opened[1]
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
        fd, _ = self._take(file)
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
        try:
            fd, actual = self._take(file)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise _read_error(exc, where) from exc
        try:
            if actual != size:
                raise TruncatedFileError(f"{where}: {actual} bytes, expected {size} (changed while reading)")
            if size == 0:
                return b""
            if size <= SMALL_FILE_BYTES:
                return _read_aligned(fd, size, where)
            check_allocated(fd, size, where)  # a sparse file is not mapped (its holes would cost memory)
            return mmap.mmap(fd, size, access=mmap.ACCESS_COPY, **_UNTRACKED)
        except (CheckpointError, FileNotFoundError):
            raise
        except OSError as exc:
            raise _read_error(exc, where) from exc
        finally:
            os.close(fd)


_UNTRACKED: dict[str, bool] = {"trackfd": False} if sys.version_info >= (3, 13) else {}
"""Python 3.13+: a mapping keeps no duplicate of the file's descriptor (before, every mapped file of a
loaded checkpoint holds one for as long as its tensors live)."""


def _read_error(exc: OSError, where: str) -> StorageError:
    """A :class:`StorageError` for a data file that could not be opened, read or mapped."""
    hint = ""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        hint = ("; each mapped file of a loaded checkpoint holds a descriptor while its tensors live (Python "
                "before 3.13): load with copy=True to keep owned memory instead, or raise the limit (ulimit -n)")
    return StorageError(exc.errno, f"{where}: cannot read: {exc.strerror or exc}{hint}")
