"""The functional API: ``save``, ``load``, ``verify``, ``read_manifest``.

``save`` captures the state (live objects -> nested state), encodes each top-level item into a skeleton
and its arrays, streams the arrays into one safetensors file per item inside a storage transaction, and
commits with the manifest last. ``load`` reads the manifest, checks every file it touches (size, hash,
header) and rebuilds the state, or restores it into live objects in place.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

from .adapters import torch_available, zero_copy_for
from .capture import LoadReport, restore_items
from .checks import check_item_value, check_tensor_node, tag_checkers
from .dtypes import logical_itemsize
from .errors import (
    ConfigError,
    HashMismatchError,
    InvalidManifestError,
    MissingFileError,
    StateMismatchError,
    TruncatedFileError,
)
from .gcpause import gc_paused
from .hashing import hash_buffer, hash_in_background
from .manifest import ItemEntry, Manifest, parse_manifest
from .progress import ProgressBar
from .storage import LocalStorage, RemoteStorage, is_url, locate
from .storage.base import MANIFEST, CheckpointReader, CheckpointRef, Location, PathLike
from .storage.local import LocalCheckpointReader, open_local_checkpoint
from .tensorfile import TensorFileReader, TensorInfo
from .tree import MAX_DEPTH, Decoder, Path, Where, format_path, numpy_from_node, valid_shape
from .writer import EncodedItem, encode_state, save_in_background, save_now, write_items

__all__ = ["EncodedItem", "encode_state", "load", "read_manifest", "save", "verify", "write_items"]

log = logging.getLogger("savegame")
_SAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")


# ---------------------------------------------------------------------------------------------------
# Save (the write path lives in writer.py and background.py)


def save(
    path: PathLike,
    state: Mapping[str, Any],
    *,
    metadata: Mapping[str, Any] | None = None,
    progress: Mapping[str, Any] | None = None,
    overwrite: bool = True,
    background: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """Save ``state`` as the checkpoint directory ``path``, atomically and durably.

    ``state`` maps item names to live objects (``nn.Module``, optimizers, schedulers, ``GradScaler``,
    :class:`savegame.RNGState`, generators, any :class:`savegame.Stateful`) or plain nested data (dicts,
    lists, tuples, numbers, strings, bytes, NumPy arrays, torch tensors). Each item with arrays becomes one
    safetensors file; the rest lives in the manifest.

    ``metadata``: JSON-like data stored in the manifest (``read_manifest(path).metadata``).
    ``progress``: JSON-like training progress, a mapping (epoch, step, metrics...), used by the
    Checkpointer; it is not a progress bar (that one shows on a terminal by itself for saves over 2 s;
    ``SAVEGAME_PROGRESS=1`` forces it, ``=0`` turns it off).
    ``overwrite``: replace an existing savegame checkpoint at ``path`` (atomically: the old one stays
    complete until the new one is committed); with False an existing checkpoint raises :class:`CommitError`.
    Anything else at ``path`` (a file, a symbolic link, a non-empty folder that is not a savegame
    checkpoint) is never replaced: :class:`OccupiedPathError`, and it is left untouched. An empty folder
    may be saved into.
    ``background``: return as soon as the state is copied to host memory and write it in a background
    thread; returns a :class:`~savegame.background.PendingSave` whose ``result()`` waits for the commit
    and returns the manifest (or raises :class:`BackgroundSaveError`). At most one background save is in
    flight: the next one first waits for it (and raises the error of a failed one nobody collected with
    ``result()``). A save not waited for is finished at interpreter exit (or its failure printed on stderr).
    ``path`` may be an fsspec URL (``s3://bucket/run/NAME``; ``storage_options`` go to fsspec): the data
    is uploaded first and the manifest last as the commit marker (see :mod:`savegame.storage.remote`).

    Returns the :class:`Manifest` (sync). When a sync ``save`` returns (or a background save's
    ``result()`` does), the checkpoint is on stable storage (files, manifest and the directory entry
    were fsynced) and a power loss cannot take it back. If it fails, nothing new is visible at ``path``
    and whatever was there before is unchanged.
    """
    if background:
        from .background import default_writer

        storage, name = locate(path, storage_options=storage_options)
        if isinstance(storage, (LocalStorage, RemoteStorage)):
            storage.check_target(name, overwrite=overwrite)  # raised here, not only by the handle later
        return save_in_background(
            default_writer(), storage, name, state, metadata=metadata, progress=progress, overwrite=overwrite
        )
    with gc_paused():
        storage, name = locate(path, storage_options=storage_options)  # a local directory or an fsspec URL
        _, manifest = save_now(storage, name, state, metadata=metadata, progress=progress, overwrite=overwrite)
    return manifest


# ---------------------------------------------------------------------------------------------------
# Read


def _checkpoint_dir(path: PathLike) -> str:
    """The absolute path of a committed local checkpoint directory (raises if it is not one)."""
    return open_local_checkpoint(path).where




def open_checkpoint(
    path: Location, *, storage_options: Mapping[str, Any] | None = None, check: bool = True
) -> CheckpointReader:
    """Open a committed checkpoint for reading, wherever it lives (an opened reader is returned as is).

    ``check=False`` skips the "is this a committed checkpoint" checks for local paths (the caller read
    its manifest already).
    """
    if isinstance(path, CheckpointRef):
        return path.storage.reader(path.name)
    if not isinstance(path, (str, os.PathLike)):
        return path
    if is_url(path):
        storage, name = locate(path, storage_options=storage_options)
        return storage.reader(name)
    if storage_options:
        raise ConfigError(f"storage_options apply to URLs (s3://...), not to the local path {os.fspath(path)!r}")
    if not check:
        return LocalCheckpointReader(os.path.abspath(os.fspath(path)))
    return open_local_checkpoint(path)


def _manifest_of(checkpoint: CheckpointReader) -> Manifest:
    return parse_manifest(checkpoint.manifest_bytes(), checkpoint.file_where(MANIFEST))


def read_manifest(path: Location, *, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Read and validate a checkpoint's manifest (no tensor data is read).

    ``path``: a local path, an fsspec URL (``s3://bucket/run/NAME``; ``storage_options`` go to fsspec)
    or a :class:`~savegame.storage.CheckpointRef`.
    """
    checkpoint = open_checkpoint(path, storage_options=storage_options)
    try:
        return _manifest_of(checkpoint)
    finally:
        _close_if_opened(checkpoint, path)


def _close_if_opened(checkpoint: CheckpointReader, path: Location) -> None:
    """Release a reader this module opened for ``path`` (a reader the caller passed in stays open)."""
    if checkpoint is not path:
        close = getattr(checkpoint, "close", None)
        if callable(close):
            close()


_DEFER_HASH_BYTES = 1 << 20
"""Files at least this large are hashed on a worker thread when the caller collects deferred checks."""


def open_file(
    checkpoint: Location, manifest: Manifest, file: str, *, verify: bool,
    deferred: list[Callable[[], None]] | None = None,
) -> TensorFileReader:
    """Open a data file of a checkpoint: exists, exact size, hash (if ``verify``), valid header.

    The whole file is one buffer: a copy-on-write memory map for a local file (pages are read when
    touched), a downloaded buffer for a remote one. The hash is computed on that same buffer, so what
    was verified is exactly what is decoded.

    ``deferred``: when given, the hash of a large file is computed on a worker thread while the caller
    decodes, and a check that raises :class:`HashMismatchError` is appended to it; the caller must run
    every check (:func:`_run_checks`) before it uses or returns anything decoded from the file. A header
    that does not parse is reported as the hash mismatch it is, if it is one.
    """
    reader = open_checkpoint(checkpoint, check=False)
    entry = manifest.files[file]
    try:
        size = reader.file_size(file)
    except FileNotFoundError:
        raise MissingFileError(
            f"{reader.file_where(file)}: listed in the manifest but missing (or not a regular file)"
        ) from None
    where = reader.file_where(file)
    if size != entry.bytes:
        raise TruncatedFileError(f"{where}: {size} bytes, the manifest says {entry.bytes}")
    try:
        buffer = reader.read_file(file, size)
    except FileNotFoundError:
        raise MissingFileError(f"{where}: listed in the manifest but vanished while being read") from None
    if verify and deferred is not None and size >= _DEFER_HASH_BYTES:
        pending = hash_in_background(buffer, size, manifest.hash_chunk_bytes)
        expected = entry.hash

        def check() -> None:
            if pending.result() != expected:
                raise HashMismatchError(f"{where}: content hash differs from the manifest (file is corrupted)")

        deferred.append(check)
        try:
            return TensorFileReader.from_buffer(buffer, where=where)
        except BaseException:
            check()  # a damaged header is a hash mismatch: report that
            raise
    if verify and hash_buffer(buffer, size, manifest.hash_chunk_bytes) != entry.hash:
        raise HashMismatchError(f"{where}: content hash differs from the manifest (file is corrupted)")
    return TensorFileReader.from_buffer(buffer, where=where)


ZeroCopy = bool | Literal["aligned"]
"""Whether decoded arrays may be views of the file's buffer: never (``False``: fresh memory), always
(``True``: the consumer copies them anyway, e.g. into a module's parameters), or ``"aligned"``: views where
they are 64-byte aligned in memory (what a fresh allocation would give), copies elsewhere."""


class _ItemDecoder:
    """Resolves array nodes of one item against its tensor file; identical keys give the same object."""

    def __init__(
        self, reader: TensorFileReader | None, item: str, *, map_location: Any, as_numpy: bool, zero_copy: ZeroCopy
    ) -> None:
        self.reader = reader
        self.tensors = reader.tensors if reader is not None else {}
        self.item = item
        self.map_location = map_location
        self.as_numpy = as_numpy
        self.zero_copy = zero_copy
        self.cache: dict[tuple[str, str], object] = {}
        self.make_tensor: Callable[..., object] | None = None
        if not as_numpy:
            from .adapters.torch import tensor_from_bytes

            self.make_tensor = tensor_from_bytes

    def __call__(self, node: dict[str, Any], path: Path) -> object:
        tag, key = node["$"], node["key"]
        cached = self.cache.get((tag, key))
        if cached is not None:
            return cached
        info = self.tensors.get(key)
        if info is None or self.reader is None:
            raise InvalidManifestError(f"{format_path(path)}: array {key!r} is not in the item's tensor file")
        raw = self.reader.raw(key)
        zero_copy = self.zero_copy
        if zero_copy is not True and not (zero_copy == "aligned" and self.reader.aligned(key)):
            raw = _aligned_copy(raw, torch_memory=tag == "tensor" and not self.as_numpy)
        value: object
        if tag == "tensor" and self.make_tensor is not None:
            value = self.make_tensor(node, raw, info.code, info.shape, Where(path), self.map_location)
        else:
            value = numpy_from_node(node, raw, info.code, info.shape, Where(path))
        self.cache[(tag, key)] = value
        return value


def _aligned_copy(raw: Any, *, torch_memory: bool) -> Any:
    """Copy mapped bytes into freshly allocated memory.

    Views of the file mapping are only aligned to their element size; vectorised kernels (dot products,
    reductions) can round differently on memory with another alignment, which would break bit-exact
    resume. Fresh allocations have the alignment the framework's own tensors have (64 bytes in torch).
    """
    if torch_memory:
        import torch

        dest = torch.empty(raw.size, dtype=torch.uint8).numpy()
    else:
        import numpy as np

        dest = np.empty(raw.size, dtype=np.uint8)
    dest[...] = raw
    return dest


@gc_paused()
def decode_item(
    checkpoint: Location, manifest: Manifest, name: str, *, verify: bool, map_location: Any = None,
    as_numpy: bool | None = None, zero_copy: ZeroCopy = False, storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """Read one item of a checkpoint back into nested state.

    ``checkpoint``: an opened reader, a :class:`~savegame.storage.CheckpointRef`, a URL or a local path
    (whose manifest the caller already read as ``manifest``).
    """
    entry = manifest.items[name]
    source = open_checkpoint(checkpoint, storage_options=storage_options, check=False)
    try:
        reader = open_file(source, manifest, entry.file, verify=verify) if entry.file else None
    finally:
        _close_if_opened(source, checkpoint)
    return decode_opened(reader, manifest, name, map_location=map_location, as_numpy=as_numpy, zero_copy=zero_copy)


def decode_opened(
    reader: TensorFileReader | None, manifest: Manifest, name: str, *, map_location: Any = None,
    as_numpy: bool | None = None, zero_copy: ZeroCopy = False,
) -> Any:
    """Decode item ``name`` whose tensor file (if any) is already open and checked."""
    entry = manifest.items[name]
    # A module's or optimizer's state holds tensors: no need to walk its skeleton to find out.
    has_tensors = entry.kind.startswith("torch.") or _has_torch_node(entry.skeleton, 0)
    numpy_only = as_numpy if as_numpy is not None else not (has_tensors and torch_available())
    tags = {}
    if not numpy_only:
        from .adapters.torch import decode_tags

        tags = decode_tags()
    resolver = _ItemDecoder(reader, name, map_location=map_location, as_numpy=numpy_only, zero_copy=zero_copy)
    decoder = Decoder(resolve=resolver, extra_tags=tags)
    value = decoder.decode(entry.skeleton, (name,))
    check_item_value(entry.kind, value, name)
    return value


def _has_torch_node(node: Any, depth: int) -> bool:
    """Whether a skeleton holds torch values (tensors, dtypes, sizes, devices)."""
    if depth > MAX_DEPTH:
        return False
    if isinstance(node, list):
        return any(_has_torch_node(v, depth + 1) for v in node)
    if isinstance(node, dict):
        tag = node.get("$")
        if tag == "tensor" or (isinstance(tag, str) and tag.startswith("torch.")):
            return True
        return any(_has_torch_node(v, depth + 1) for v in node.values())
    return False


@gc_paused()
def load(
    path: Location,
    target: Mapping[str, Any] | None = None,
    *,
    map_location: Any = None,
    strict: bool = True,
    verify: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """Load a checkpoint.

    Without ``target``: return the nested state, ``{item: value}``. Tensors saved from torch come back as
    torch tensors when torch is installed (NumPy arrays otherwise), in freshly allocated memory that does
    not depend on the files.

    With ``target`` (a dict of items, e.g. ``{"model": model, "optimizer": opt, "epoch": 0}``): restore
    each in place and return a :class:`LoadReport`. The target is updated the way
    ``torch.distributed.checkpoint.load`` updates its state dict: live objects get their state in
    place, dicts and lists are filled in place (recursively), other values (``"epoch": 0``, tuples) are
    replaced in the dict or list that holds them, and only once the whole state matched (see
    :func:`savegame.capture.restore_items` for every case). Items of the target that hold no live
    object are also returned in ``report.state``, and so are the items of the checkpoint not in
    ``target`` if they hold no arrays (the others are not read at all). Every file's hash is checked
    before any target is changed. A module
    copies the values into its parameters; a torch optimizer keeps the tensors it is given, so its state
    becomes views of the privately mapped file where they are 64-byte aligned (no copy; training writes
    copy each page on first write and never reach the file), fresh memory elsewhere.

    ``map_location``: like ``torch.load``: a device (``"cpu"``, ``"cuda:1"``), a dict from saved to new
    device, or ``fn(tensor, saved_device) -> tensor``. ``None`` puts tensors back on the device they were
    saved from when it exists (CPU otherwise, with a warning).
    ``strict``: refuse to load into a target when keys are missing, unexpected, shaped differently or
    of another type (:class:`StateMismatchError`, raised before anything is changed); ``strict=False``
    loads what matches and lists the rest in the report.
    ``verify``: check each file's content hash before using it (XXH3, ~20 GB/s).
    ``path`` may be an fsspec URL (``s3://bucket/run/NAME``, ``storage_options`` go to fsspec): each file
    is then downloaded into memory with parallel ranged reads and its hash checked on that buffer.
    """
    directory = open_checkpoint(path, storage_options=storage_options)
    try:
        return _load(directory, target, map_location=map_location, strict=strict, verify=verify)
    finally:
        _close_if_opened(directory, path)


def _load(
    directory: CheckpointReader, target: Mapping[str, Any] | None, *, map_location: Any, strict: bool, verify: bool
) -> Any:
    """Load with a progress bar (on a terminal, for loads over ~2 s) and one log line with the throughput."""
    manifest = _manifest_of(directory)
    started = time.perf_counter()
    wanted = manifest.items if target is None else [n for n in manifest.items if n in target]
    total = sum(manifest.files[f].bytes for f in {manifest.items[n].file for n in wanted} if f)
    bar = ProgressBar(f"loading {directory.where}", total)
    try:
        result = _load_items(directory, manifest, target, map_location=map_location, strict=strict, verify=verify,
                             progress=bar)  # fmt: skip
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    rate = total / max(seconds, 1e-9) / 1e6
    log.info("loaded %s: %d bytes in %.3f s (%.0f MB/s)", directory.where, total, seconds, rate)
    return result


def _load_items(
    directory: CheckpointReader, manifest: Manifest, target: Mapping[str, Any] | None, *, map_location: Any,
    strict: bool, verify: bool, progress: ProgressBar,
) -> Any:  # fmt: skip
    checks: list[Callable[[], None]] = []  # large files are hashed on a worker while they are decoded
    if target is None:
        state: dict[str, Any] = {}
        with _checked(checks):
            for name, item in manifest.items.items():
                opened = None
                if item.file:
                    opened = open_file(directory, manifest, item.file, verify=verify, deferred=checks)
                    progress.advance(manifest.files[item.file].bytes)
                state[name] = decode_opened(opened, manifest, name, map_location=map_location)
        return state
    if not isinstance(target, Mapping):
        raise StateMismatchError(f"target must be a dict of live objects, not {type(target).__name__}")
    report = LoadReport(manifest=manifest)
    absent = [k for k in target if k not in manifest.items]
    if absent:
        if strict:
            raise StateMismatchError(
                f"{directory.where}: items {absent} are not in the checkpoint (it has {list(manifest.items)}); "
                "pass strict=False to load the rest",
            )
        report.missing_keys += absent
    # Every file and skeleton is checked and decoded before anything is restored, so a damaged file
    # found late cannot leave the target half-restored. Modules copy into their own parameters, so
    # they read straight from the (copy-on-write) file mapping; an optimizer keeps the tensors it is
    # given, so it gets views of the mapping where they are 64-byte aligned (see adapters.zero_copy_for).
    needed = [name for name in manifest.items if name in target or manifest.items[name].file is None]
    files = {manifest.items[name].file for name in needed} - {None}
    values: dict[str, Any] = {}
    with _checked(checks):
        readers: dict[str, TensorFileReader] = {}
        for data_file in sorted(f for f in files if f):
            readers[data_file] = open_file(directory, manifest, data_file, verify=verify, deferred=checks)
            progress.advance(manifest.files[data_file].bytes)
        for name in needed:
            file = manifest.items[name].file
            values[name] = decode_opened(
                readers[file] if file else None, manifest, name,
                map_location=map_location if name in target else None,
                zero_copy=zero_copy_for(target[name]) if name in target else False,
            )
        del readers
    for name in needed:
        if name not in target:
            report.state[name] = values.pop(name)
    restore_items(target, values, strict=strict, report=report, where=directory.where)
    return report


@contextlib.contextmanager
def _checked(checks: list[Callable[[], None]]) -> Iterator[None]:
    """Run every deferred hash check when the block ends, before its results are used; when the block
    fails, a hash mismatch found meanwhile is what is reported (the damage explains the failure)."""
    try:
        yield
    except BaseException:
        _run_checks(checks)
        raise
    _run_checks(checks)


def _run_checks(checks: list[Callable[[], None]]) -> None:
    """Wait for every deferred hash check (none keeps running behind an error); raise the first failure."""
    first: BaseException | None = None
    for check in checks:
        try:
            check()
        except BaseException as exc:  # re-raised below, once every check finished
            first = first or exc
    checks.clear()
    if first is not None:
        raise first


@gc_paused()
def verify(path: Location, *, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Check a checkpoint completely: manifest, every file's size and hash, headers, and references.

    Returns the manifest if everything is intact; raises a :class:`CorruptCheckpointError` subclass naming
    the first problem otherwise. Detects any single flipped byte in any file of the checkpoint. Files
    are checked one at a time (a remote file is downloaded, checked and dropped before the next).
    """
    checkpoint = open_checkpoint(path, storage_options=storage_options)
    try:
        manifest = _manifest_of(checkpoint)
        verify_files(checkpoint, manifest, manifest.files)
    finally:
        _close_if_opened(checkpoint, path)
    return manifest


@gc_paused()
def verify_files(checkpoint: Location, manifest: Manifest, files: Iterable[str]) -> dict[str, TensorFileReader]:
    """What :func:`verify` checks, for the data ``files`` of ``checkpoint`` only: each file's size, hash and
    header, and the references of the items stored in them (and of the items without a file). Returns the
    checked files, opened (:func:`decode_opened` reads items from them without reading them again).

    ``load(..., verify=True)`` checks the files it reads the same way; together they check a whole
    checkpoint in one pass over each file (what the Checkpointer's resume does).
    """
    source = open_checkpoint(checkpoint, check=False)
    try:
        readers = {file: open_file(source, manifest, file, verify=True) for file in files}
    finally:
        _close_if_opened(source, checkpoint)
    for name, entry in manifest.items.items():
        if entry.file is None or entry.file in readers:
            check_item(entry, readers[entry.file] if entry.file else None, name)
    return readers


def check_item(entry: ItemEntry, tensors: Mapping[str, Any] | TensorFileReader | None, name: str) -> None:
    """Every array node of an item names a tensor of its file and agrees with its header (what ``load``
    checks before building the array: logical dtype and shape against the stored bytes, scalars 0-d, a
    tensor's device), the skeleton decodes with its torch values checked, and the item's value has the
    structure of its kind (:mod:`savegame.checks`). ``savegame verify`` runs this too."""
    if isinstance(tensors, TensorFileReader):
        tensors = tensors.tensors

    def check(node: dict[str, Any], path: Path) -> object:
        where = format_path(path)
        key = node["key"]
        if tensors is None or key not in tensors:
            raise InvalidManifestError(f"{where}: array {key[:80]!r} is not in the item's tensor file")
        check_array_node(node, tensors[key], where)
        return None

    value = Decoder(resolve=check, extra_tags=tag_checkers()).decode(entry.skeleton, (name,))
    check_item_value(entry.kind, value, name)


def check_array_node(node: Mapping[str, Any], info: TensorInfo, where: str) -> None:
    """Check an array node of a skeleton against its tensor's header entry, without building the array."""
    tag = node["$"]
    logical = node.get("dtype")
    shape: Sequence[int] = info.shape
    if logical is not None:
        itemsize = logical_itemsize(logical, tensor=tag == "tensor")
        if itemsize is None:
            raise InvalidManifestError(f"{where}: unknown logical dtype {str(logical)[:40]!r}")
        lshape = node.get("shape")
        if not valid_shape(lshape, itemsize):
            raise InvalidManifestError(f"{where}: invalid logical shape {str(lshape)[:100]}")
        assert isinstance(lshape, list)
        if math.prod(lshape) * itemsize != info.nbytes:
            raise InvalidManifestError(
                f"{where}: logical shape {lshape} x {logical} does not match the stored {info.nbytes} bytes"
            )
        shape = lshape
    if tag == "npscalar" and len(shape) != 0:
        raise InvalidManifestError(f"{where}: a numpy scalar must have shape (), not {list(shape)[:8]}")
    if tag == "tensor":
        check_tensor_node(node, where)
