"""The write path: capture and encode a state, stream it into a storage transaction, commit.

``save_now`` does both phases in the caller's thread (zero-copy: tensor memory goes straight to the file).
``save_in_background`` takes a snapshot into reusable host buffers in the caller's thread and hands the
persist phase to a :class:`~savegame.background.BackgroundWriter`.

Every save logs (logger ``savegame``, level INFO) its size, blocking time and throughput.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from . import hashing
from ._version import __version__
from .adapters import framework_versions, torch_if_imported
from .background import BackgroundWriter, PendingSave, Snapshot
from .capture import kind_of, live_object_hook
from .copyqueue import CopyQueue
from .errors import BackgroundSaveError, ConfigError, StorageError, UnsupportedTypeError
from .gcpause import gc_paused
from .manifest import FileEntry, ItemEntry, Manifest, dump_manifest, utc_now
from .progress import ProgressBar
from .storage.base import MANIFEST, Storage
from .tensorfile import order_for_alignment, write_tensor_file
from .tree import ArrayHook, ArrayRecord, Encoder, decode_plain, encode_plain
from .workers import LazyPool

log = logging.getLogger("savegame")
_SAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")


@dataclass
class EncodedItem:
    """One top-level item after capture and encoding, ready to write."""

    name: str
    kind: str
    skeleton: Any
    records: list[ArrayRecord]
    file: str | None

    @property
    def nbytes(self) -> int:
        return sum(len(r.data.data) for r in self.records)


_NOT_A_MAPPING = {
    "progress": (
        "progress= is where the run is, stored in the manifest (a mapping such as {{'epoch': 3, 'step': 1200, "
        "'val_loss': 0.25}}), not a {value}; for a progress bar, set the environment variable SAVEGAME_PROGRESS=1 "
        "(on a terminal one is shown by itself for saves that take more than 2 s)"
    ),
    "metadata": "metadata= must be a mapping of JSON-like data (such as {{'run': 'exp1'}}), not a {value}",
}


@dataclass(frozen=True)
class EncodedExtras:
    """Metadata and progress, encoded (so later changes by the caller cannot alter them)."""

    metadata: Any
    progress: Any

    @classmethod
    def encode(cls, metadata: Mapping[str, Any] | None, progress: Mapping[str, Any] | None) -> EncodedExtras:
        for what, value in (("metadata", metadata), ("progress", progress)):
            if value is not None and not isinstance(value, Mapping):
                raise ConfigError(_NOT_A_MAPPING[what].format(value=type(value).__name__))
        return cls(
            metadata=encode_plain(dict(metadata or {}), "metadata"),
            progress=encode_plain(dict(progress), "progress") if progress is not None else None,
        )


def make_encoder(
    *, copy: bool, key_skip: int = 1, allocate: Callable[[int, bool], Any] | None = None,
    copies: CopyQueue | None = None,
) -> Encoder:
    """An encoder with the framework hooks for what is imported in this process."""
    hooks: list[ArrayHook] = []
    if torch_if_imported() is not None:
        from .adapters.torch import encode_hook

        hooks.append(encode_hook)
    hooks.append(live_object_hook)
    return Encoder(copy=copy, array_hooks=hooks, key_skip=key_skip, allocate=allocate, copies=copies)


@gc_paused()
def encode_state(
    state: Mapping[str, Any], *, copy: bool = False, allocate: Callable[[int, bool], Any] | None = None
) -> list[EncodedItem]:
    """Capture and encode every item of ``state`` (no I/O).

    ``copy=True`` snapshots every array into host memory (from ``allocate`` when given), so the live
    objects may change as soon as this returns (background saves). Device-to-host copies are complete
    when this returns.
    """
    if not isinstance(state, Mapping):
        raise UnsupportedTypeError(
            f"state must be a dict of items (e.g. {{'model': model, 'optimizer': opt}}), not {type(state).__name__}"
        )
    items: list[EncodedItem] = []
    used_files: set[str] = {MANIFEST}
    needs_sync = False
    copies = CopyQueue() if copy else None  # host copies overlap the walk (copyqueue.py)
    try:
        for name, value in state.items():
            if type(name) is not str or not name or len(name) > 1024:
                raise UnsupportedTypeError(f"item names must be non-empty strings (<= 1024 chars), got {name!r}")
            enc = make_encoder(copy=copy, allocate=allocate, copies=copies)
            skeleton = enc.encode(value, (name,))
            needs_sync = needs_sync or enc.needs_sync
            file = None
            if enc.records:
                file = _file_name(name, used_files)
                used_files.add(file)
            items.append(EncodedItem(name, kind_of(value), skeleton, enc.records, file))
    finally:
        if copies is not None:
            copies.wait()  # also on error: the caller may recycle the buffers only once no copy runs
    if needs_sync:
        import torch

        torch.cuda.synchronize()
    return items


def _file_name(item: str, used: set[str]) -> str:
    stem = _SAFE_FILE_CHARS.sub("_", item)[:120].lstrip(".") or "item"
    candidate = f"{stem}.safetensors"
    n = 1
    while candidate in used:
        n += 1
        candidate = f"{stem}-{n}.safetensors"
    return candidate


def library_versions() -> dict[str, str]:
    """Versions recorded in the manifest: savegame, Python and the frameworks imported."""
    return {"savegame": __version__, **framework_versions()}


class _CountingSink:
    """Forwards writes to a storage sink and advances a progress display."""

    def __init__(self, sink: Any, progress: ProgressBar, should_stop: Callable[[], bool] | None = None) -> None:
        self._sink = sink
        self._progress = progress
        self._should_stop = should_stop

    def write(self, data: bytes | bytearray | memoryview) -> object:
        if self._should_stop is not None and self._should_stop():
            raise BackgroundSaveError(f"{self._progress.label}: aborted at interpreter exit (nothing was saved)")
        result = self._sink.write(data)
        self._progress.advance(len(data))
        return result


def _early_close(sink: Any) -> Callable[[], None] | None:
    """For a local file sink: its ``close`` (fsync + close), to run on a worker thread while the next
    file is written; the transaction's commit then finds it closed. None for other sinks."""
    from .storage.local import LocalFileSink

    return sink.close if type(sink) is LocalFileSink else None


_fsyncs = LazyPool("savegame-fsync", 2)


def _wait_all(futures: list[Future[None]]) -> None:
    """Wait for every future, then raise the first error (never leave an fsync running behind an error)."""
    first: BaseException | None = None
    for f in futures:
        try:
            f.result()
        except BaseException as exc:  # re-raised below, after every fsync finished
            first = first or exc
    futures.clear()
    if first is not None:
        raise first


def write_encoded(
    storage: Storage, name: str, items: list[EncodedItem], extras: EncodedExtras, *, overwrite: bool,
    blocking_seconds: float | None = None, should_stop: Callable[[], bool] | None = None,
) -> tuple[str, Manifest]:
    """Write encoded items as checkpoint ``name`` of ``storage``; commit; return its path and manifest.

    ``should_stop``: checked before every write; when it says so the transaction is aborted (its staging
    data removed) and :class:`BackgroundSaveError` raised (a background save stopped at interpreter exit).

    Each finished local file is fsynced on a worker thread while the next one is written and while the
    commit writes and fsyncs the manifest; the commit waits for all of them before it publishes. The returned
    :class:`Manifest` is the one built here, equal to what :func:`parse_manifest` reads back.
    """
    start = time.perf_counter()
    total = sum(i.nbytes for i in items)
    progress = ProgressBar(f"saving {name}", total)
    txn = storage.begin(name, overwrite=overwrite)
    closing: list[Future[None]] = []
    try:
        try:
            files: dict[str, FileEntry] = {}
            for item in items:
                if item.file is None:
                    continue
                sink = txn.open(item.file)
                records = order_for_alignment([r.data for r in item.records])
                written = write_tensor_file(_CountingSink(sink, progress, should_stop), records)
                files[item.file] = FileEntry(bytes=written.bytes, hash=written.hash)
                close = _early_close(sink)
                if close is not None:
                    closing.append(_fsyncs.get().submit(close))
            entries = {i.name: ItemEntry(kind=i.kind, file=i.file, skeleton=i.skeleton) for i in items}
            created = utc_now()
            versions = library_versions()
            raw = dump_manifest(
                created=created,
                versions=versions,
                metadata=extras.metadata,
                progress=extras.progress,
                files=files,
                items=entries,
            )
            manifest = Manifest(
                created=created,
                versions=versions,
                metadata=decode_plain(extras.metadata) if extras.metadata is not None else {},
                progress=decode_plain(extras.progress) if extras.progress is not None else None,
                files=files,
                items=entries,
                hash_chunk_bytes=hashing.HASH_CHUNK_BYTES,
                raw_metadata=extras.metadata,
                raw_progress=extras.progress,
            )
        except BaseException:
            _wait_all(closing)  # no fsync keeps running behind an error; a failed one is what is reported
            raise
    except OSError as exc:
        txn.abort()
        progress.close()
        raise StorageError(exc.errno, f"writing checkpoint {name} failed: {exc.strerror or exc}") from exc
    except BaseException:
        txn.abort()
        progress.close()
        raise
    try:
        final = txn.commit(raw)  # waits for the data files' fsyncs (LocalFileSink.close) and reports theirs
    finally:
        for future in closing:
            future.exception()  # finished (the commit waited for each file); errors were raised by the commit
        progress.close()
    elapsed = time.perf_counter() - start
    blocked = elapsed if blocking_seconds is None else blocking_seconds
    log.info(
        "saved %s: %d bytes in %.3f s (%.1f MB/s), training blocked %.3f s",
        final, total, elapsed, total / max(elapsed, 1e-9) / 1e6, blocked,
    )
    return final, manifest


@gc_paused()
def write_items(
    storage: Storage,
    name: str,
    items: list[EncodedItem],
    *,
    metadata: Mapping[str, Any] | None,
    progress: Mapping[str, Any] | None,
    overwrite: bool,
) -> tuple[str, Manifest]:
    """Write encoded items as checkpoint ``name`` of ``storage``; return its path and manifest."""
    return write_encoded(storage, name, items, EncodedExtras.encode(metadata, progress), overwrite=overwrite)


def save_now(
    storage: Storage, name: str, state: Mapping[str, Any], *, metadata: Mapping[str, Any] | None,
    progress: Mapping[str, Any] | None, overwrite: bool,
) -> tuple[str, Manifest]:
    """Synchronous save: capture, encode (no copies) and write in the caller's thread."""
    extras = EncodedExtras.encode(metadata, progress)
    return write_encoded(storage, name, encode_state(state), extras, overwrite=overwrite)


def save_in_background(
    writer: BackgroundWriter, storage: Storage, name: str, state: Mapping[str, Any], *,
    metadata: Mapping[str, Any] | None, progress: Mapping[str, Any] | None, overwrite: bool,
) -> PendingSave:
    """Snapshot ``state`` now (blocking only for the host copy), write and commit in the background.

    Waits first for the previous background save of ``writer`` (raising its error if it failed). The
    returned handle's ``result()`` gives the :class:`Manifest` once committed.
    """
    writer.wait()
    with gc_paused():  # not while waiting above: only while this thread copies and encodes
        start = time.perf_counter()
        snapshot = Snapshot(writer.pool)
        try:
            items = encode_state(state, copy=True, allocate=snapshot.take)
            extras = EncodedExtras.encode(metadata, progress)
        except BaseException:
            snapshot.release()
            raise
        blocking = time.perf_counter() - start

        def persist() -> Manifest:
            _, manifest = write_encoded(
                storage, name, items, extras, overwrite=overwrite, blocking_seconds=blocking,
                should_stop=writer.stop_requested,
            )
            return manifest

        return writer.submit(storage.path(name), snapshot, persist, blocking_seconds=blocking)
