"""A streaming, hashing writer and a strict, bounded reader for safetensors files.

Layout (the safetensors format, so ``safetensors.safe_open`` reads our files unchanged)::

    8 bytes   little-endian u64 N, the header length
    N bytes   JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}
              padded with spaces so the data starts 64-byte aligned
    ...       the tensor bytes, back to back, in header order

Why our own writer instead of ``safetensors.*.save_file``: it streams each tensor's memory straight to
the file (no second full copy of the state in memory), hashes the bytes as they go out (no second pass),
and writes through any :class:`Sink` (a local file, a staging buffer, a multipart upload). Tensors whose
size is a multiple of 64 bytes come first, then the rest by element size, largest first: every tensor
starts aligned to its element size, and all of the first group (in practice nearly every tensor of a
model and its optimizer) at a 64-byte boundary of the file, so a page-aligned memory map of the file
gives them the same alignment as the framework's own allocations and a load can use them without a copy.

The reader trusts nothing: the header length, JSON, dtypes, shapes and offsets are all checked against
hard limits and the real file size before a single tensor is touched, so a hostile file cannot make us
allocate without bound or read outside the file.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple, Protocol

import numpy as np

from savegame.errors import InvalidManifestError, InvalidNameError, InvalidTensorFileError, TruncatedFileError
from savegame.format.dtypes import ITEMSIZE, numpy_dtype
from savegame.format.hashing import hash_buffer, new_write_hasher

MAX_HEADER_BYTES = 16 * 1024 * 1024
"""Largest header we write or read. Parsing a header costs up to ~15x its size in Python objects (one dict
and one record per tensor), so this bounds what a forged file can make a reader allocate (~250 MB); it
still holds ~200,000 tensors per item (safetensors itself allows 100 MiB)."""

HEADER_PARSE_FACTOR = 16
"""Upper bound of (memory allocated while parsing a header) / (header size), checked by the tests."""

MAX_NDIM = 64
MAX_DIM = 2**62
"""Bound on every dimension and on the byte size of the non-zero dimensions' product (NumPy and torch
refuse larger arrays, even empty ones, with errors of their own)."""
MAX_NAME_CHARS = 4096
"""Longest tensor name the reader accepts (the encoder writes at most ``tree.MAX_KEY_CHARS``)."""
RESERVED_NAME = "__metadata__"
"""The header key safetensors reserves for string metadata: never a tensor name."""
ALIGNMENT = 64
"""The data section starts at a multiple of this (the header is padded with spaces, as safetensors allows);
it is the alignment of torch's CPU allocations."""
_COALESCE_BYTES = 1 << 20  # small tensors are gathered into writes of about this size
_LARGE_WRITE = 64 << 20  # large tensors are written in slices of this size (bounded syscalls)


class Sink(Protocol):
    """Where a tensor file's bytes go. ``write`` must write everything it is given."""

    def write(self, data: bytes | bytearray | memoryview) -> object: ...


class TensorData(NamedTuple):
    """One tensor ready to write: its safetensors code, shape and C-contiguous little-endian bytes.

    A named tuple (immutable, as the frozen dataclass it was): a snapshot of 10,000 small tensors makes
    10,000 of them while the caller waits, and a tuple costs a fraction of a frozen dataclass's
    ``__init__``.
    """

    name: str
    code: str
    shape: tuple[int, ...]
    data: memoryview  # format "B", len == prod(shape) * ITEMSIZE[code]


@dataclass(frozen=True)
class WrittenFile:
    """What the manifest records about a tensor file."""

    bytes: int
    hash: str


class TensorInfo(NamedTuple):
    """One header entry, validated: the data lives at ``[begin, end)`` of the data section.

    A named tuple rather than a dataclass: a header can hold 200,000 of them and creating a tuple costs a
    fraction of a frozen dataclass's ``__init__``.
    """

    name: str
    code: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def order_for_alignment(tensors: Sequence[TensorData]) -> list[TensorData]:
    """File order: sizes that are multiples of :data:`ALIGNMENT` first (each then starts 64-byte aligned),
    then the rest by element size, largest first (each a multiple of its element size); stable otherwise."""

    def key(t: TensorData) -> tuple[int, int]:
        return (0, 0) if len(t.data) % ALIGNMENT == 0 else (1, -ITEMSIZE[t.code])

    return sorted(tensors, key=key)


def build_header(tensors: Sequence[TensorData], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length prefix plus the padded JSON header for ``tensors`` in the given order."""
    header: dict[str, object] = {}
    if metadata:
        header[RESERVED_NAME] = dict(metadata)
    offset = 0
    for t in tensors:
        check_tensor_name(t.name)
        if t.name in header:
            raise InvalidNameError(f"two tensors are named {t.name[:200]!r}: a tensor file holds one per name")
        end = offset + len(t.data)
        header[t.name] = {"dtype": t.code, "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(raw) > MAX_HEADER_BYTES - ALIGNMENT:
        from savegame.errors import UnsupportedTypeError

        raise UnsupportedTypeError(
            f"{len(tensors)} tensors need a safetensors header of {len(raw)} bytes, over the limit of "
            f"{MAX_HEADER_BYTES} that readers accept: split the state into more items"
        )
    pad = (-(8 + len(raw))) % ALIGNMENT
    raw += b" " * pad
    return struct.pack("<Q", len(raw)) + raw


def check_tensor_name(name: str) -> None:
    """Refuse (:class:`InvalidNameError`) a name no reader would accept (see :func:`tensor_name_problem`)."""
    problem = tensor_name_problem(name)
    if problem is not None:
        shown = name[:200].encode("utf-8", "backslashreplace").decode("utf-8")
        raise InvalidNameError(f"tensor name {shown!r} {problem}")


def tensor_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a tensor name (it is ``__metadata__``, longer than :data:`MAX_NAME_CHARS`,
    or not encodable as UTF-8: a lone surrogate), or None if it can."""
    problem = None
    if name == RESERVED_NAME:
        problem = "is reserved for the file's metadata"
    elif len(name) > MAX_NAME_CHARS:
        problem = f"has {len(name)} characters, over the {MAX_NAME_CHARS} that readers accept"
    elif not name.isascii():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            problem = "holds a lone surrogate, which UTF-8 (and so the file header) cannot encode"
    return problem


def write_tensor_file(
    sink: Sink, tensors: Sequence[TensorData], *, metadata: dict[str, str] | None = None
) -> WrittenFile:
    """Write ``tensors`` (already in file order) to ``sink``; return the size and hash of what was written.

    Small tensors are coalesced into ~1 MiB writes; large ones are written straight from their memory
    in 64 MiB slices, never copied.
    """
    hasher = new_write_hasher()  # large chunks hashed on a worker thread while the next one is written
    header = build_header(tensors, metadata)
    total = 0
    pending = bytearray(header)

    def emit(chunk: bytes | bytearray | memoryview) -> None:
        hasher.update(chunk)
        sink.write(chunk)

    for t in tensors:
        n = len(t.data)
        if n < _COALESCE_BYTES // 4:
            pending += t.data
            if len(pending) >= _COALESCE_BYTES:
                emit(pending)
                total += len(pending)
                pending = bytearray()
            continue
        if pending:
            emit(pending)
            total += len(pending)
            pending = bytearray()
        for start in range(0, n, _LARGE_WRITE):
            emit(t.data[start : start + _LARGE_WRITE])
        total += n
    if pending:
        emit(pending)
        total += len(pending)
    return WrittenFile(bytes=total, hash=hasher.hexdigest())


# ---------------------------------------------------------------------------------------------------
# Reading


def _fail(where: str, what: str) -> InvalidTensorFileError:
    return InvalidTensorFileError(f"{where}: {what}")


def parse_header(prefix_and_header: bytes, file_size: int, where: str) -> tuple[int, list[TensorInfo]]:
    """Validate a header against ``file_size``; return the data section's start and the entries.

    ``prefix_and_header`` holds the 8-byte prefix followed by (at least) the header bytes.
    """
    if file_size < 8 or len(prefix_and_header) < 8:
        raise TruncatedFileError(f"{where}: {file_size} bytes, too short for a tensor file header")
    (n,) = struct.unpack("<Q", prefix_and_header[:8])
    if n > MAX_HEADER_BYTES:
        raise _fail(where, f"header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if 8 + n > file_size:
        raise TruncatedFileError(f"{where}: header length {n} runs past the end of the {file_size}-byte file")
    raw = prefix_and_header[8 : 8 + n]
    if len(raw) != n:
        raise TruncatedFileError(f"{where}: header cut short")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(where, f"header is not valid JSON ({exc.__class__.__name__}: {str(exc)[:200]})") from None
    if not isinstance(header, dict):
        raise _fail(where, "header is not a JSON object")
    data_start = 8 + n
    data_len = file_size - data_start
    infos: list[TensorInfo] = []
    for name, entry in header.items():
        if name == RESERVED_NAME:
            if not isinstance(entry, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in entry.items()
            ):
                raise _fail(where, "__metadata__ must map strings to strings")
            continue
        infos.append(_parse_entry(name, entry, where))
    expected = _contiguous_end(infos)
    if expected is None:  # not in file order (files written by others may list tensors in any order)
        infos.sort(key=lambda i: (i.begin, i.end))
        expected = 0
        for info in infos:
            if info.begin != expected:
                kind = "overlaps the previous tensor" if info.begin < expected else "leaves a gap before it"
                raise _fail(where, f"tensor {info.name!r} at offset {info.begin} {kind} (expected {expected})")
            expected = info.end
    if expected != data_len:
        if expected > data_len:
            raise TruncatedFileError(
                f"{where}: tensors need {expected} data bytes but the file holds {data_len}"
            )
        raise _fail(where, f"{data_len - expected} unexplained bytes after the last tensor")
    return data_start, infos


def _contiguous_end(infos: list[TensorInfo]) -> int | None:
    """The end of the last tensor if ``infos`` are back to back in list order from offset 0, else None."""
    expected = 0
    for info in infos:
        if info.begin != expected:
            return None
        expected = info.end
    return expected


def _parse_entry(name: str, entry: object, where: str) -> TensorInfo:
    """Validate one header entry: the common case (a known dtype, a non-empty shape of plain ints whose
    byte size matches the offsets) in one pass; anything else through :func:`_check_entry`."""
    if type(entry) is dict and len(name) <= MAX_NAME_CHARS:
        code = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        itemsize = ITEMSIZE.get(code) if type(code) is str else None
        if itemsize and type(shape) is list and len(shape) <= MAX_NDIM and type(offsets) is list and len(offsets) == 2:
            begin, end = offsets
            if type(begin) is int and type(end) is int and 0 <= begin <= end:
                count = itemsize
                for d in shape:
                    if type(d) is not int or not 0 <= d < MAX_DIM:
                        break
                    count *= d
                else:
                    if count and count == end - begin:
                        return TensorInfo(name, str(code), tuple(shape), begin, end)
    return _check_entry(name, entry, where)


def _check_entry(name: str, entry: object, where: str) -> TensorInfo:
    """The thorough check of one header entry, with a specific message for each way it can be wrong."""
    if len(name) > MAX_NAME_CHARS:
        raise _fail(where, f"tensor name of {len(name)} characters exceeds {MAX_NAME_CHARS}")
    if not isinstance(entry, dict):
        raise _fail(where, f"entry for {name!r} is not an object")
    code = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(code, str) or code not in ITEMSIZE:
        raise _fail(where, f"tensor {name!r} has unsupported dtype {str(code)[:40]!r}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise _fail(where, f"tensor {name!r} has an invalid shape")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_DIM for d in shape):
        raise _fail(where, f"tensor {name!r} has an invalid dimension in shape {str(shape)[:100]}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise _fail(where, f"tensor {name!r} has invalid data_offsets")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise _fail(where, f"tensor {name!r} has data_offsets [{begin}, {end}] out of order")
    count = 1
    for d in shape:
        count *= d  # Python ints: no overflow; the comparison below bounds it
    if count * ITEMSIZE[code] != end - begin:
        raise _fail(
            where,
            f"tensor {name!r}: shape {shape} x {code} needs {count * ITEMSIZE[code]} bytes "
            f"but data_offsets give {end - begin}",
        )
    if count == 0:  # an empty tensor: its other dimensions must still make an array NumPy/torch can build
        nonzero = 1
        for d in shape:
            nonzero *= d or 1
        if nonzero * ITEMSIZE[code] > MAX_DIM:
            raise _fail(where, f"empty tensor {name!r} has a shape too large for any array: {str(shape)[:100]}")
    return TensorInfo(name=name, code=code, shape=tuple(shape), begin=begin, end=end)


# Filesystems on which ``write()`` always allocates what it writes (zeros included), so a hole in a data
# file means it was not written by savegame: ext2/3/4, XFS, tmpfs. Others (ZFS and btrfs with compression,
# network filesystems) may store written zeros as holes, so a legitimate file can look sparse there.
_DENSE_FILESYSTEMS = frozenset({0xEF53, 0x58465342, 0x01021994})
_SPARSE_SLACK = 1 << 20  # allocation may trail the size by a partial block or two (inline data, tails)


def check_allocated(fd: int, size: int, where: str) -> None:
    """Refuse (:class:`TruncatedFileError`) a data file whose bytes are mostly not stored (a sparse file).

    savegame writes every byte of its files, so on a filesystem where writes always allocate (see
    ``_DENSE_FILESYSTEMS``) a file with far fewer allocated bytes than its size was made another way
    (``truncate``): a few KiB on disk that a forged manifest describes as a 2 GiB tensor would otherwise
    cost its full size in memory to hash and then to load. Elsewhere nothing is refused (a compressing
    filesystem may store written zeros as holes). One ``fstat`` for every file; the filesystem is only
    looked up for a file that is sparse.
    """
    allocated = getattr(os.fstat(fd), "st_blocks", None)
    if allocated is None or allocated * 512 + _SPARSE_SLACK >= size or _filesystem_type(fd) not in _DENSE_FILESYSTEMS:
        return
    raise TruncatedFileError(
        f"{where}: only {allocated * 512} of its {size} bytes are stored (a sparse file; savegame writes every "
        "byte, so the file was not written by it): refusing to read holes as data. A copy made with rsync -S, "
        "cp --sparse=always or tar -S turns runs of zeros into holes: copy the checkpoint again without that "
        "option (cp --sparse=never) to load it"
    )


def _filesystem_type(fd: int) -> int | None:
    """``f_type`` of ``fstatfs(fd)`` on Linux (None elsewhere or if it cannot be had)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        class _StatFs(ctypes.Structure):
            _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 256)]

        libc = ctypes.CDLL(None, use_errno=True)
        buf = _StatFs()
        if libc.fstatfs(fd, ctypes.byref(buf)) != 0:
            return None
        return int(buf.f_type) & 0xFFFFFFFF
    except (OSError, AttributeError):
        return None


class TensorFileReader:
    """A validated tensor file held in a buffer. Arrays it returns are views of that buffer.

    ``TensorFileReader(path)`` memory-maps a local file copy-on-write (``ACCESS_COPY``): arrays are
    writable, writes never reach the file, and pages are read from the page cache only when touched.
    :meth:`from_buffer` wraps bytes that are already in memory (a file downloaded from object storage,
    whose hash was checked on that very buffer). Either way the header is validated against the
    buffer's real length before any tensor is touched. Views are aligned to their element size only;
    :mod:`savegame.api` copies them into fresh memory unless the consumer copies anyway.
    """

    path: str | None
    where: str
    size: int
    data_start: int
    tensors: dict[str, TensorInfo]

    def __init__(self, path: str | os.PathLike[str], *, where: str | None = None) -> None:
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) == 8:
                (n,) = struct.unpack("<Q", prefix)
                if n <= MAX_HEADER_BYTES and 8 + n <= size:
                    prefix += f.read(n)
            data_start, infos = parse_header(prefix, size, where or self.path)
            mapping: mmap.mmap | None = None
            if size > 0:
                mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
        self._setup(mapping, size, data_start, infos, where or self.path)

    @classmethod
    def from_buffer(cls, buffer: bytes | bytearray | memoryview | mmap.mmap, *, where: str) -> TensorFileReader:
        """Validate and wrap a whole tensor file that is already in memory (no copy).

        ``buffer`` must hold exactly the file's bytes and must not change while the reader is used; a
        ``bytearray`` (or writable mapping) gives writable arrays, ``bytes`` read-only ones.
        """
        view = memoryview(buffer)
        size = view.nbytes
        view.release()
        prefix = bytes(buffer[:8])
        if len(prefix) == 8:
            (n,) = struct.unpack("<Q", prefix)
            if n <= MAX_HEADER_BYTES and 8 + n <= size:
                prefix = bytes(buffer[: 8 + n])
        data_start, infos = parse_header(prefix, size, where)
        reader = cls.__new__(cls)
        reader.path = None
        reader._setup(buffer if size > 0 else None, size, data_start, infos, where)
        return reader

    def _setup(
        self, buffer: bytes | bytearray | memoryview | mmap.mmap | None, size: int, data_start: int,
        infos: list[TensorInfo], where: str,
    ) -> None:
        self.where = where
        self.size = size
        self.data_start = data_start
        self._buffer = buffer
        self.tensors = {i.name: i for i in infos}
        # One uint8 view of the whole buffer, sliced per tensor (cheaper than a np.frombuffer each).
        self._bytes = np.frombuffer(buffer, dtype=np.uint8) if buffer is not None else np.empty(0, dtype=np.uint8)
        # The address via __array_interface__ (C) rather than .ctypes (a Python helper object per call).
        self._address = int(self._bytes.__array_interface__["data"][0]) if buffer is not None else 0

    def aligned(self, name: str, alignment: int = ALIGNMENT) -> bool:
        """Whether tensor ``name``'s bytes start at a multiple of ``alignment`` in memory."""
        return (self._address + self.data_start + self.tensors[name].begin) % alignment == 0

    def hash(self, chunk_bytes: int | None = None) -> str:
        """The file's hash as a manifest with ``hash_chunk_bytes = chunk_bytes`` records it (reads every byte;
        ``None``: one stream over the whole file, as formats 1 and 2)."""
        return hash_buffer(self._buffer if self._buffer is not None else b"", self.size, chunk_bytes)

    def raw(self, name: str) -> np.ndarray:
        """The bytes of tensor ``name`` as a 1-D uint8 array (a view of the buffer, no copy)."""
        info = self.tensors[name]
        if info.nbytes == 0 or self._buffer is None:
            return np.empty(0, dtype=np.uint8)
        start = self.data_start + info.begin
        return self._bytes[start : start + info.nbytes]

    def array(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a NumPy array of its stored dtype and shape (a view, no copy)."""
        info = self.tensors[name]
        return self.raw(name).view(numpy_dtype(info.code)).reshape(info.shape)

    def names(self) -> Iterable[str]:
        return self.tensors.keys()


def read_exact(f: BinaryIO, n: int) -> bytes:
    """Read exactly ``n`` bytes or fewer at end of file."""
    chunks = []
    while n > 0:
        chunk = f.read(n)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


class ItemTensors(TensorFileReader):
    """The arrays of one item spread over several opened tensor files (an incremental checkpoint: its own
    file plus linked files of a previous checkpoint), seen as one reader.

    ``linked`` says which keys each other file serves for the item (:attr:`ItemEntry.linked
    <savegame.format.manifest.ItemEntry.linked>`); every other key comes from ``own``. A linked key missing
    from its file, or one that ``own`` also holds, is refused (:class:`InvalidManifestError`): one key, one
    place. Tensors of a linked file that the item does not name are not visible.
    """

    def __init__(self, own: TensorFileReader, linked: Mapping[str, tuple[TensorFileReader, tuple[str, ...]]]) -> None:
        self.path = None
        self.where = own.where
        self.size = own.size
        self.data_start = own.data_start
        self._buffer = None
        self._address = 0
        self._parts: dict[str, TensorFileReader] = {}
        tensors = dict(own.tensors)
        for file, (reader, keys) in linked.items():
            for key in keys:
                if key in own.tensors:
                    raise InvalidManifestError(f"{own.where}: array {key[:80]!r} is both in it and linked from {file}")
                info = reader.tensors.get(key)
                if info is None:
                    raise InvalidManifestError(f"{reader.where}: array {key[:80]!r} linked from it is not in it")
                tensors[key] = info
                self._parts[key] = reader
        self.tensors = tensors
        self._own = own

    def _part(self, name: str) -> TensorFileReader:
        return self._parts.get(name, self._own)

    def aligned(self, name: str, alignment: int = ALIGNMENT) -> bool:
        return self._part(name).aligned(name, alignment)

    def hash(self, chunk_bytes: int | None = None) -> str:
        raise TypeError("an item spread over several files has no single file hash")

    def raw(self, name: str) -> np.ndarray:
        return self._part(name).raw(name)
