"""Content hashes for checkpoint files.

We use XXH3-128 (the ``xxhash`` package): it detects accidental corruption (bit flips, torn or
truncated writes, swapped files) with a 2**-128 collision chance and hashes at ~26-29 GB/s on one core
of the development machine, against ~1.8 GB/s for ``hashlib.sha256`` (one-shot hashes of a 256 MiB
buffer; BLAKE3 is published at ~4-5 GB/s per core). It is not a defence against a forger who can also
rewrite the manifest; nothing that stores its own hash next to the data can be.

Since format 3 a file longer than the manifest's ``hash_chunk_bytes`` (64 MiB when written) is hashed in
chunks: its hash is the XXH3-128 of the 16-byte digests of its consecutive chunks, so the chunks of one
large file are hashed in parallel when it is loaded or verified (one XXH3 stream runs at ~12 GB/s on the
development machine: ~90 ms for a 1 GiB item before anything could be restored). A file of at most one
chunk has the plain XXH3-128 of its bytes, as in formats 1 and 2 (``hash_chunk_bytes`` absent: whole files).
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
from concurrent.futures import Future
from typing import Any, Protocol

import xxhash

from savegame._util.workers import LazyPool

ALGORITHM = "xxh3_128"
"""Name recorded in every manifest, so a future format can change the algorithm."""

HEX_LENGTH = 32

HASH_CHUNK_BYTES = 64 << 20
"""The chunk size this savegame hashes files with (written to each manifest as ``hash_chunk_bytes``)."""
MIN_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 1 << 40
"""The chunk sizes a manifest may declare (powers of two): bounds the number of digests a reader keeps."""


class Hasher(Protocol):
    """The incremental hashing interface (``update`` then ``hexdigest``)."""

    def update(self, data: bytes | bytearray | memoryview) -> None: ...

    def hexdigest(self) -> str: ...


def hash_bytes(data: bytes | memoryview) -> str:
    """The hex digest of ``data`` in one call."""
    return xxhash.xxh3_128_hexdigest(data)


def array_hash(code: str, shape: tuple[int, ...], data: bytes | bytearray | memoryview | Any) -> str:
    """The hash of one array as incremental checkpoints record it: its safetensors dtype code, its shape
    and its bytes (two arrays with equal bytes but another dtype or shape hash differently)."""
    hasher = xxhash.xxh3_128()
    hasher.update(f"{code}{list(shape)}".encode() + b"\0")
    hasher.update(data)
    return hasher.hexdigest()


def _combine(digests: list[bytes]) -> str:
    """A file's hash from its chunks' digests (one chunk: that chunk's hash)."""
    if len(digests) == 1:
        return digests[0].hex()
    return xxhash.xxh3_128_hexdigest(b"".join(digests))


class FileHasher:
    """The hash of a data file as its manifest defines it, computed incrementally.

    ``chunk_bytes``: the manifest's ``hash_chunk_bytes`` (None for formats 1 and 2: the whole file in one
    stream). Updates may be of any size; they are split at chunk boundaries.
    """

    def __init__(self, chunk_bytes: int | None) -> None:
        self._chunk = chunk_bytes
        self._current = xxhash.xxh3_128()
        self._filled = 0
        self._digests: list[bytes] = []

    def update(self, data: bytes | bytearray | memoryview) -> None:
        chunk = self._chunk
        if chunk is None:
            self._current.update(data)
            return
        view = memoryview(data).cast("B")
        n, pos = view.nbytes, 0
        while pos < n:
            if self._filled == chunk:
                self._digests.append(self._current.digest())
                self._current = xxhash.xxh3_128()
                self._filled = 0
            take = min(chunk - self._filled, n - pos)
            self._current.update(view[pos : pos + take])
            self._filled += take
            pos += take

    def hexdigest(self) -> str:
        if not self._digests:
            return self._current.hexdigest()
        return _combine([*self._digests, self._current.digest()])


_OFFLOAD_BYTES = 4 << 20
"""Chunks at least this large are hashed on the worker thread (xxhash releases the GIL for them)."""

_READ_WORKERS = max(1, min(8, os.cpu_count() or 1))
_writer_hash = LazyPool("savegame-hash", 1)
"""The write path's single FIFO hashing thread (updates of one file must run in order)."""
_load_hash = LazyPool("savegame-verify", _READ_WORKERS)
"""The load path's hashing threads: the files of a checkpoint, and the chunks of a large file, are hashed
in parallel (up to 8 threads: XXH3 on more cores would only compete for memory bandwidth)."""


class OverlappedHasher:
    """An incremental hasher whose large updates run on a worker thread, overlapping the caller's writes.

    Updates are applied in call order (one FIFO worker). The caller must not modify a buffer after passing
    it to :meth:`update` until :meth:`hexdigest` returned (the writers never do: every chunk is either
    tensor memory that is not written during a save or a buffer that is not reused). Small updates while
    nothing is queued are hashed inline (no thread handoff for small files).
    """

    def __init__(self, chunk_bytes: int | None) -> None:
        self._hasher = FileHasher(chunk_bytes)
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
    """A hasher for the write path (chunks of :data:`HASH_CHUNK_BYTES`, which the manifest records): large
    updates are hashed on a worker thread while the next one is written."""
    return OverlappedHasher(HASH_CHUNK_BYTES)


class PendingHash:
    """A file hash being computed on worker threads (:func:`hash_in_background`): each lane hashes every
    ``len(lanes)``-th chunk, so lane ``i`` holds the digests of chunks ``i, i + len(lanes), ...``."""

    def __init__(self, lanes: list[Future[list[bytes]]]) -> None:
        self._lanes = lanes

    def result(self) -> str:
        """Wait for every lane (none keeps running behind an error) and return the file's hash."""
        per_lane: list[list[bytes]] = []
        first: BaseException | None = None
        for lane in self._lanes:
            try:
                per_lane.append(lane.result())
            except BaseException as exc:  # re-raised once every lane finished
                first = first or exc
        if first is not None:
            raise first
        return _combine([d for row in itertools.zip_longest(*per_lane) for d in row if d is not None])


def hash_in_background(buffer: bytes | bytearray | memoryview | Any, size: int, chunk_bytes: int | None) -> PendingHash:
    """Start hashing the first ``size`` bytes of ``buffer`` on worker threads, as :class:`FileHasher` would.

    The buffer must stay unchanged until the result is in (loads decode from it meanwhile, reading only).
    The files of a checkpoint, and the chunks of a file larger than ``chunk_bytes`` (in at most one lane
    per worker thread, whatever the file's size), are hashed in parallel. For a memory map, the kernel is
    asked to read ahead of the part being hashed (``MADV_WILLNEED``): on a cold cache the disk then streams
    with a deep queue instead of one readahead window per page fault, and memory stays bounded.
    """

    def whole() -> list[bytes]:
        hasher = xxhash.xxh3_128()
        with memoryview(buffer) as view:
            for start in range(0, size, _HASH_CHUNK):
                _read_ahead(buffer, start + _HASH_CHUNK, size)
                hasher.update(view[start : start + _HASH_CHUNK])
        return [hasher.digest()]

    def lane(first: int, stride: int) -> list[bytes]:
        assert chunk_bytes is not None
        digests = []
        with memoryview(buffer) as view:
            for start in range(first * chunk_bytes, size, stride * chunk_bytes):
                end = min(start + chunk_bytes, size)
                _read_ahead(buffer, end, size)
                digests.append(xxhash.xxh3_128_digest(view[start:end]))
        return digests

    _read_ahead(buffer, 0, size)
    pool = _load_hash.get()
    if chunk_bytes is None or size <= chunk_bytes:
        return PendingHash([pool.submit(whole)])
    lanes = min(_READ_WORKERS, -(-size // chunk_bytes))
    return PendingHash([pool.submit(lane, i, lanes) for i in range(lanes)])


def hash_buffer(buffer: bytes | bytearray | memoryview | Any, size: int, chunk_bytes: int | None) -> str:
    """The hash of the first ``size`` bytes of ``buffer`` as :class:`FileHasher` defines it; large buffers
    are hashed on the worker threads (the chunks of a large file in parallel)."""
    if size < _OFFLOAD_BYTES:
        hasher = FileHasher(chunk_bytes)
        with memoryview(buffer) as view:
            hasher.update(view[:size])
        return hasher.hexdigest()
    return hash_in_background(buffer, size, chunk_bytes).result()


_HASH_CHUNK = 64 << 20
_READ_AHEAD_CHUNKS = 2


def _read_ahead(buffer: object, start: int, size: int) -> None:
    """Ask the kernel to start reading ``_READ_AHEAD_CHUNKS`` chunks of a mapping from ``start`` (async)."""
    if not isinstance(buffer, mmap.mmap) or start >= size:
        return
    length = min(_READ_AHEAD_CHUNKS * _HASH_CHUNK, size - start)
    with contextlib.suppress(OSError, ValueError, AttributeError):  # advice only; e.g. not on this platform
        buffer.madvise(mmap.MADV_WILLNEED, start, length)
