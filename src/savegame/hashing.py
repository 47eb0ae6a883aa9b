"""Content hashes for checkpoint files.

We use XXH3-128 (the ``xxhash`` package): it detects accidental corruption (bit flips, torn or
truncated writes, swapped files) with a 2**-128 collision chance and hashes at ~26 GB/s on one core
of the development machine, against ~4-5 GB/s for BLAKE3 and ~1 GB/s for SHA-256 (measured with
``python bench/hash_speed.py``). It is not a defence against a forger who can also rewrite the
manifest; nothing that stores its own hash next to the data can be.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from concurrent.futures import Future
from typing import Any, Protocol

import xxhash

from .workers import LazyPool

ALGORITHM = "xxh3_128"
"""Name recorded in every manifest, so a future format can change the algorithm."""

HEX_LENGTH = 32


class Hasher(Protocol):
    """The incremental hashing interface (``update`` then ``hexdigest``)."""

    def update(self, data: bytes | bytearray | memoryview) -> None: ...

    def hexdigest(self) -> str: ...


def new_hasher() -> Hasher:
    """A fresh incremental hasher for :data:`ALGORITHM`."""
    hasher: Hasher = xxhash.xxh3_128()
    return hasher


def hash_bytes(data: bytes | memoryview) -> str:
    """The hex digest of ``data`` in one call."""
    return xxhash.xxh3_128_hexdigest(data)


_OFFLOAD_BYTES = 4 << 20
"""Chunks at least this large are hashed on the worker thread (xxhash releases the GIL for them)."""

_READ_WORKERS = max(1, min(4, os.cpu_count() or 1))
_writer_hash = LazyPool("savegame-hash", 1)
"""The write path's single FIFO hashing thread (updates of one file must run in order)."""
_load_hash = LazyPool("savegame-verify", _READ_WORKERS)
"""The load path's hashing threads: the files of a checkpoint are hashed in parallel, one per thread."""


class OverlappedHasher:
    """An incremental hasher whose large updates run on a worker thread, overlapping the caller's writes.

    Updates are applied in call order (one FIFO worker). The caller must not modify a buffer after passing
    it to :meth:`update` until :meth:`hexdigest` returned (the writers never do: every chunk is either
    tensor memory that is not written during a save or a buffer that is not reused). Small updates while
    nothing is queued are hashed inline (no thread handoff for small files).
    """

    def __init__(self) -> None:
        self._hasher = new_hasher()
        self._last: Future[None] | None = None

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._last is None and len(data) < _OFFLOAD_BYTES:
            self._hasher.update(data)
            return
        self._last = _writer_hash.get().submit(self._hasher.update, data)

    def hexdigest(self) -> str:
        if self._last is not None:
            self._last.result()  # FIFO: every earlier update is done too
            self._last = None
        return self._hasher.hexdigest()


def new_write_hasher() -> Hasher:
    """A hasher for the write path: large chunks are hashed on a worker thread while the next is written."""
    return OverlappedHasher()


def hash_in_background(buffer: bytes | bytearray | memoryview | Any, size: int) -> Future[str]:
    """Start hashing the first ``size`` bytes of ``buffer`` on a worker thread; the future gives the digest.

    The buffer must stay unchanged until the future is done (loads decode from it meanwhile, reading only).
    Several files are hashed in parallel. For a memory map, the kernel is asked to read the next chunks
    ahead of the one being hashed (``MADV_WILLNEED``): on a cold cache the disk then streams with a deep
    queue instead of one readahead window per page fault, and memory stays bounded for any file size.
    """

    def run() -> str:
        hasher = new_hasher()
        view = memoryview(buffer)
        try:
            for start in range(0, size, _HASH_CHUNK):
                _read_ahead(buffer, start + _HASH_CHUNK, size)
                hasher.update(view[start : start + _HASH_CHUNK])
        finally:
            view.release()
        return hasher.hexdigest()

    _read_ahead(buffer, 0, size)
    return _load_hash.get().submit(run)


_HASH_CHUNK = 64 << 20
_READ_AHEAD_CHUNKS = 2


def _read_ahead(buffer: object, start: int, size: int) -> None:
    """Ask the kernel to start reading ``_READ_AHEAD_CHUNKS`` chunks of a mapping from ``start`` (async)."""
    if not isinstance(buffer, mmap.mmap) or start >= size:
        return
    length = min(_READ_AHEAD_CHUNKS * _HASH_CHUNK, size - start)
    with contextlib.suppress(OSError, ValueError, AttributeError):  # advice only; e.g. not on this platform
        buffer.madvise(mmap.MADV_WILLNEED, start, length)
