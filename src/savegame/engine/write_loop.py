"""The one write loop: stream encoded items into a storage transaction and assemble the manifest.

Every save goes through here: the synchronous one (:func:`savegame.engine.writer.write_encoded`, used by
``savegame.save`` and the Checkpointer), the background one (the same function, run by the writer thread
of :mod:`savegame.engine.background`) and each rank's share of a multi-process save
(:func:`savegame.distributed.write_state`: its replicated and per-rank items, and the shard file that
:class:`savegame.distributed.dcp.SavegameStorageWriter` writes for DCP). :func:`write_files` writes every tensor
file of a transaction (hashing while writing, fsyncs of finished local files overlapped with the next
file, a progress bar, ``OSError`` translated into :class:`StorageError`); :func:`assemble_manifest` turns
the files and items into the manifest bytes the commit writes last, and the :class:`Manifest` a reader
would parse from them.

**The sink durability contract** (what :class:`~savegame.storage.base.FileSink` implementations in
:mod:`savegame.storage.local` and :mod:`savegame.storage.remote` guarantee, and what this loop relies on):

* ``write(data)`` writes all of ``data`` or raises ``OSError`` (a :class:`StorageError` for the remote
  sinks). When it returns, the sink no longer needs ``data``'s memory: it was written, or copied into a
  buffer of the sink's own. (Background saves give their snapshot buffers back once the save finished,
  and the encoder's zero-copy views of live tensors are only valid during the call.) Nothing written is
  durable, nor visible to readers, yet.
* ``close()`` makes the file durable: when it returns without error, the file's bytes survive a crash or
  power loss (local: fsync then close; remote: the upload finished). It may be called from another
  thread than the writes and more than once, also concurrently (:class:`~savegame.storage.local.LocalFileSink`):
  every later call waits for the first and raises its error, if any; a failed ``close`` is never
  retried, as a failed fsync may have lost data. After ``close`` no ``write`` may follow.
* ``txn.commit(manifest)`` closes every sink the transaction opened that is still open (so the owner of
  a transaction need not close its sinks) and waits for closes running elsewhere before it publishes;
  the files of a *joined* transaction (another rank's share) are not the owner's sinks: their writer
  must close them (``close_each=True``) before it reports the files to the owner.
* ``txn.abort()`` discards every sink (no fsync) and removes what the transaction wrote; after an error
  the caller aborts the transaction and nothing of it stays (no staging debris).

**Name clashes** (one rule for the sync, background and per-rank saves of a Checkpointer): a commit
refused because another writer took the name meanwhile (:class:`CommitError` with ``EEXIST`` or
``ENOTEMPTY``) is retried under the next free name, by :func:`retry_on_clash`, wherever the write runs: in
the caller's thread (sync), in the writer thread (background: the snapshot is still held, so nothing is
lost; the Checkpointer learns the final name when it integrates the save) or on every rank together
(per-rank: the errno is the same everywhere and rank 0's next name is the one used). Plain
``savegame.save(path, overwrite=False)`` has no ``next_name``: there the clash is the caller's error.

Who uses it: :mod:`savegame.engine.writer` (sync and background saves), :mod:`savegame.distributed` and
:mod:`savegame.distributed.dcp` (per-rank saves). It imports only layers below it (manifest, tensor files,
storage, progress).
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from savegame._util.logs import get_logger
from savegame._util.progress import ProgressBar
from savegame._util.workers import LazyPool
from savegame.engine.pacing import Pacer
from savegame.errors import BackgroundSaveError, CheckpointError, CommitError, ConfigError, StorageError
from savegame.format import hashing
from savegame.format.manifest import FileEntry, ItemEntry, Manifest, dump_manifest, utc_now, version_for
from savegame.format.tensorfile import order_for_alignment, write_tensor_file
from savegame.format.tree import ArrayRecord, decode_plain, encode_plain
from savegame.storage.base import FileSink, Transaction

__all__ = [
    "EncodedExtras", "EncodedItem", "NextName", "WrittenFiles", "assemble_manifest", "item_entries",
    "retry_on_clash", "write_files", "write_side_files",
]

log = get_logger("savegame")
T = TypeVar("T")


class EncodedItem:
    """One top-level item after capture and encoding, ready to write.

    ``pending``: builders of more records (:attr:`savegame.format.tree.Encoder.deferred`), run the first
    time :attr:`records` is read: a background snapshot's caller does not wait for them, the writer
    thread builds them.
    """

    __slots__ = ("_pending", "_records", "file", "kind", "name", "skeleton")

    def __init__(
        self, name: str, kind: str, skeleton: Any, records: list[ArrayRecord], file: str | None, *,
        pending: Sequence[Callable[[], list[ArrayRecord]]] = (),
    ) -> None:  # fmt: skip
        self.name = name
        self.kind = kind
        self.skeleton = skeleton
        self._records = records
        self.file = file
        self._pending = list(pending)

    @property
    def records(self) -> list[ArrayRecord]:
        """Every array record of the item (building the pending ones once, on first use)."""
        if self._pending:
            pending, self._pending = self._pending, []
            for build in pending:
                self._records += build()
        return self._records

    @property
    def nbytes(self) -> int:
        return sum(len(r.data.data) for r in self.records)

    def __repr__(self) -> str:
        return f"EncodedItem(name={self.name!r}, kind={self.kind!r}, file={self.file!r})"


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

    def with_progress(self, progress: Mapping[str, Any]) -> EncodedExtras:
        """The same metadata with another ``progress`` (a save retried under another name)."""
        return EncodedExtras(self.metadata, EncodedExtras.encode(None, progress).progress)


class _CountingSink:
    """Forwards writes to a storage sink and advances a progress display."""

    def __init__(
        self, sink: FileSink, progress: ProgressBar, should_stop: Callable[[], bool] | None = None,
        pacer: Pacer | None = None,
    ) -> None:  # fmt: skip
        self._sink = sink
        self._progress = progress
        self._should_stop = should_stop
        self._pacer = pacer

    def write(self, data: bytes | bytearray | memoryview) -> object:
        pacer = self._pacer
        if pacer is None or pacer.hurried:
            return self._write(data)
        result: object = None
        for piece in pacer.chunks(data):  # bounded chunks, each due at the pacer's rate
            pacer.before(piece.nbytes)
            result = self._write(piece)
        return result

    def _write(self, data: bytes | bytearray | memoryview) -> object:
        if self._should_stop is not None and self._should_stop():
            raise BackgroundSaveError(f"{self._progress.label}: aborted at interpreter exit (nothing was saved)")
        result = self._sink.write(data)
        self._progress.advance(len(data) if not isinstance(data, memoryview) else data.nbytes)
        return result


def _early_close(sink: FileSink) -> Callable[[], None] | None:
    """For a local file sink: its ``close`` (fsync + close), to run on a worker thread while the next
    file is written; the transaction's commit then finds it closed. None for other sinks."""
    from savegame.storage.local import LocalFileSink

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


@dataclass
class WrittenFiles:
    """The files :func:`write_files` wrote, and the closes (fsyncs) of local ones still running."""

    files: dict[str, FileEntry]
    closing: list[Future[None]] = field(default_factory=list)

    def settled(self) -> None:
        """After the commit (which waited for every file and raised a failed close): collect the
        finished closes so none is reported as an unretrieved error."""
        for future in self.closing:
            future.exception()


def write_files(
    txn: Transaction, items: list[EncodedItem], progress: ProgressBar, *,
    should_stop: Callable[[], bool] | None = None, close_each: bool = False, pacer: Pacer | None = None,
) -> WrittenFiles:  # fmt: skip
    """Write the tensor file of every item that has arrays into ``txn``; return their entries.

    Each finished local file is fsynced (``close``) on a worker thread while the next one is written. With
    ``close_each=False`` (the owner of the transaction, who commits next) the last closes may still run when
    this returns: the commit waits for them. With ``close_each=True`` (a rank writing its share of another
    process's transaction) every file is closed, i.e. durable, when this returns. ``progress`` advances
    with every write; ``should_stop`` is checked before every write and raises
    :class:`BackgroundSaveError` when it says so. ``pacer``: writes go out in bounded chunks at its rate
    (:mod:`savegame.engine.pacing`).

    Raises :class:`StorageError` for an ``OSError`` (disk full, I/O error), only after every close still
    running finished; the caller aborts ``txn`` (see the sink contract in the module docstring).
    """
    written = WrittenFiles({})
    try:
        try:
            for item in items:
                if item.file is None:
                    continue
                sink = txn.open(item.file)
                records = order_for_alignment([r.data for r in item.records])
                result = write_tensor_file(_CountingSink(sink, progress, should_stop, pacer), records)
                written.files[item.file] = FileEntry(bytes=result.bytes, hash=result.hash)
                close = _early_close(sink)
                if close is not None:
                    written.closing.append(_fsyncs.get().submit(close))
                elif close_each:
                    sink.close()
            if close_each:
                _wait_all(written.closing)
        except BaseException:
            _wait_all(written.closing)  # no fsync keeps running behind an error; a failed one is what is reported
            raise
    except OSError as exc:
        raise StorageError(exc.errno, f"writing checkpoint {txn.name} failed: {exc.strerror or exc}") from exc
    return written


def write_side_files(txn: Transaction, files: Mapping[str, bytes], *, taken: Collection[str]) -> None:
    """Write small non-tensor files (an integration's ``config.json``, ``trainer_state.json``) into ``txn``.

    They are published by the same commit as the tensor files (same staging directory, fsynced by the
    commit, visible all at once or not at all) but are not listed in the manifest's ``files``, which
    holds tensor files only: the caller records their hashes (e.g. in the manifest's metadata) and checks
    them when it reads them. ``taken``: the tensor files' names, which a side file may not reuse.
    """
    for name, data in files.items():
        if name in taken:
            raise ConfigError(f"side file {name!r} of checkpoint {txn.name} has the name of one of its tensor files")
        try:
            txn.open(name).write(data)
        except StorageError:
            raise
        except OSError as exc:
            detail = exc.strerror or exc
            raise StorageError(exc.errno, f"writing {name} of checkpoint {txn.name} failed: {detail}") from exc


def assemble_manifest(
    files: Mapping[str, FileEntry], items: Mapping[str, ItemEntry], extras: EncodedExtras, *,
    versions: Mapping[str, str],
) -> tuple[bytes, Manifest]:  # fmt: skip
    """The manifest bytes of a checkpoint made of ``files`` and ``items``, and the :class:`Manifest` equal
    to what :func:`~savegame.format.manifest.parse_manifest` reads back from them (so a save need not re-parse)."""
    created = utc_now()
    raw = dump_manifest(
        created=created, versions=dict(versions), metadata=extras.metadata, progress=extras.progress,
        files=dict(files), items=dict(items),
    )  # fmt: skip
    manifest = Manifest(
        created=created,
        versions=dict(versions),
        metadata=decode_plain(extras.metadata) if extras.metadata is not None else {},
        progress=decode_plain(extras.progress) if extras.progress is not None else None,
        files=dict(files),
        items=dict(items),
        format_version=version_for(items.values()),
        hash_chunk_bytes=hashing.HASH_CHUNK_BYTES,
        raw_metadata=extras.metadata,
        raw_progress=extras.progress,
    )
    return raw, manifest


def item_entries(items: list[EncodedItem]) -> dict[str, ItemEntry]:
    """The manifest entries of encoded items."""
    return {i.name: ItemEntry(kind=i.kind, file=i.file, skeleton=i.skeleton) for i in items}


NextName = Callable[[str], tuple[str, Mapping[str, Any]]]
"""Given the name another writer took, the next name to try and the ``progress`` to record under it (the
Checkpointer's progress names the checkpoint, e.g. as the best)."""

MAX_NAME_ATTEMPTS = 1000
_NAME_TAKEN = (errno.EEXIST, errno.ENOTEMPTY)


def retry_on_clash(
    write: Callable[[str, Mapping[str, Any] | None], T], name: str, next_name: NextName | None, *, where: str
) -> T:
    """``write(name, None)``; while its commit is refused because the name was taken meanwhile, call
    ``write(other, progress)`` with what ``next_name`` gives (see "Name clashes" in the module docstring).

    ``progress`` None means the progress the save was started with. Without ``next_name`` the clash is
    raised as it is. Gives up with :class:`CheckpointError` after :data:`MAX_NAME_ATTEMPTS` names.
    """
    progress: Mapping[str, Any] | None = None
    for _ in range(MAX_NAME_ATTEMPTS):
        try:
            return write(name, progress)
        except CommitError as exc:
            if next_name is None or exc.errno not in _NAME_TAKEN:
                raise
            taken = name
            name, progress = next_name(taken)
            log.warning("saving %s: another writer took the name %s meanwhile; saving as %s instead", where, taken,
                        name)  # fmt: skip
    raise CheckpointError(
        f"could not find a free checkpoint name for {where}: {MAX_NAME_ATTEMPTS} names were taken by other "
        f"writers while saving, the last {name!r}; is another process saving into the same directory?"
    )
