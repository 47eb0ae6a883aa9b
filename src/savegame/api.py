"""The functional API: ``save``, ``load``, ``verify``, ``read_manifest``.

``save`` captures the state (live objects -> nested state), encodes each top-level item into a skeleton
and its arrays, streams the arrays into one safetensors file per item inside a storage transaction, and
commits with the manifest last. ``load`` reads the manifest, checks every file it touches (size, hash,
header: :mod:`savegame.engine.verifier`, which ``verify`` calls too) and rebuilds the state, or restores it into
live objects in place.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from savegame._util.gcpause import gc_paused
from savegame._util.logs import get_logger
from savegame._util.progress import ProgressBar
from savegame.adapters import framework_decode_tags, torch_available, zero_copy_for
from savegame.adapters.registry import ZeroCopy
from savegame.engine import verifier
from savegame.engine.capture import LoadReport, restore_items
from savegame.engine.incremental import Base, Incremental
from savegame.engine.item_decoder import ItemDecoder
from savegame.engine.lazy import SnapshotMode, check_snapshot_mode
from savegame.engine.verifier import check_array_node as check_array_node  # re-exported: moved to verifier.py
from savegame.engine.verifier import check_item as check_item
from savegame.engine.verifier import checked
from savegame.engine.writer import EncodedItem, encode_state, save_in_background, save_now, write_items
from savegame.errors import ConfigError, StateMismatchError
from savegame.format.checks import check_item_value
from savegame.format.manifest import Manifest
from savegame.format.tensorfile import TensorFileReader
from savegame.format.tree import MAX_DEPTH, Decoder
from savegame.storage import is_url, locate, path_text
from savegame.storage.base import CheckpointReader, CheckpointRef, Location, PathLike, Storage
from savegame.storage.local import LocalCheckpointReader, LocalStorage, open_local_checkpoint, remove_dead_staging_once

__all__ = ["EncodedItem", "encode_state", "load", "read_manifest", "save", "verify", "write_items"]

log = get_logger("savegame")
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
    snapshot: SnapshotMode = "eager",
    storage_options: Mapping[str, Any] | None = None,
    base: PathLike | None = None,
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
    checkpoint, a checkpoint folder that also holds files savegame did not write, such as a user's
    ``notes.txt``) is never replaced: :class:`OccupiedPathError`, and it is left untouched. An empty folder
    may be saved into.
    ``background``: return as soon as the state is copied to host memory and write it in a background
    thread; returns a :class:`~savegame.engine.background.PendingSave` whose ``result()`` waits for the commit
    and returns the manifest (or raises :class:`BackgroundSaveError`). At most one background save is in
    flight: the next one first waits for it (and raises the error of a failed one nobody collected with
    ``result()``). A save not waited for is finished at interpreter exit (or its failure printed on stderr).
    ``snapshot`` (background saves): ``"eager"`` (the default) copies the whole state before returning;
    ``"lazy"`` copies parameters and optimizer state during the next forward/backward instead, and the
    next ``optimizer.step()`` waits for that copy; the save commits after that step (or ``result()``).
    Code that changes parameters outside ``optimizer.step()`` before then must stay eager: see
    :mod:`savegame.engine.lazy` (a change torch counts fails the save with :class:`TornSnapshotError`).
    ``path`` may be an fsspec URL (``s3://bucket/run/NAME``; ``storage_options`` go to fsspec): the data
    is uploaded first and the manifest last as the commit marker (see :mod:`savegame.storage.remote`).

    ``base``: an incremental save (:mod:`savegame.engine.incremental`): ``base`` is a committed checkpoint
    in the same directory as ``path``; the files of ``base`` that hold arrays whose dtype, shape and bytes
    did not change are hard-linked instead of written (verified first; where linking is impossible the
    arrays are written), and every array's hash is recorded for the next incremental save. ``path`` stays
    a complete checkpoint: deleting ``base`` later does not affect it.

    Returns the :class:`Manifest` (sync). When a sync ``save`` returns (or a background save's
    ``result()`` does), the checkpoint is on stable storage (files, manifest and the directory entry
    were fsynced) and a power loss cannot take it back. If it fails, nothing new is visible at ``path``
    and whatever was there before is unchanged.
    """
    if not isinstance(background, bool):  # a string such as "false" would be true
        raise ConfigError(f"save: background must be True or False, got {background!r}")
    incremental = _incremental_base(base, storage_options=storage_options) if base is not None else None
    mode = check_snapshot_mode(snapshot, background=background, where="save")
    if background:
        from savegame.engine.background import default_writer

        storage, name = locate(path, storage_options=storage_options)
        _tidy(storage)
        storage.check_target(name, overwrite=overwrite)  # raised here, not only by the handle later
        return save_in_background(
            default_writer(), storage, name, state, metadata=metadata, progress=progress, overwrite=overwrite,
            incremental=incremental, snapshot=mode,
        )  # fmt: skip
    with gc_paused():
        storage, name = locate(path, storage_options=storage_options)  # a local directory or an fsspec URL
        _tidy(storage)
        _, manifest = save_now(storage, name, state, metadata=metadata, progress=progress, overwrite=overwrite,
                               incremental=incremental)  # fmt: skip
    return manifest


def _tidy(storage: Storage) -> None:
    """Before the first save into a local root: remove the unfinished saves (``.staging-*``) of writers that
    are gone, so a run killed mid-save again and again (preemption) does not fill the disk with them. The
    Checkpointer does more (it owns its root); a plain save only touches dead writers' staging folders."""
    if isinstance(storage, LocalStorage):
        remove_dead_staging_once(storage)


def _incremental_base(base: PathLike, *, storage_options: Mapping[str, Any] | None) -> Incremental:
    """``save(base=...)``: the committed checkpoint ``base`` (its manifest read and validated now).

    ``storage_options`` are the ones given for ``path``: they go to ``base`` only if it is a URL too (a local
    base of a remote save is in another storage, so the save is a full one)."""
    if not isinstance(base, (str, os.PathLike)):
        hint = ": save() returns the Manifest, pass the path it saved to" if isinstance(base, Manifest) else ""
        raise ConfigError(
            f"save: base must be the path (or URL) of a committed checkpoint, the one to save incrementally "
            f"from, not {type(base).__name__}{hint}"
        )
    if not os.fspath(base):
        raise ConfigError("save: base is empty; pass the path of the checkpoint to save incrementally from")
    try:
        storage, name = locate(base, storage_options=storage_options if is_url(base) else None)
    except ConfigError as exc:
        raise ConfigError(f"save: base: {exc}") from None
    reader = storage.reader(name)
    try:
        manifest = verifier.manifest_of(reader)
    finally:
        reader.close()
    return Incremental(Base(storage, name, manifest))


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
        if not hasattr(path, "manifest_bytes"):  # not an opened CheckpointReader either
            path_text(path)  # raises ConfigError saying what was given
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
    return verifier.manifest_of(checkpoint)


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
        checkpoint.close()


def open_file(
    checkpoint: Location, manifest: Manifest, file: str, *, verify: bool,
    deferred: list[Callable[[], None]] | None = None,
) -> TensorFileReader:  # fmt: skip
    """Open a data file of ``checkpoint`` (a path, URL, ref or opened reader), checked as
    :func:`savegame.engine.verifier.open_file` checks it: exists, exact size, hash (if ``verify``), valid header."""
    return verifier.open_file(open_checkpoint(checkpoint, check=False), manifest, file, verify=verify,
                              deferred=deferred)  # fmt: skip


def open_item(checkpoint: Location, manifest: Manifest, name: str, *, verify: bool) -> TensorFileReader | None:
    """The arrays of item ``name`` (None if it has none): its file, or for an item of an incremental
    checkpoint, one view over its file and the linked ones, each opened as :func:`open_file` opens it."""
    entry = manifest.items[name]
    opened = {file: open_file(checkpoint, manifest, file, verify=verify) for file in entry.files}
    return verifier.item_reader(entry, opened)




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
        opened = {file: open_file(source, manifest, file, verify=verify) for file in entry.files}
        reader = verifier.item_reader(entry, opened)
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
    tags = {} if numpy_only else framework_decode_tags()
    resolver = ItemDecoder(reader, name, map_location=map_location, as_numpy=numpy_only, zero_copy=zero_copy)
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
    copy: bool = False,
) -> Any:
    """Load a checkpoint.

    Without ``target``: return the nested state, ``{item: value}``. Tensors saved from torch come back as
    torch tensors when torch is installed (NumPy arrays otherwise). For a local checkpoint they are views of
    a private (copy-on-write) mapping of its committed tensor files, so nothing is copied: writing to a
    tensor gives the process its own copy of that page and never reaches the file, and the checkpoint may be
    deleted (e.g. by retention) while its tensors are alive (the mapping keeps the data). Tensors that do
    not start 64-byte aligned in the file (a 0-d value only needs its own size's alignment), and every
    tensor of a file of at most 256 KiB (read whole, which is faster than mapping it), are in fresh memory.
    ``copy=True``: every tensor in freshly allocated memory that does not depend on the files. The
    trade-off: mapped memory is paged in lazily (on a cold cache, first touches read the disk) and counts as
    file-backed memory (page cache) until written, and a deleted checkpoint's disk space is only freed when
    its last tensor dies (and before Python 3.13 each mapped file holds a descriptor until then: keeping
    the tensors of hundreds of loads alive can reach the process's limit, a :class:`StorageError` saying
    so); owned memory is read and copied up front and counts as the process's own. Either
    way, with ``verify`` every byte returned was hashed before ``load`` returns. savegame never modifies a
    committed file; a program that rewrote one in place would change mapped tensors, and one that truncated it
    would make reading them crash the process with SIGBUS, as with any memory-mapped load (``copy=True``
    protects the tensors once ``load`` has returned; the files are mapped while it reads and hashes them,
    so they must not be truncated during the load itself).

    With ``target`` (a dict of items, e.g. ``{"model": model, "optimizer": opt, "epoch": 0}``): restore
    each in place and return a :class:`LoadReport`. The target is updated the way
    ``torch.distributed.checkpoint.load`` updates its state dict: live objects get their state in
    place, dicts and lists are filled in place (recursively), other values (``"epoch": 0``, tuples) are
    replaced in the dict or list that holds them, and only once the whole state matched (see
    :func:`savegame.engine.capture.restore_items` for every case). Items of the target that hold no live
    object are also returned in ``report.state``, and so are the items of the checkpoint not in
    ``target`` if they hold no arrays (the others are not read at all). Every file's hash is checked
    before any target is changed. A module
    copies the values into its parameters; a torch optimizer keeps the tensors it is given, so its state
    becomes views of the privately mapped file where they are 64-byte aligned (no copy; training writes
    copy each page on first write and never reach the file), fresh memory elsewhere.

    ``map_location``: like ``torch.load``: a device (``"cpu"``, ``"cuda:1"``), a dict from saved to new
    device, or ``fn(tensor, saved_device) -> tensor``. ``None`` puts tensors back on the device they were
    saved from when it exists (CPU otherwise, with a warning); a device this machine lacks (or a
    device string torch does not know) raises :class:`ConfigError` before anything is restored.
    ``strict``: refuse to load into a target when keys are missing, unexpected, shaped differently or
    of another type (:class:`StateMismatchError`, raised before anything is changed); ``strict=False``
    loads what matches and lists the rest in the report.
    ``verify``: check each file's content hash before using it (XXH3, ~20 GB/s); large files are hashed
    on worker threads while the structure is rebuilt, and a mismatch raises :class:`HashMismatchError`
    before anything is returned.
    ``snapshot`` (background saves): ``"eager"`` (the default) copies the whole state before returning;
    ``"lazy"`` copies parameters and optimizer state during the next forward/backward instead, and the
    next ``optimizer.step()`` waits for that copy; the save commits after that step (or ``result()``).
    Code that changes parameters outside ``optimizer.step()`` before then must stay eager: see
    :mod:`savegame.engine.lazy` (a change torch counts fails the save with :class:`TornSnapshotError`).
    ``path`` may be an fsspec URL (``s3://bucket/run/NAME``, ``storage_options`` go to fsspec): each file
    is then downloaded into memory with parallel ranged reads and its hash checked on that buffer (the
    tensors are views of that private buffer unless ``copy=True``).
    ``copy``: return owned memory instead of views of the files (see above); with a ``target``, the
    state an optimizer keeps is then copied into fresh memory too instead of sharing aligned views of
    the mapping (modules copy into their own parameters either way).
    """
    for option, value in (("copy", copy), ("verify", verify), ("strict", strict)):
        if not isinstance(value, bool):  # verify=None or "" would silently skip every hash check
            raise ConfigError(f"load: {option} must be True or False, not {type(value).__name__} {value!r:.40}")
    directory = open_checkpoint(path, storage_options=storage_options)
    try:
        return _load(directory, target, map_location=map_location, strict=strict, verify=verify, copy=copy)
    finally:
        _close_if_opened(directory, path)


def _load(
    directory: CheckpointReader, target: Mapping[str, Any] | None, *, map_location: Any, strict: bool, verify: bool,
    copy: bool = False,
) -> Any:
    """Load with a progress bar (on a terminal, for loads over ~2 s) and one log line with the throughput."""
    verifier.prefetch(directory, None)  # the manifest's read and the data files' overlap on a cold cache
    manifest = _manifest_of(directory)
    started = time.perf_counter()
    wanted = manifest.items if target is None else [n for n in manifest.items if n in target]
    total = sum(manifest.files[f].bytes for f in {f for n in wanted for f in manifest.items[n].files})
    bar = ProgressBar(f"loading {directory.where}", total)
    try:
        result = _load_items(directory, manifest, target, map_location=map_location, strict=strict, verify=verify,
                             progress=bar, copy=copy)  # fmt: skip
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    rate = total / max(seconds, 1e-9) / 1e6
    log.info("loaded %s: %d bytes in %.3f s (%.0f MB/s)", directory.where, total, seconds, rate)
    return result


def _load_items(
    directory: CheckpointReader, manifest: Manifest, target: Mapping[str, Any] | None, *, map_location: Any,
    strict: bool, verify: bool, progress: ProgressBar, copy: bool = False,
) -> Any:  # fmt: skip
    checks: list[Callable[[], None]] = []  # large files are hashed on a worker while they are decoded
    if target is None:
        return _load_plain(directory, manifest, checks, map_location=map_location, verify=verify,
                           progress=progress, zero_copy=PLAIN_ZERO_COPY if not copy else False)  # fmt: skip
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
    files = {file for name in needed for file in manifest.items[name].files}
    values: dict[str, Any] = {}
    with checked(checks):
        readers: dict[str, TensorFileReader] = {}
        verifier.prefetch(directory, sorted(files))
        for data_file in sorted(files):
            readers[data_file] = open_file(directory, manifest, data_file, verify=verify,
                                           deferred=_overlapped(checks, map_location))  # fmt: skip
            progress.advance(manifest.files[data_file].bytes)
        for name in needed:
            values[name] = decode_opened(
                verifier.item_reader(manifest.items[name], readers), manifest, name,
                map_location=map_location if name in target else None,
                zero_copy=_target_zero_copy(target[name], copy=copy) if name in target else False,
            )
        del readers
    for name in needed:
        if name not in target:
            report.state[name] = values.pop(name)
    restore_items(target, values, strict=strict, report=report, where=directory.where)
    return report


def _overlapped(checks: list[Callable[[], None]], map_location: Any) -> list[Callable[[], None]] | None:
    """Where the hash checks of large files go while the state is decoded (``checks``, run before anything is
    returned), or None to hash each file before decoding it: a ``map_location`` callable is user code, and
    it is given the decoded tensors, so it must only ever see verified bytes."""
    return None if callable(map_location) else checks


def _target_zero_copy(target: object, *, copy: bool) -> ZeroCopy:
    """How a restore into ``target`` may share the file's memory: its adapter's answer, except that with
    ``copy`` nothing the target keeps is a view of the file (``True`` stays: the target copies anyway)."""
    zero_copy = zero_copy_for(target)
    return False if copy and zero_copy == "aligned" else zero_copy


PLAIN_ZERO_COPY: ZeroCopy = "aligned"
"""How a plain ``load(path)`` shares the files' memory: views of the copy-on-write mapping where a tensor
starts 64-byte aligned (as a fresh allocation would; every tensor of a savegame file whose size is a
multiple of 64 bytes does) or is a single (0-d) value aligned to its size, a copy of just that tensor
elsewhere (``copy=True`` copies all of them)."""


def _load_plain(
    directory: CheckpointReader, manifest: Manifest, checks: list[Callable[[], None]], *, map_location: Any,
    verify: bool, progress: ProgressBar, zero_copy: ZeroCopy,
) -> dict[str, Any]:  # fmt: skip
    """Every item rebuilt as nested state, while the large files are hashed on workers (the same
    :func:`open_file` mapping and deferred checks as a load into a target); nothing is returned until
    every check passed."""
    state: dict[str, Any] = {}
    verifier.prefetch(directory, [file for item in manifest.items.values() for file in item.files])
    with checked(checks):
        readers: dict[str, TensorFileReader] = {}
        for name, item in manifest.items.items():
            for file in item.files:
                if file not in readers:
                    readers[file] = open_file(directory, manifest, file, verify=verify,
                                              deferred=_overlapped(checks, map_location))  # fmt: skip
                    progress.advance(manifest.files[file].bytes)
            opened = verifier.item_reader(item, readers)
            state[name] = decode_opened(opened, manifest, name, map_location=map_location, zero_copy=zero_copy)
    return state


@gc_paused()
def verify(path: Location, *, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Check a checkpoint completely: manifest, every file's size and hash, headers, and references.

    Returns the manifest if everything is intact; raises a :class:`CorruptCheckpointError` subclass naming
    the first problem otherwise. Detects any single flipped byte in any file of the checkpoint. Files
    are checked one at a time (a remote file is downloaded, checked and dropped before the next).
    """
    checkpoint = open_checkpoint(path, storage_options=storage_options)
    try:
        return verifier.verify_checkpoint(checkpoint)
    finally:
        _close_if_opened(checkpoint, path)


@gc_paused()
def verify_files(
    checkpoint: Location, manifest: Manifest, files: Iterable[str] | None = None, *,
    progress: verifier.Progress | None = None,
) -> dict[str, TensorFileReader]:  # fmt: skip
    """:func:`savegame.engine.verifier.verify_files` for a checkpoint given as a path, URL, ref or reader: the
    size, hash and header of each of ``files`` (default: all) and the items stored in them."""
    source = open_checkpoint(checkpoint, check=False)
    try:
        return verifier.verify_files(source, manifest, files, progress=progress)
    finally:
        _close_if_opened(source, checkpoint)
