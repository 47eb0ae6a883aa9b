"""Checkpoints on a local (POSIX) filesystem: staging directory, fsync, manifest last, atomic rename.

The commit protocol, step by step (each step's failure leaves older checkpoints untouched):

1. create ``ROOT/.staging-<host>-<pid>-<uuid>/`` (invisible to readers: names starting with ``.`` are
   never checkpoints);
2. write each data file there and ``fsync`` it (the writer does this on worker threads, overlapped); a
   large data file's bytes bypass the page cache (``O_DIRECT``, :mod:`~savegame.storage.local.direct`);
3. write ``manifest.json`` and ``fsync`` it (overlapping the data files' fsyncs still running: nothing in
   a staging directory is ever read), wait until every file is durable, then ``fsync`` the staging
   directory;
4. publish: ``rename(staging, ROOT/NAME)`` (which replaces at most an empty directory). Only a savegame
   checkpoint is ever replaced: anything else at NAME (a file, a symlink, a non-empty directory without
   a savegame manifest) raises :class:`OccupiedPathError` and is left untouched (checked by ``begin``,
   again here, and once more on what a swap took out). If NAME exists and overwriting was asked for, the two
   directories are swapped atomically (``renameat2(RENAME_EXCHANGE)``) and the old one removed after;
   where the kernel or filesystem lacks that, the old one is first renamed to ``.trash-...`` (a crash
   in between leaves it there, complete, and :meth:`LocalStorage.cleanup` puts it back);
5. ``fsync(ROOT)`` so the rename itself is durable.

When :meth:`LocalTransaction.commit` returns, the checkpoint survives a power loss. Every system call
goes through a :class:`FileOps` object so tests can inject ENOSPC / EIO at any step.

The package, one job per module (each imports only those above it in this list):

- :mod:`~savegame.storage.local.direct`: direct I/O for large data files (aligned staging buffers,
  written on a worker while the next fills; buffered fallback);
- :mod:`~savegame.storage.local.ops`: the :class:`FileOps` seam (every system call) and the
  ``OSError`` -> :class:`StorageError` translation;
- :mod:`~savegame.storage.local.occupancy`: what is at a save path and whether a save may replace it;
- :mod:`~savegame.storage.local.read`: :func:`open_local_checkpoint` and :class:`LocalCheckpointReader`;
- :mod:`~savegame.storage.local.write`: :class:`LocalFileSink`, :class:`LocalTransaction` (staging,
  manifest last, fsync, publish by rename or swap, fsync of the root), :class:`JoinedTransaction`;
- :mod:`~savegame.storage.local.root`: :class:`LocalStorage` (begin/join, listing, delete, quarantine,
  cleanup) and :func:`staging_is_live`.

This module re-exports their names, so ``from savegame.storage.local import X`` keeps working for every
name the single module had (also the error classes, base constants and helpers it imported, for one
release). Module globals are read where they are defined: to swap the default
:class:`FileOps`, set ``savegame.storage.local.ops.DEFAULT_OPS`` (setting it here has no effect).
"""

from __future__ import annotations

from savegame.errors import CheckpointNotFoundError as CheckpointNotFoundError
from savegame.errors import CommitError as CommitError
from savegame.errors import InvalidManifestError as InvalidManifestError
from savegame.errors import InvalidNameError as InvalidNameError
from savegame.errors import NotACheckpointError as NotACheckpointError
from savegame.errors import OccupiedPathError as OccupiedPathError
from savegame.errors import StorageError as StorageError
from savegame.errors import TruncatedFileError as TruncatedFileError
from savegame.format.naming import check_checkpoint_name as check_checkpoint_name  # re-exported: its old home
from savegame.format.naming import validate_name as validate_name
from savegame.format.tensorfile import check_allocated as check_allocated
from savegame.storage.base import MANIFEST as MANIFEST
from savegame.storage.base import QUARANTINE_PREFIX as QUARANTINE_PREFIX
from savegame.storage.base import STAGING_PREFIX as STAGING_PREFIX
from savegame.storage.base import TRASH_PREFIX as TRASH_PREFIX
from savegame.storage.base import CheckpointRef as CheckpointRef
from savegame.storage.liveness import FOREIGN_WRITER_GRACE_SECONDS as FOREIGN_WRITER_GRACE_SECONDS
from savegame.storage.liveness import writer_is_live as writer_is_live
from savegame.storage.local.occupancy import _SAVEGAME_MANIFEST as _SAVEGAME_MANIFEST
from savegame.storage.local.occupancy import ABSENT as ABSENT
from savegame.storage.local.occupancy import CHECKPOINT as CHECKPOINT
from savegame.storage.local.occupancy import EMPTY_DIRECTORY as EMPTY_DIRECTORY
from savegame.storage.local.occupancy import check_save_target as check_save_target
from savegame.storage.local.occupancy import occupant as occupant
from savegame.storage.local.occupancy import occupied_error as occupied_error
from savegame.storage.local.occupancy import starts_like_manifest as starts_like_manifest
from savegame.storage.local.ops import _RENAME_EXCHANGE as _RENAME_EXCHANGE
from savegame.storage.local.ops import DEFAULT_OPS as DEFAULT_OPS
from savegame.storage.local.ops import FileOps as FileOps
from savegame.storage.local.ops import _io_error as _io_error
from savegame.storage.local.ops import _renameat2_exchange as _renameat2_exchange
from savegame.storage.local.read import _READ_FLAGS as _READ_FLAGS
from savegame.storage.local.read import ITER_PIECE_BYTES as ITER_PIECE_BYTES
from savegame.storage.local.read import SMALL_FILE_BYTES as SMALL_FILE_BYTES
from savegame.storage.local.read import LocalCheckpointReader as LocalCheckpointReader
from savegame.storage.local.read import _read_aligned as _read_aligned
from savegame.storage.local.read import open_local_checkpoint as open_local_checkpoint
from savegame.storage.local.root import STALE_FOREIGN_SECONDS as STALE_FOREIGN_SECONDS
from savegame.storage.local.root import LocalStorage as LocalStorage
from savegame.storage.local.root import _is_regular_file as _is_regular_file
from savegame.storage.local.root import leftover_kind as leftover_kind
from savegame.storage.local.root import remove_dead_staging_once as remove_dead_staging_once
from savegame.storage.local.root import staging_is_live as staging_is_live
from savegame.storage.local.write import JoinedTransaction as JoinedTransaction
from savegame.storage.local.write import LocalFileSink as LocalFileSink
from savegame.storage.local.write import LocalTransaction as LocalTransaction

__all__ = [
    "ABSENT",
    "CHECKPOINT",
    "DEFAULT_OPS",
    "EMPTY_DIRECTORY",
    "ITER_PIECE_BYTES",
    "SMALL_FILE_BYTES",
    "STALE_FOREIGN_SECONDS",
    "FileOps",
    "JoinedTransaction",
    "LocalCheckpointReader",
    "LocalFileSink",
    "LocalStorage",
    "LocalTransaction",
    "check_checkpoint_name",
    "check_save_target",
    "leftover_kind",
    "occupant",
    "occupied_error",
    "open_local_checkpoint",
    "remove_dead_staging_once",
    "staging_is_live",
    "starts_like_manifest",
]
