"""Checkpoints on object storage (any fsspec URL): data first, the manifest last, versions instead of rename.


Object stores cannot rename a folder atomically, so a checkpoint is published by writing one object
last: its manifest. ``ROOT/NAME/manifest.json`` is the commit marker (NAME is committed iff it
exists); each upload goes into its own version folder ``ROOT/NAME/VERSION/``, a complete checkpoint
directory with its own copy of the manifest and, while the upload runs, a ``.staging`` owner marker
(the picture: :mod:`~savegame.storage.remote.layout`).

Writing (:meth:`RemoteStorage.begin`, :class:`RemoteTransaction`; ``begin`` first refuses, with
:class:`OccupiedPathError`, a NAME that is an object or holds objects that are not savegame's, see
:meth:`RemoteStorage.check_target`):

1. put ``NAME/VERSION/.staging`` (who is writing, refreshed while the upload runs);
2. upload every data file into ``NAME/VERSION/`` (multipart, parts in parallel, bounded memory);
3. put ``NAME/VERSION/manifest.json``;
4. **commit**: put ``NAME/manifest.json``. With ``overwrite=False`` this is a conditional create
   (``If-None-Match: *`` on S3, exclusive create on ``memory://``): of two writers racing for NAME
   exactly one wins and the other gets :class:`CommitError` (EEXIST). Stores without conditional create
   fall back to check-then-put plus a read-back; two writers racing inside that window can both
   believe they won, but readers still always see one complete version (the other becomes an orphan).
   With ``overwrite=True`` the PUT replaces the marker atomically: readers see the old version or the
   new one, never a mix, because the old version's files are untouched until the new marker is in;
5. delete the ``.staging`` marker and, after an overwrite, the older versions (manifest first).

Several processes (a ``torch.distributed`` save, :mod:`savegame.distributed`) write one checkpoint:
rank 0 begins and sends ``txn.token`` (its version folder) to the others, which :meth:`RemoteStorage.join`
it and upload their own files into the same ``NAME/VERSION/`` (:class:`RemoteJoinedTransaction`: no
marker of their own, never a commit); rank 0 writes the manifests and commits once every rank has
reported its files, so a partial distributed checkpoint is never listed.

A reader takes ``NAME/manifest.json`` and reads the files of the version whose own manifest has the
same bytes (:class:`RemoteCheckpointReader`), so an overwrite running meanwhile cannot mix versions.

Crash anywhere before step 4: nothing is listed (:meth:`RemoteStorage.committed` lists only names with
a commit marker), older checkpoints are untouched, and :meth:`RemoteStorage.cleanup` later removes the
version folder: at once if its marker names a dead process on this host, after ``grace_seconds`` if
it belongs to another host (whose writer refreshes its heartbeat every ``grace_seconds / 6``), along
with unfinished multipart uploads. A version folder without marker or commit (a crash mid-delete, an
overwrite's predecessor) is removed once its newest object is older than the grace period.

Transfers: files are streamed in parts of ``part_size`` bytes (8 MiB by default); at most
``max_concurrency`` parts are in flight, so an upload holds at most ``(max_concurrency + 1) *
part_size`` bytes of buffers however large the checkpoint. Reads download a whole file into one
buffer with parallel ranged GETs, then its hash is checked on that buffer. Every request is retried
with exponential backoff on transient errors (HTTP 5xx, connection resets, timeouts), never on 4xx.

Credentials come from the usual places (``storage_options``, environment, ``~/.aws``, instance
metadata: whatever fsspec's backend does). They never appear in our messages or logs: URLs are shown
without user info or query string and every message built from a backend error is scrubbed of the
secret values this storage knows about.

fsspec and its backends are imported only when a remote root is used (``pip install savegame[s3]``).

The package, one job per module (each imports only those above it in this list):

- :mod:`~savegame.storage.remote.transport`: :class:`RemoteTransport`, every request (the fsspec
  filesystem, retries on transient errors, ``StorageError`` translation scrubbed of secrets, ranged
  downloads);
- :mod:`~savegame.storage.remote.layout`: object names (version folders, the owner marker);
- :mod:`~savegame.storage.remote.read`: :class:`RemoteCheckpointReader`, pinned to one version;
- :mod:`~savegame.storage.remote.upload`: the upload sinks (multipart on S3, bounded memory);
- :mod:`~savegame.storage.remote.write`: :class:`RemoteTransaction` (manifest last, conditional
  create) and :class:`RemoteJoinedTransaction`;
- :mod:`~savegame.storage.remote.root`: :class:`RemoteStorage` (begin/join, listing, delete,
  quarantine, cleanup).

This module re-exports their names, so ``from savegame.storage.remote import X`` keeps working for every
name the single module had (also the error classes, base constants and helpers it imported, for one
release). Module globals are read where they are defined (patch them there).
"""

from __future__ import annotations

from savegame.errors import CheckpointError as CheckpointError
from savegame.errors import CheckpointNotFoundError as CheckpointNotFoundError
from savegame.errors import CommitError as CommitError
from savegame.errors import ConfigError as ConfigError
from savegame.errors import InvalidManifestError as InvalidManifestError
from savegame.errors import InvalidNameError as InvalidNameError
from savegame.errors import MissingFileError as MissingFileError
from savegame.errors import NotACheckpointError as NotACheckpointError
from savegame.errors import OccupiedPathError as OccupiedPathError
from savegame.errors import StorageError as StorageError
from savegame.errors import TruncatedFileError as TruncatedFileError
from savegame.format.naming import check_checkpoint_name as check_checkpoint_name
from savegame.format.naming import validate_name as validate_name
from savegame.storage.base import MANIFEST as MANIFEST
from savegame.storage.base import QUARANTINE_PREFIX as QUARANTINE_PREFIX
from savegame.storage.base import CheckpointRef as CheckpointRef
from savegame.storage.liveness import FOREIGN_WRITER_GRACE_SECONDS as FOREIGN_WRITER_GRACE_SECONDS
from savegame.storage.liveness import writer_is_live as writer_is_live
from savegame.storage.local.occupancy import starts_like_manifest as starts_like_manifest
from savegame.storage.remote.layout import _VERSION_RE as _VERSION_RE
from savegame.storage.remote.layout import STAGING_MARKER as STAGING_MARKER
from savegame.storage.remote.layout import _new_version as _new_version
from savegame.storage.remote.layout import versions_under as versions_under
from savegame.storage.remote.read import RemoteCheckpointReader as RemoteCheckpointReader
from savegame.storage.remote.root import DEFAULT_GRACE_SECONDS as DEFAULT_GRACE_SECONDS
from savegame.storage.remote.root import RemoteStorage as RemoteStorage
from savegame.storage.remote.transport import _SECRET_OPTION as _SECRET_OPTION
from savegame.storage.remote.transport import _TRANSIENT_ERRNOS as _TRANSIENT_ERRNOS
from savegame.storage.remote.transport import _TRANSIENT_TYPE_NAMES as _TRANSIENT_TYPE_NAMES
from savegame.storage.remote.transport import DEFAULT_CONCURRENCY as DEFAULT_CONCURRENCY
from savegame.storage.remote.transport import DEFAULT_PART_SIZE as DEFAULT_PART_SIZE
from savegame.storage.remote.transport import MIN_PART_SIZE as MIN_PART_SIZE
from savegame.storage.remote.transport import RemoteTransport as RemoteTransport
from savegame.storage.remote.transport import T as T
from savegame.storage.remote.transport import _collect_secrets as _collect_secrets
from savegame.storage.remote.transport import _http_status as _http_status
from savegame.storage.remote.transport import _import_fsspec as _import_fsspec
from savegame.storage.remote.transport import _mtime as _mtime
from savegame.storage.remote.transport import display_url as display_url
from savegame.storage.remote.transport import is_transient as is_transient
from savegame.storage.remote.transport import log as log
from savegame.storage.remote.upload import _MAX_PARTS as _MAX_PARTS
from savegame.storage.remote.upload import _BufferReader as _BufferReader
from savegame.storage.remote.upload import _bytes_view as _bytes_view
from savegame.storage.remote.upload import _MultipartSink as _MultipartSink
from savegame.storage.remote.upload import _Sink as _Sink
from savegame.storage.remote.upload import _StreamSink as _StreamSink
from savegame.storage.remote.write import _LIVE_LOCK as _LIVE_LOCK
from savegame.storage.remote.write import _LIVE_OWNERS as _LIVE_OWNERS
from savegame.storage.remote.write import RemoteJoinedTransaction as RemoteJoinedTransaction
from savegame.storage.remote.write import RemoteTransaction as RemoteTransaction

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_GRACE_SECONDS",
    "DEFAULT_PART_SIZE",
    "MIN_PART_SIZE",
    "STAGING_MARKER",
    "RemoteCheckpointReader",
    "RemoteJoinedTransaction",
    "RemoteStorage",
    "RemoteTransaction",
    "RemoteTransport",
    "display_url",
    "is_transient",
    "versions_under",
]
