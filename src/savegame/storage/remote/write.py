"""Writing one remote checkpoint: the transactions, which commit by writing the manifest last.

:class:`RemoteTransaction` uploads into a fresh version folder: it puts the ``.staging`` owner marker
(refreshing its heartbeat while the upload runs), opens one upload sink per data file
(:mod:`~savegame.storage.remote.upload`), then puts the version's manifest and, last, the commit
marker ``NAME/manifest.json`` (a conditional create unless overwriting), and after that removes the
marker and any older versions. :class:`RemoteJoinedTransaction` is another process's share of the
same upload (multi-process saves; it never commits). The step-by-step protocol and what a crash at
each step leaves: :mod:`savegame.storage.remote`. :meth:`~savegame.storage.remote.root.RemoteStorage.begin`
and ``join`` make them; the engine's write loop writes through their sinks.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from savegame._util.logs import get_logger
from savegame.errors import CheckpointError, CommitError, InvalidNameError, StorageError
from savegame.format.naming import check_checkpoint_name
from savegame.storage.base import MANIFEST
from savegame.storage.remote.layout import STAGING_MARKER, _new_version, versions_under
from savegame.storage.remote.upload import _MultipartSink, _Sink, _StreamSink

if TYPE_CHECKING:
    from savegame.storage.remote.root import RemoteStorage

log = get_logger("savegame")

_LIVE_OWNERS: set[str] = set()
"""Owner ids of the transactions running in this process (their version folders are never cleaned)."""
_LIVE_LOCK = threading.Lock()


class RemoteTransaction:
    """One checkpoint being uploaded into a fresh version folder (the protocol: :mod:`savegame.storage.remote`)."""

    def __init__(self, storage: RemoteStorage, name: str, *, overwrite: bool) -> None:
        self._setup(storage, name, _new_version(), overwrite=overwrite)
        self.owner = uuid.uuid4().hex
        with _LIVE_LOCK:
            _LIVE_OWNERS.add(self.owner)
        try:
            self._beat(force=True)
        except BaseException:
            with _LIVE_LOCK:
                _LIVE_OWNERS.discard(self.owner)
            raise

    def _setup(self, storage: RemoteStorage, name: str, version: str, *, overwrite: bool) -> None:
        """State shared with :class:`RemoteJoinedTransaction`: where the files go, the upload machinery."""
        self.storage = storage
        self.name = name
        self.overwrite = overwrite
        self.version = version
        self.owner = ""
        self.prefix = storage._key(name, version)
        self._sinks: list[_Sink] = []
        self._done = False
        self._started = time.time()
        self._last_beat = 0.0
        self._pool: ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(storage.max_concurrency)
        self._free: list[bytearray] = []
        self._free_lock = threading.Lock()

    @property
    def token(self) -> str:
        """The version folder this transaction writes: what other processes pass to
        :meth:`RemoteStorage.join` to upload their files into it (multi-process saves)."""
        return self.version

    def _beat(self, *, force: bool = False) -> None:
        """Write (or refresh) the ``.staging`` owner marker at most every ``heartbeat_seconds``."""
        now = time.time()
        if not force and now - self._last_beat < self.storage.heartbeat_seconds:
            return
        self._last_beat = now
        marker = {
            "format": "savegame-staging", "owner": self.owner, "host": socket.gethostname(),
            "pid": os.getpid(), "started": self._started, "heartbeat": now, "name": self.name,
        }  # fmt: skip
        self.storage._put(f"{self.prefix}/{STAGING_MARKER}", json.dumps(marker).encode())

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.storage.max_concurrency, "savegame-upload")
        return self._pool

    def _take_buffer(self, size: int) -> bytearray:
        with self._free_lock:
            while self._free:
                buf = self._free.pop()
                if len(buf) == size:
                    return buf
        return bytearray(size)

    def _give_buffer(self, buf: bytearray) -> None:
        with self._free_lock:
            if len(self._free) <= self.storage.max_concurrency:
                self._free.append(buf)

    def open(self, file: str) -> _Sink:
        """A sink for data file ``file``; an earlier sink still open is sealed (its tail starts
        uploading), so only one partly filled part buffer exists per transaction."""
        check_checkpoint_name(file)
        if file in (MANIFEST, STAGING_MARKER):
            raise InvalidNameError(f"{file} is written by the transaction itself, not open()")
        if self._done:
            raise CommitError(errno.EINVAL, f"transaction for {self.storage.url(self.name)} is finished")
        for previous in self._sinks:
            previous.seal()
        path = f"{self.prefix}/{file}"
        sink: _Sink = _MultipartSink(self, path) if self.storage.is_s3 else _StreamSink(self, path)
        self._sinks.append(sink)
        return sink

    def link(self, file: str, *, source_checkpoint: str, source_file: str, expect_hash: str | None = None) -> bool:
        """Copy data file ``source_file`` of committed checkpoint ``source_checkpoint`` into this version as
        ``file`` on the server (fsspec ``copy``: S3 CopyObject, no bytes through this process); the copy's
        size is checked against the source's. False when the source is gone or the copy fails: the caller
        then uploads the bytes (incremental saves, :mod:`savegame.engine.incremental`). ``expect_hash``: the
        hash the caller's manifest records for the file; False too when the committed version copied from
        lists another (the checkpoint was overwritten since the caller read its manifest)."""
        from savegame.format.manifest import parse_manifest
        from savegame.storage.remote.read import RemoteCheckpointReader

        check_checkpoint_name(file)
        check_checkpoint_name(source_checkpoint)
        check_checkpoint_name(source_file)
        if MANIFEST in (file, source_file) or STAGING_MARKER in (file, source_file):
            raise InvalidNameError(f"{MANIFEST} and {STAGING_MARKER} are never linked")
        if self._done:
            raise CommitError(errno.EINVAL, f"transaction for {self.storage.url(self.name)} is finished")
        st = self.storage
        dest = f"{self.prefix}/{file}"
        try:
            reader = RemoteCheckpointReader(st, source_checkpoint)
            version, sizes = reader.resolve()
            if source_file not in sizes:
                return False
            if expect_hash is not None:
                listed = parse_manifest(reader.manifest_bytes(), reader.file_where(MANIFEST)).files.get(source_file)
                if listed is None or listed.hash != expect_hash:
                    log.info("%s/%s changed since its manifest was read (overwritten?); uploading it instead",
                             source_checkpoint, source_file)  # fmt: skip
                    return False
            source = st._key(source_checkpoint, version, source_file)
            st._ensure_parent(dest)
            st._call(f"copying {st._where(source)} to {st._where(dest)}", st.fs.copy, source, dest)
            if int(st._info(dest)["size"]) != sizes[source_file]:
                st._rm([dest])
                return False
        except (CheckpointError, OSError) as exc:
            log.info("server-side copy of %s/%s failed (%s); uploading it instead", source_checkpoint, source_file,
                     exc)  # fmt: skip
            return False
        self._beat()
        return True

    def commit(self, manifest: bytes) -> str:
        """Finish the uploads, write the version's manifest, then the commit marker; return the URL."""
        st = self.storage
        url = st.url(self.name)
        try:
            for sink in self._sinks:
                sink.close()
            st._put(f"{self.prefix}/{MANIFEST}", manifest)
            self._publish(manifest)
        except CommitError:
            self.abort()
            raise
        except OSError as exc:
            self.abort()
            raise CommitError(
                exc.errno or errno.EIO, f"saving {url} failed, nothing was published: {st.scrub(str(exc))}"
            ) from None
        except BaseException:
            self.abort()
            raise
        self._finish()
        try:
            st._rm([f"{self.prefix}/{STAGING_MARKER}"])
            if self.overwrite:
                old = versions_under(st._key(self.name), st._list(st._key(self.name)))
                st._rm(p for v, files in old.items() if v != self.version and not st._is_live(files, by_age=False)
                       for p in files.values())  # fmt: skip
        except (StorageError, OSError) as exc:  # committed already; cleanup() finishes the job
            log.warning("%s committed, but removing leftovers failed (cleanup() will): %s", url, exc)
        return url

    def _publish(self, manifest: bytes) -> None:
        st = self.storage
        top = st._key(self.name, MANIFEST)
        if self.overwrite:
            st._put(top, manifest)
            return
        try:
            st._put(top, manifest, create=True)
        except FileExistsError:
            # A retried PUT whose first attempt did land reports "exists": then it is ours.
            if self._marker_is(manifest):
                return
            raise CommitError(errno.EEXIST, f"{st.url(self.name)} already exists") from None
        if not st.atomic_create and not self._marker_is(manifest):
            raise CommitError(errno.EEXIST, f"{st.url(self.name)} was created by another writer meanwhile")

    def _marker_is(self, manifest: bytes) -> bool:
        try:
            return self.storage._cat(self.storage._key(self.name, MANIFEST)) == manifest
        except FileNotFoundError:
            return False

    def _finish(self) -> None:
        self._done = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._free.clear()
        with _LIVE_LOCK:
            _LIVE_OWNERS.discard(self.owner)

    def finish(self) -> None:
        """Nothing to do for the owner: :meth:`commit` and :meth:`abort` release the upload threads
        (a joined participant's :meth:`RemoteJoinedTransaction.finish` does)."""
        return None

    def abort(self) -> None:
        """Stop the uploads and remove the version folder (best effort: cleanup() finishes the job)."""
        if self._done:
            return
        for sink in self._sinks:
            sink.discard()
        self._finish()
        try:
            self.storage._rm(self.storage._list(self.prefix))
        except (StorageError, OSError) as exc:
            where = self.storage._where(self.prefix)
            log.warning("could not remove the aborted upload %s (cleanup() will): %s", where, exc)


class RemoteJoinedTransaction(RemoteTransaction):
    """One process's share of an upload another process began (multi-process saves).

    Rank 0 calls :meth:`RemoteStorage.begin` and hands ``txn.token`` (its version folder) to the other
    ranks; each calls :meth:`RemoteStorage.join` and uploads its own files into ``NAME/<token>/`` through
    the same sinks (multipart on S3, parts in parallel, bounded memory). ``close`` on a sink completes
    that file's upload. Only the owner publishes, after every rank reported its files, so :meth:`commit`
    refuses (``CommitError`` EPERM). A participant writes no ``.staging`` marker of its own: the owner's
    marker protects the folder from :meth:`RemoteStorage.cleanup`; while a participant uploads it
    refreshes the heartbeat of that marker (so another rank's long upload keeps the folder alive while
    the owner waits), never creating one. :meth:`abort` removes only this participant's files (the
    owner's abort removes the whole version folder); :meth:`finish` releases the upload threads once
    the files are reported (they stay, for the owner to commit or remove).
    """

    def __init__(self, storage: RemoteStorage, name: str, version: str, marker: Mapping[str, Any]) -> None:
        self._setup(storage, name, version, overwrite=False)
        self._marker = dict(marker)
        self._last_beat = time.time()

    def _beat(self, *, force: bool = False) -> None:
        """Refresh the owner's heartbeat at most every ``heartbeat_seconds`` (its host and pid unchanged)."""
        now = time.time()
        if self._done or (not force and now - self._last_beat < self.storage.heartbeat_seconds):
            return
        self._last_beat = now
        self._marker["heartbeat"] = now
        try:
            self.storage._put(f"{self.prefix}/{STAGING_MARKER}", json.dumps(self._marker).encode())
        except (StorageError, OSError) as exc:  # the owner beats too; a missed refresh is not fatal
            log.warning("could not refresh the heartbeat of %s: %s", self.storage._where(self.prefix), exc)

    def commit(self, manifest: bytes) -> str:
        raise CommitError(
            errno.EPERM,
            f"only the process that began the upload of {self.storage.url(self.name)} commits it (joined here)",
        )

    def finish(self) -> None:
        """Release the upload threads and buffers; the uploaded files stay (the owner commits them)."""
        if not self._done:
            self._finish()

    def abort(self) -> None:
        """Stop this participant's uploads and delete the files it wrote (best effort)."""
        if self._done:
            return
        for sink in self._sinks:
            sink.discard()
        self._finish()
        try:
            self.storage._rm(sink.path for sink in self._sinks)
        except (StorageError, OSError) as exc:
            log.warning("could not remove the files of an aborted participant in %s (cleanup() will): %s",
                        self.storage._where(self.prefix), exc)  # fmt: skip
