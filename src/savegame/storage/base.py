"""The storage protocols: what the writer and the Checkpointer need from a place that holds checkpoints.

A *root* holds checkpoints, each a named folder of files. Writing one goes through a
:class:`Transaction`, which makes the whole folder appear at once or not at all:

1. ``storage.begin(name)`` -> a transaction (nothing visible yet);
2. ``txn.open(file)`` -> a :class:`FileSink` per data file; ``write`` its bytes, then ``close()``
   (which makes the file durable);
3. ``txn.commit(manifest)`` writes ``manifest.json`` last and publishes the folder: an atomic rename on
   a filesystem, the manifest itself as the commit marker on an object store;
4. on any error, ``txn.abort()`` removes everything the transaction wrote.

Readers only ever list and open committed checkpoints: ``storage.reader(name)`` gives a
:class:`CheckpointReader` (manifest bytes, file sizes, whole files as buffers), and
``storage.ref(name)`` a :class:`CheckpointRef` that ``savegame.load/verify/read_manifest`` accept.
Implementations: :mod:`.local` (a directory) and :mod:`.remote` (any fsspec URL: S3, GCS, memory...).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

MANIFEST = "manifest.json"
STAGING_PREFIX = ".staging-"
QUARANTINE_PREFIX = ".quarantine-"
TRASH_PREFIX = ".trash-"


class FileSink(Protocol):
    """A file being written. ``write`` writes all of ``data``; ``close`` makes it durable.

    The full contract (memory of ``data``, concurrent ``close``, who closes what) is the sink durability
    contract in :mod:`savegame.engine.write_loop`, the one loop that writes through sinks."""

    def write(self, data: bytes | bytearray | memoryview) -> int: ...

    def close(self) -> None: ...


class Transaction(Protocol):
    """One checkpoint being written (see the module docstring for the call order).

    :attr:`token` and :meth:`finish` serve multi-process saves (:mod:`savegame.distributed`); a class
    that subclasses this protocol inherits their defaults (not shareable; nothing to release).

    Optional, looked up with ``getattr`` (absent: the caller writes the bytes itself):
    ``link(file, *, source_checkpoint, source_file) -> bool`` makes ``file`` of this transaction hold
    the bytes of data file ``source_file`` of the committed checkpoint ``source_checkpoint`` of the same
    storage without moving them through this process (a hard link locally: ``LocalTransaction.link``),
    never modifying the source; False when it cannot. Incremental saves use it
    (:mod:`savegame.engine.incremental`).
    """

    name: str

    def open(self, file: str) -> FileSink: ...

    def commit(self, manifest: bytes) -> str: ...

    def abort(self) -> None: ...

    @property
    def token(self) -> str | None:
        """What other processes pass to :meth:`Storage.join` to write into this transaction (a staging
        folder name, a version prefix); None when it cannot be shared by several processes."""
        return None

    def finish(self) -> None:
        """Release what a joined participant holds (upload threads, buffers) once its files are
        reported; its files stay for the owner to commit. Called after every multi-process save,
        whatever its outcome; nothing to do by default."""
        return None


class Storage(Protocol):
    """A root of checkpoints.

    Required: :attr:`root` and every method without a default below. Optional (a class that subclasses
    this protocol inherits the default): :meth:`join` (multi-process saves) and :meth:`check_target`.
    """

    root: str
    """The root's path or URL, for messages and as the Checkpointer's ``directory`` (never credentials)."""

    def begin(self, name: str, *, overwrite: bool = False) -> Transaction: ...

    def committed(self) -> list[str]: ...

    def delete(self, name: str) -> None: ...

    def quarantine(self, name: str) -> str: ...

    def cleanup(self) -> list[str]: ...

    def path(self, name: str) -> str:
        """The path or URL of checkpoint ``name`` (same as :meth:`url`; kept for the Checkpointer)."""
        ...

    def join(self, name: str, token: str) -> Transaction:
        """Write into the transaction another process began with ``begin(name)`` (``token``: its
        :attr:`Transaction.token`), never committing it. The default refuses: not shareable."""
        from savegame.errors import ConfigError

        raise ConfigError(f"{type(self).__name__} cannot be shared by several processes (no join())")

    def check_target(self, name: str, *, overwrite: bool) -> None:
        """Raise now what :meth:`begin` would raise for ``name`` (e.g. :class:`~savegame.OccupiedPathError`),
        so a background save reports it in the caller's thread. The default checks nothing (``begin``
        still does)."""
        return None

    # Reading (see :class:`CheckpointReader`)

    def url(self, name: str) -> str:
        """Where checkpoint ``name`` lives, for messages and records (a path or URL, never credentials)."""
        ...

    def exists(self, name: str) -> bool:
        """Whether ``name`` is a committed checkpoint (its manifest exists)."""
        ...

    def reader(self, name: str) -> CheckpointReader:
        """Open committed checkpoint ``name`` for reading.

        Raises :class:`~savegame.errors.CheckpointNotFoundError` when nothing is there and
        :class:`~savegame.errors.NotACheckpointError` when something is there but no manifest.
        """
        ...

    def ref(self, name: str) -> CheckpointRef:
        """A handle on checkpoint ``name`` that :mod:`savegame.api` functions accept in place of a path."""
        ...


SharedTransaction = Transaction
"""Kept for old imports: every :class:`Transaction` declares :attr:`~Transaction.token` now."""

SharedStorage = Storage
"""Kept for old imports: every :class:`Storage` declares :meth:`~Storage.join` now (the default refuses)."""


ReadBuffer = bytes | bytearray | memoryview | mmap.mmap
"""The bytes of one whole file: a copy-on-write mapping locally, a downloaded buffer remotely."""


class CheckpointReader(Protocol):
    """One committed checkpoint opened for reading.

    A reader is pinned to the manifest it read first: on an object store, where an overwrite uploads a
    new version next to the old one, every file comes from the version that manifest describes.
    Optional (a class that subclasses this protocol inherits the default): :meth:`iter_file` (the
    default reads the whole file), :meth:`close` (nothing to release) and :meth:`prefetch` (no hint).
    """

    where: str
    """The checkpoint's path or URL, for messages."""

    def manifest_bytes(self) -> bytes:
        """The raw ``manifest.json`` (read once, at most :data:`~savegame.format.manifest.MAX_MANIFEST_BYTES`)."""
        ...

    def file_where(self, file: str) -> str:
        """Path or URL of data file ``file``, for messages."""
        ...

    def file_size(self, file: str) -> int:
        """Size of data file ``file`` in bytes; ``FileNotFoundError`` if it is missing."""
        ...

    def read_file(self, file: str, size: int) -> ReadBuffer:
        """The whole of data file ``file``, which the caller checked is ``size`` bytes long."""
        ...

    def iter_file(self, file: str, size: int) -> Iterator[memoryview]:
        """Data file ``file`` (``size`` bytes) in order, in pieces, each valid until the next is asked
        for: a streaming copy (the mirror) holds one piece, not the whole file. Default: one piece."""
        yield memoryview(self.read_file(file, size))

    def close(self) -> None:
        """Release what the reader holds (a directory handle); reading again may reopen. Default: nothing."""
        return None

    def prefetch(self, files: Iterable[str] | None) -> None:
        """A hint that ``files`` (``None``: the manifest and the data files, not yet known) are read
        next (a local reader opens them and starts their reads at once, so they overlap on a cold
        cache); changes no result. Default: nothing."""
        return None


@dataclass(frozen=True)
class CheckpointRef:
    """Checkpoint ``name`` of ``storage``: what ``savegame.load/verify/read_manifest`` accept besides a
    path or URL, so a caller holding a configured storage (e.g. a remote root with its options) reads
    through it instead of building a new one."""

    storage: Storage
    name: str

    def __str__(self) -> str:
        return self.storage.url(self.name)


PathLike = str | os.PathLike[str]
"""A local path or an fsspec URL."""

SavedAt = PathLike | CheckpointRef
"""Where a checkpoint is written or found: a local path, an fsspec URL (``s3://bucket/run/NAME``) or a
:class:`CheckpointRef` (``storage.ref(name)`` of a configured storage). Distributed saves and loads
take this."""

Location = SavedAt | CheckpointReader
"""What the read functions accept: a :data:`SavedAt`, or an open :class:`CheckpointReader` (a caller
that already holds one reads through it)."""
