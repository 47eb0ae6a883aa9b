"""Direct I/O for large data files: their bytes bypass the page cache (``O_DIRECT``).

Why: a buffered ``write`` copies every byte into the page cache and leaves the kernel to allocate,
account, write back and later reclaim those pages. For a checkpoint that is written once and rarely read
back soon, that is overhead, and it lands on the training's CPUs. Measured here (``python -m
bench.direct_io``, one file fsynced, ``bench/results/direct_io.md``): 313 MiB took 88 ms of CPU buffered
and 58 ms direct (wall 194 vs 222 ms: on an idle machine with free memory the page cache writes slightly
faster); 1 GiB took 1,162 ms of CPU and 1.46 s buffered, once the page cache had to reclaim, against
193 ms and 0.73 s direct. A background save of the 313 MiB training state of ``bench/trainloop.py`` took
131 ms of CPU direct against 212 ms buffered. DeepSpeed's
FastPersist and DataStates-LLM write checkpoints this way for the same reason.

How: :class:`LocalFileSink` writes a file buffered until it reaches :data:`DIRECT_FROM_BYTES`; then (file
position aligned first) it turns ``O_DIRECT`` on and hands every later byte to a :class:`DirectStager`,
which copies them into page-aligned staging buffers and writes each full buffer on a worker thread while
the next one fills (a copy and a device write overlap; at most one write per file in flight, so the
file's bytes stay in order). The last, partial buffer is padded with zeros to the block size, written,
and the file truncated back to its real length; the padding is never hashed or read. ``fsync`` still
runs at close: direct writes skip the page cache, not the device's write cache or the file's metadata.

Where: only on the local disk filesystems of :data:`FILESYSTEMS` (ext4, xfs, btrfs...), looked up by the
file's device in ``/proc/self/mountinfo``. Network and FUSE filesystems (NFS, Lustre, s3fs...) keep
buffered writes: their direct writes can become synchronous round trips. tmpfs gains nothing from it.

Fallbacks, never an error: an OS without ``O_DIRECT``, a filesystem that refuses it (``fcntl`` fails: tmpfs
on older kernels, some FUSE filesystems) or a device whose alignment rules our 4 KiB blocks do not meet
(a direct write fails with ``EINVAL``, having written nothing) makes the file continue buffered from where
it is. ``SAVEGAME_DIRECT_IO=0`` in the environment turns direct I/O off for the process (read when this
module is imported), as does ``FileOps.direct_io = False`` on one storage's ops.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING

import numpy as np

from savegame._util.workers import LazyPool

if TYPE_CHECKING:
    from savegame.storage.local.ops import FileOps

O_DIRECT: int = getattr(os, "O_DIRECT", 0)
"""The flag (0 where the OS has none: then direct I/O is never used)."""
ENABLED = O_DIRECT != 0 and os.environ.get("SAVEGAME_DIRECT_IO", "1").strip().lower() not in ("0", "false", "no", "off")
"""Whether files may use direct I/O at all in this process (see the module docstring)."""
BLOCK = 4096
"""File offsets, lengths and buffer addresses of direct writes are multiples of this (the page size;
it satisfies the 512-byte and 4 KiB logical blocks of common devices)."""
STAGE_BYTES = 8 << 20
"""Size of one staging buffer: one direct ``write`` call (two per file being written)."""
DIRECT_FROM_BYTES = 32 << 20
"""A file switches to direct I/O once this many bytes went to it: below, a buffered write plus fsync is
as fast in wall time and the page cache's cost is small (``python -m bench.direct_io``)."""
FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "bcachefs"})
"""Filesystem types (as ``/proc/self/mountinfo`` names them) whose files may use direct I/O: local block
filesystems with a real ``O_DIRECT`` path."""
_KEPT_BUFFERS = 4
"""Staging buffers kept for the next file (32 MiB): allocating and faulting in fresh ones per file costs
more than the copy into them."""

_writes = LazyPool("savegame-direct", 2)
_fs_types: dict[int, str | None] = {}


def filesystem_type(fd: int) -> str | None:
    """The type of the filesystem ``fd``'s file is on (``"ext4"``...), from ``/proc/self/mountinfo``
    (cached per device); None where that cannot be told (no ``/proc``, no matching mount)."""
    dev = os.fstat(fd).st_dev
    if dev not in _fs_types:
        _fs_types[dev] = _mount_type(f"{os.major(dev)}:{os.minor(dev)}")
    return _fs_types[dev]


def _mount_type(device: str) -> str | None:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:  # "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue"
                fields = line.split()
                if len(fields) > 2 and fields[2] == device and " - " in line:
                    return line.split(" - ", 1)[1].split()[0]
    except OSError:
        return None
    return None


def suits(fd: int) -> bool:
    """Whether ``fd``'s file may use direct I/O: the OS has it and its filesystem is in :data:`FILESYSTEMS`."""
    return O_DIRECT != 0 and filesystem_type(fd) in FILESYSTEMS


class _StagingPool:
    """Page-aligned staging buffers (anonymous mappings), reused across files and saves."""

    def __init__(self) -> None:
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self) -> mmap.mmap:
        with self._lock:
            while self._free:
                buf = self._free.pop()
                if len(buf) == STAGE_BYTES:  # tests change the size
                    return buf
        return mmap.mmap(-1, STAGE_BYTES)

    def give(self, buf: mmap.mmap) -> None:
        """Keep ``buf`` for reuse, or drop it (unmapped once the last view of it is gone: never closed
        here, as a view may still be held by a traceback)."""
        with self._lock:
            if len(self._free) < _KEPT_BUFFERS:
                self._free.append(buf)


_staging = _StagingPool()


class DirectStager:
    """The direct-I/O part of one file: stages bytes into aligned buffers and writes them out.

    ``fd`` must already have ``O_DIRECT`` set and its position at a multiple of :data:`BLOCK`. Methods are
    called from one thread (the file's writer); each full buffer is written on a worker thread.
    """

    def __init__(self, fd: int, ops: FileOps, path: str) -> None:
        self._fd = fd
        self._ops = ops
        self._path = path
        self._current: mmap.mmap | None = _staging.take()
        self._spare: mmap.mmap | None = None
        self._fill = 0
        self._pending: Future[None] | None = None
        self.direct = True
        """False once the file fell back to buffered writes (a direct write was refused)."""

    def write(self, view: memoryview) -> None:
        """Stage ``view`` (format ``B``); full buffers go out as they fill."""
        done, total = 0, len(view)
        while done < total:
            current = self._current
            assert current is not None, "write after finish"
            n = min(total - done, STAGE_BYTES - self._fill)
            # NumPy's copy releases the interpreter lock (a memoryview assignment holds it): training's
            # Python thread keeps running while a background save stages its bytes
            np.copyto(np.frombuffer(current, np.uint8, n, self._fill), np.frombuffer(view[done : done + n], np.uint8))
            self._fill += n
            done += n
            if self._fill == STAGE_BYTES:
                self._send()

    def _send(self) -> None:
        """Write the full current buffer on a worker; fill the other one meanwhile."""
        full = self._current
        assert full is not None
        self._wait()  # the write in flight used the spare buffer: it is free again once this returns
        self._pending = _writes.get().submit(self._put, memoryview(full)[:STAGE_BYTES])
        self._current, self._spare = self._spare or _staging.take(), full
        self._fill = 0

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _put(self, view: memoryview) -> None:
        """Write all of ``view`` at the file position, falling back to buffered if a direct write is refused."""
        done, total = 0, len(view)
        while done < total:
            try:
                n = self._ops.write(self._fd, view[done:])
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                self._fall_back()  # a refused direct write wrote nothing: write the same bytes buffered
                continue
            if n <= 0:
                raise OSError(errno.EIO, "write returned 0", self._path)
            done += n
            if self.direct and done < total and done % BLOCK:
                self._fall_back()  # a short direct write left the position unaligned

    def _fall_back(self) -> None:
        self.direct = False
        self._ops.set_direct(self._fd, False)

    def finish(self, size: int) -> None:
        """Write what is staged and wait for every write; ``size``: the file's real length, which a
        padded last block is truncated back to. Raises what a write raised."""
        try:
            self._wait()
            current, fill = self._current, self._fill
            if current is not None and fill:
                if self.direct:
                    padded = -(-fill // BLOCK) * BLOCK
                    memoryview(current)[fill:padded] = bytes(padded - fill)
                    self._put(memoryview(current)[:padded])
                    if padded != fill or not self.direct:
                        self._ops.truncate(self._fd, size)
                else:
                    self._put(memoryview(current)[:fill])
        finally:
            self._release()

    def abandon(self) -> None:
        """After an error: wait for the write in flight (ignoring its error) and give the buffers back."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.exception()
        self._release()

    def _release(self) -> None:
        for buf in (self._current, self._spare):
            if buf is not None:
                _staging.give(buf)
        self._current = self._spare = None
        self._fill = 0
