"""The write path: capture and encode a state, stream it into a storage transaction, commit.

``save_now`` does both phases in the caller's thread (zero-copy: tensor memory goes straight to the file).
``save_in_background`` takes a snapshot into reusable host buffers in the caller's thread and hands the
persist phase to a :class:`~savegame.engine.background.BackgroundWriter`.

Every save logs (logger ``savegame``, level INFO) its size, blocking time and throughput.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from savegame._util.copyqueue import CopyQueue
from savegame._util.gcpause import gc_paused
from savegame._util.logs import get_logger
from savegame._util.progress import ProgressBar
from savegame._version import __version__
from savegame.adapters import framework_versions
from savegame.adapters.registry import encode_hooks
from savegame.engine.background import BackgroundWriter, PendingSave, Settle, Snapshot
from savegame.engine.capture import kind_of, live_object_hook
from savegame.engine.incremental import Incremental, prepare
from savegame.engine.lazy import LazySnapshot, SnapshotMode, lazy_snapshot
from savegame.engine.pacing import Pacer
from savegame.engine.write_loop import (
    EncodedExtras,
    EncodedItem,
    NextName,
    assemble_manifest,
    item_entries,
    retry_on_clash,
    write_files,
    write_side_files,
)
from savegame.errors import UnsupportedTypeError
from savegame.format.manifest import Manifest
from savegame.format.tree import ArrayHook, Encoder
from savegame.storage.base import MANIFEST, Storage

__all__ = [
    "EncodedExtras", "EncodedItem", "encode_state", "library_versions", "make_encoder", "save_in_background",
    "save_now", "write_encoded", "write_items",
]  # EncodedItem and EncodedExtras live in write_loop.py; re-exported here, where callers import them

log = get_logger("savegame")
_SAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")


def make_encoder(
    *, copy: bool, key_skip: int = 1, allocate: Callable[[int, bool], Any] | None = None,
    copies: CopyQueue | None = None,
) -> Encoder:
    """An encoder with the adapters' encode hooks (:func:`savegame.adapters.registry.encode_hooks`: for
    the frameworks this process imported), then the live-object hook of :mod:`savegame.engine.capture`."""
    hooks: list[ArrayHook] = [*encode_hooks(), live_object_hook]
    return Encoder(copy=copy, array_hooks=hooks, key_skip=key_skip, allocate=allocate, copies=copies)


@gc_paused()
def encode_state(
    state: Mapping[str, Any], *, copy: bool = False, allocate: Callable[[int, bool], Any] | None = None,
    lazy: LazySnapshot | None = None,
) -> list[EncodedItem]:
    """Capture and encode every item of ``state`` (no I/O).

    ``copy=True`` snapshots every array into host memory (from ``allocate`` when given), so the live
    objects may change as soon as this returns (background saves). Device-to-host copies are complete
    when this returns. ``lazy`` (with ``copy``): the tensors it owns are copied after this returns
    instead, and their optimizers' next step waits for them (:mod:`savegame.engine.lazy`).
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
            queue = copies if lazy is None or copies is None else lazy.queue(value, copies)
            enc = make_encoder(copy=copy, allocate=allocate, copies=queue)
            enc.defer_records = copy  # a snapshot's small records are built on the writer thread
            skeleton = enc.encode(value, (name,))
            enc.finish()
            needs_sync = needs_sync or enc.needs_sync
            file = None
            if enc.records or enc.deferred:
                file = _file_name(name, used_files)
                used_files.add(file)
            items.append(EncodedItem(name, kind_of(value), skeleton, enc.records, file, pending=enc.deferred))
        if lazy is not None and copies is not None:
            copies.flush()  # the eager copies go to the worker first: this call waits for them only
            lazy.start()
    except BaseException as exc:
        if lazy is not None:
            lazy.abandon(exc)
        raise
    finally:
        if copies is not None:
            copies.wait()  # also on error: the caller may recycle the buffers only once no copy runs
    if needs_sync:
        from savegame.adapters.torch import synchronize_cuda

        synchronize_cuda()
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


def write_encoded(
    storage: Storage, name: str, items: list[EncodedItem], extras: EncodedExtras, *, overwrite: bool,
    blocking_seconds: float | None = None, should_stop: Callable[[], bool] | None = None,
    next_name: NextName | None = None, side_files: Mapping[str, bytes] | None = None,
    incremental: Incremental | None = None,
    before_commit: Callable[[], None] | None = None, pacer: Pacer | None = None,
) -> tuple[str, Manifest]:
    """Write encoded items as checkpoint ``name`` of ``storage``; commit; return its path and manifest.

    ``should_stop``: checked before every write; when it says so the transaction is aborted (its staging
    data removed) and :class:`BackgroundSaveError` raised (a background save stopped at interpreter exit).
    ``next_name``: when the name was taken by another writer meanwhile, write again under the name it
    gives (:func:`~savegame.engine.write_loop.retry_on_clash`; the returned path says which name was used).

    Each finished local file is fsynced on a worker thread while the next one is written and while the
    commit writes and fsyncs the manifest; the commit waits for all of them before it publishes. The returned
    :class:`Manifest` is the one built here, equal to what :func:`parse_manifest` reads back.
    ``side_files``: small non-tensor files committed in the same transaction (see
    :func:`~savegame.engine.write_loop.write_side_files`).
    ``incremental``: record every array's hash and link the arrays unchanged since its base instead of
    writing them (:mod:`savegame.engine.incremental`).
    ``before_commit``: called once everything is written, before the commit; if it raises, the
    transaction is aborted (a lazy snapshot's confirmation: :mod:`savegame.engine.lazy`).
    ``pacer``: the tensor files are written in bounded chunks at its rate (:mod:`savegame.engine.pacing`).
    """

    def attempt(current: str, progress: Mapping[str, Any] | None) -> tuple[str, Manifest]:
        use = extras if progress is None else extras.with_progress(progress)
        return _write_once(storage, current, items, use, overwrite=overwrite, blocking_seconds=blocking_seconds,
                           should_stop=should_stop, side_files=side_files, incremental=incremental,
                           before_commit=before_commit, pacer=pacer)  # fmt: skip

    return retry_on_clash(attempt, name, next_name, where=storage.path(name))


def _write_once(
    storage: Storage, name: str, items: list[EncodedItem], extras: EncodedExtras, *, overwrite: bool,
    blocking_seconds: float | None, should_stop: Callable[[], bool] | None,
    side_files: Mapping[str, bytes] | None = None, incremental: Incremental | None = None,
    before_commit: Callable[[], None] | None = None, pacer: Pacer | None = None,
) -> tuple[str, Manifest]:
    """One attempt of :func:`write_encoded`: begin, the one write loop, the manifest, commit."""
    start = time.perf_counter()
    txn = storage.begin(name, overwrite=overwrite)
    progress = ProgressBar(f"saving {name}", 0)
    try:
        prepared = prepare(txn, storage, items, incremental) if incremental is not None else None
        to_write = prepared.items if prepared is not None else items
        total = sum(i.nbytes for i in to_write)
        progress = ProgressBar(f"saving {name}", total)
        written = write_files(txn, to_write, progress, should_stop=should_stop, pacer=pacer)
        taken = {i.file for i in items if i.file} | set(prepared.files if prepared is not None else ())
        write_side_files(txn, side_files or {}, taken=taken)
        files = {**written.files, **prepared.files} if prepared is not None else written.files
        entries = prepared.entries if prepared is not None else item_entries(items)
        raw, manifest = assemble_manifest(files, entries, extras, versions=library_versions())
        if before_commit is not None:
            before_commit()
    except BaseException:
        txn.abort()
        progress.close()
        raise
    try:
        final = txn.commit(raw)  # waits for the data files' fsyncs (LocalFileSink.close) and reports theirs
    finally:
        written.settled()
        progress.close()
    elapsed = time.perf_counter() - start
    blocked = elapsed if blocking_seconds is None else blocking_seconds
    linked = f" (+{prepared.linked_bytes} bytes linked, not written)" if prepared is not None else ""
    log.info(
        "saved %s: %d bytes%s in %.3f s (%.1f MB/s), training blocked %.3f s",
        final, total, linked, elapsed, total / max(elapsed, 1e-9) / 1e6, blocked,
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
    next_name: NextName | None = None,
    incremental: Incremental | None = None,
) -> tuple[str, Manifest]:
    """Write encoded items as checkpoint ``name`` of ``storage``; return its path and manifest
    (``next_name``, ``incremental``: see :func:`write_encoded`)."""
    extras = EncodedExtras.encode(metadata, progress)
    return write_encoded(storage, name, items, extras, overwrite=overwrite, next_name=next_name,
                         incremental=incremental)  # fmt: skip


def save_now(
    storage: Storage, name: str, state: Mapping[str, Any], *, metadata: Mapping[str, Any] | None,
    progress: Mapping[str, Any] | None, overwrite: bool, incremental: Incremental | None = None,
) -> tuple[str, Manifest]:
    """Synchronous save: capture, encode (no copies) and write in the caller's thread."""
    extras = EncodedExtras.encode(metadata, progress)
    return write_encoded(storage, name, encode_state(state), extras, overwrite=overwrite, incremental=incremental)


def save_in_background(
    writer: BackgroundWriter, storage: Storage, name: str, state: Mapping[str, Any], *,
    metadata: Mapping[str, Any] | None, progress: Mapping[str, Any] | None, overwrite: bool,
    next_name: NextName | None = None, stamp: Callable[[], Mapping[str, Any]] | None = None,
    incremental: Incremental | None = None,
    snapshot: SnapshotMode = "eager", write_rate: float | None = None,
) -> PendingSave:
    """Snapshot ``state`` now (blocking only for the host copy), write and commit in the background.

    Waits first for the previous background save of ``writer`` (raising its error if it failed). The
    returned handle's ``result()`` gives the :class:`Manifest` once committed. ``next_name``
    (called in the writer thread): a name taken meanwhile is retried under the next one, as in a sync
    save (:func:`write_encoded`); the handle's ``path`` stays the name it was started with.
    ``stamp``: called once the snapshot is taken, it gives the progress to record instead of
    ``progress`` (which may then say how long the save blocked the caller). ``incremental``: see
    :func:`write_encoded` (its hashing runs in the writer thread, not here).
    ``progress`` (which may then say how long the save blocked the caller).
    ``snapshot="lazy"``: parameters and optimizer state are copied after this returns and the next
    ``optimizer.step()`` waits for them (:mod:`savegame.engine.lazy`); the commit follows that step.
    ``write_rate`` (bytes/s): the tensor files are written at most this fast, in bounded chunks, until
    anybody waits for the save (then at full speed: :mod:`savegame.engine.pacing`); None: full speed.
    """
    writer.wait()
    pacer = Pacer(write_rate) if write_rate is not None else None
    with gc_paused():  # not while waiting above: only while this thread copies and encodes
        start = time.perf_counter()
        buffers = Snapshot(writer.pool)
        lazy = lazy_snapshot(state) if snapshot == "lazy" else None
        try:
            items = encode_state(state, copy=True, allocate=buffers.take, lazy=lazy)
            extras = EncodedExtras.encode(metadata, progress if stamp is None else stamp())
        except BaseException as exc:
            if lazy is not None:
                lazy.abandon(exc)  # (a no-op when encode_state did it already)
            buffers.release()
            raise
        blocking = time.perf_counter() - start

        def persist() -> Manifest:
            if lazy is not None:
                lazy.wait_copied()  # the buffers hold their bytes; whether they may be committed: below
            _, manifest = write_encoded(
                storage, name, items, extras, overwrite=overwrite, blocking_seconds=blocking,
                should_stop=writer.stop_requested, next_name=next_name, incremental=incremental,
                before_commit=None if lazy is None else lazy.wait_confirmed, pacer=pacer,
            )
            return manifest

        settle = _settle_for(lazy, pacer)
        pending = writer.submit(storage.path(name), buffers, persist, blocking_seconds=blocking, settle=settle,
                                poll=None if lazy is None else lazy.confirm_if_copied)  # fmt: skip
        if lazy is not None:
            lazy.on_failure = pending._settled_and_delivered
        return pending


def _settle_for(lazy: LazySnapshot | None, pacer: Pacer | None) -> Settle | None:
    """What every wait for a background save runs first: the paced write goes on at full speed (nobody
    waits for a paced save), then a lazy snapshot confirms its copies on the waiting thread."""
    if pacer is None:
        return lazy.settle if lazy is not None else None

    def settle(timeout: float | None = None) -> None:
        pacer.hurry()
        if lazy is not None:
            lazy.settle(timeout)

    return settle
