"""Local first, then remote: a background uploader that mirrors a checkpoint directory to object storage.

Training commits each checkpoint to the fast local disk (so it resumes quickly) and a :class:`Mirror`
copies committed checkpoints to a remote root (``s3://bucket/run``, or any path/URL) in a background
thread, newest first. A spot node that dies takes its disk with it; a fresh node restores with
:meth:`Mirror.restore_newest`, which picks the newest *valid* checkpoint of either side and, when it
is remote only, downloads it into the local directory first (verifying every byte on the way).

What is uploaded is byte-identical to the local checkpoint (the same manifest, the same files), and
each upload is committed remotely with the manifest last (see :mod:`savegame.storage.remote`): an
upload cut short by a crash is never listed, and the next ``cleanup()`` removes it. A local file whose
hash does not match its manifest is never uploaded.

Retention follows the local side: a checkpoint this mirror saw locally and that has since been deleted
there (by the Checkpointer's keep policy) is deleted remotely too, but only once a newer checkpoint is
committed remotely, so the remote side never loses its newest checkpoint and never deletes one before
its successor is there. Remote checkpoints this mirror never saw locally (another node's, a previous
run's) are left alone; :meth:`Mirror.prune_remote` applies an explicit keep set to them.

Usage::

    mirror = Mirror("/scratch/run", "s3://bucket/run").start()
    ...  # after each local save (and retention):
    mirror.notify()
    ...
    mirror.close()          # waits for pending uploads

    path = Mirror("/scratch/run", "s3://bucket/run").restore_newest()   # fresh node: may download
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from savegame._util.logs import get_logger, warn
from savegame.engine.verifier import copy_checked, verify_checkpoint
from savegame.errors import CheckpointError, CommitError, CorruptCheckpointError, ResumeWarning
from savegame.format.manifest import FileEntry, Manifest, parse_manifest
from savegame.storage import LocalStorage, storage_for
from savegame.storage.base import MANIFEST, Storage
from savegame.storage.remote import display_url

log = get_logger("savegame")

@dataclass
class SyncReport:
    """What one :meth:`Mirror.sync` pass did."""

    uploaded: list[str] = field(default_factory=list)
    deleted_remote: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Known:
    manifest: bytes
    created: float


class Mirror:
    """Mirror the committed checkpoints of ``local_root`` to ``remote_url`` (see the module docstring).

    ``storage_options``: passed to fsspec for ``remote_url``. ``remote``: an already configured storage
    instead of ``remote_url`` (``remote_url`` is then only used in messages). ``poll_seconds``: the
    background thread also looks for new local checkpoints this often without :meth:`notify`.
    ``retention``: delete remote checkpoints that were deleted locally (see the module docstring).
    """

    def __init__(
        self,
        local_root: str | os.PathLike[str],
        remote_url: str | os.PathLike[str],
        *,
        storage_options: Mapping[str, Any] | None = None,
        remote: Storage | None = None,
        poll_seconds: float = 60.0,
        retention: bool = True,
    ) -> None:
        self.local = LocalStorage(local_root)
        if remote is None:
            remote = storage_for(remote_url, storage_options=storage_options)
        self.remote: Storage = remote
        self.remote_url = display_url(str(remote_url)) if "://" in str(remote_url) else str(remote_url)
        """The remote root as shown in messages and logs: without user info, query or fragment (credentials)."""
        self.poll_seconds = float(poll_seconds)
        self.retention = bool(retention)
        self.last_error: BaseException | None = None
        self._seen_local: set[str] = set(self.local.committed())
        self._remote_known: dict[str, _Known] = {}
        self._uploaded_files: dict[tuple[str, int], tuple[str, str]] = {}
        """(hash, bytes) of each data file this mirror uploaded -> (remote checkpoint, file name): where a
        later incremental checkpoint's linked file already is, to be copied on the server, not uploaded."""
        self._sync_lock = threading.Lock()
        self._cond = threading.Condition()
        self._requested = 0
        self._completed = 0
        self._failed_generation = -1
        self._stop = False
        self._thread: threading.Thread | None = None
        self._cleaned = False
        self.verified: tuple[str, Manifest] | None = None
        """``(name, manifest)`` of the local checkpoint the last :meth:`restore_newest` fully verified."""

    def __repr__(self) -> str:
        return f"Mirror({self.local.root!r} -> {self.remote_url!r})"

    # -- background thread ----------------------------------------------------------------------------

    def start(self) -> Mirror:
        """Start the background uploader (idempotent); returns ``self``."""
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._stop = False
                self._thread = threading.Thread(target=self._run, name="savegame-mirror", daemon=True)
                self._thread.start()
            self._requested += 1
            self._cond.notify_all()
        return self

    def notify(self) -> None:
        """A local checkpoint was committed or deleted: sync soon (returns at once)."""
        with self._cond:
            self._requested += 1
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until everything notified so far is mirrored; False on timeout.

        Raises the error of the pass that failed (the thread keeps retrying in the background).
        Without a running thread, syncs in the caller's thread.
        """
        if self._thread is None or not self._thread.is_alive():
            self.sync()
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._requested
            while self._completed < target:
                if self._failed_generation >= target and self.last_error is not None:
                    raise self.last_error
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, *, wait: bool = True, timeout: float | None = None) -> None:
        """Stop the background thread, first waiting (up to ``timeout``) for pending uploads if ``wait``."""
        if wait and self._thread is not None and self._thread.is_alive():
            try:
                if not self.wait(timeout):
                    log.warning("%r: closing with uploads still pending after %s s", self, timeout)
            except (CheckpointError, OSError) as exc:
                log.warning("%r: closing after a failed upload: %s", self, exc)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=None if wait else 0)
            self._thread = None

    def __enter__(self) -> Mirror:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        delay = 1.0
        while True:
            with self._cond:
                while not self._stop and self._completed >= self._requested:
                    if not self._cond.wait(self.poll_seconds):
                        self._requested += 1  # periodic look, even without notify()
                if self._stop:
                    return
                generation = self._requested
            try:
                report = self.sync()
                if report.failed:
                    raise CheckpointError(f"mirror to {self.remote_url}: uploads failed: {report.failed}")
            except BaseException as exc:  # keep the thread alive; report through wait() and the log
                log.warning("%r: sync failed, retrying in %.0f s: %s", self, delay, exc)
                with self._cond:
                    self.last_error = exc
                    self._failed_generation = generation
                    self._cond.notify_all()
                    self._cond.wait(delay)
                delay = min(delay * 2, 300.0)
                continue
            delay = 1.0
            with self._cond:
                self.last_error = None
                self._completed = max(self._completed, generation)
                self._cond.notify_all()

    # -- one pass ------------------------------------------------------------------------------------

    def pending(self) -> list[str]:
        """Local checkpoints not (identically) on the remote side yet, newest first."""
        local = self._local_manifests()
        remote = set(self.remote.committed())
        todo = [n for n in local if n not in remote or self._remote_manifest(n).manifest != local[n].manifest]
        return sorted(todo, key=lambda n: local[n].created, reverse=True)

    def sync(self) -> SyncReport:
        """One pass in the caller's thread: upload what is missing (newest first), then retention.

        The first pass also runs the remote root's ``cleanup()`` (interrupted uploads of dead writers).
        """
        with self._sync_lock:
            report = SyncReport()
            if not self._cleaned:  # once: leftovers of uploads a previous (dead) node interrupted
                self._cleaned = True
                try:
                    self.remote.cleanup()
                except (CheckpointError, OSError) as exc:
                    log.warning("%r: remote cleanup failed: %s", self, exc)
            for name in self.pending():
                try:
                    self.upload(name)
                except (CorruptCheckpointError, FileNotFoundError) as exc:  # damaged or deleted meanwhile
                    log.warning("%r: not uploading %s: %s", self, name, exc)
                    report.failed[name] = str(exc)
                    continue
                report.uploaded.append(name)
            if self.retention:
                gone = self._seen_local - set(self.local.committed())
                report.deleted_remote = self._delete_remote(gone)
                self._seen_local -= set(report.deleted_remote)
            return report

    def upload(self, name: str) -> None:
        """Copy local checkpoint ``name`` to the remote root, checking every file's hash on the way."""
        reader = self.local.reader(name)
        raw = reader.manifest_bytes()
        manifest = parse_manifest(raw, reader.file_where(MANIFEST))
        overwrite = self.remote.exists(name)
        txn = self.remote.begin(name, overwrite=overwrite)
        linked = {file for item in manifest.items.values() for file in item.linked}
        held: dict[str, Mapping[str, FileEntry] | None] = {}  # remote manifests read for this upload's copies
        try:
            for file, entry in manifest.files.items():
                if file in linked and self._copy_on_server(txn, file, entry, held):
                    continue
                copy_checked(reader, file, entry, manifest.hash_chunk_bytes, txn.open(file),
                             refusal="differs from its manifest; not uploaded")  # fmt: skip
        except BaseException:
            txn.abort()
            raise
        try:
            txn.commit(raw)
        except CommitError as exc:
            # Another node uploaded the same checkpoint meanwhile: fine if it is byte-identical.
            if self._remote_manifest(name, refresh=True).manifest != raw:
                raise
            log.info("%r: %s was uploaded by someone else meanwhile (%s)", self, name, exc)
        self._remote_known[name] = _Known(raw, manifest.created.timestamp())
        for file, entry in manifest.files.items():
            self._uploaded_files.setdefault((entry.hash, entry.bytes), (name, file))
        self._seen_local.add(name)
        log.info("mirrored %s to %s (%d bytes)", name, self.remote.url(name), manifest.total_bytes)

    def _copy_on_server(
        self, txn: Any, file: str, entry: FileEntry, held: dict[str, Mapping[str, FileEntry] | None]
    ) -> bool:
        """Make ``file`` of ``txn`` (an incremental checkpoint's linked file: the same bytes as a file of an
        earlier checkpoint) a server-side copy of that file where this mirror uploaded it, if it still
        exists there (``Transaction.link``: S3 CopyObject, a hard link for a local mirror). Its bytes were
        hashed when they were uploaded, and the new checkpoint's manifest records the same hash, so a
        ``verify`` of the remote copy checks it. The source is used only while the remote manifest of its
        checkpoint still lists it with that hash (the checkpoint may have been deleted and its name used
        again since, or overwritten: other bytes in the same place); ``held`` memoizes, per upload, the files
        each source checkpoint's remote manifest lists (one read per source checkpoint, not per file).
        False: upload it as any other file."""
        source = self._uploaded_files.get((entry.hash, entry.bytes))
        link = getattr(txn, "link", None)  # optional member of the Transaction protocol
        if source is None or link is None:
            return False
        checkpoint, source_file = source
        if not self._still_holds(checkpoint, source_file, entry, held):
            self._uploaded_files.pop((entry.hash, entry.bytes), None)
            return False
        try:
            done = bool(link(file, source_checkpoint=checkpoint, source_file=source_file))
        except (CheckpointError, OSError) as exc:
            log.info("%r: server-side copy of %s failed (%s); uploading it", self, file, exc)
            return False
        if not done:
            self._uploaded_files.pop((entry.hash, entry.bytes), None)
        return done

    def _still_holds(
        self, checkpoint: str, file: str, entry: FileEntry, held: dict[str, Mapping[str, FileEntry] | None]
    ) -> bool:
        """Whether remote ``checkpoint`` is committed now with ``file`` as ``entry`` (its manifest read again,
        once per upload: ``held``; None there means it is not usable)."""
        if checkpoint not in held:
            try:
                raw = self._remote_manifest(checkpoint, refresh=True).manifest
                held[checkpoint] = parse_manifest(raw, self.remote.path(checkpoint)).files
            except (CheckpointError, OSError) as exc:
                log.info("%r: %s is not usable for a server-side copy (%s)", self, checkpoint, exc)
                held[checkpoint] = None
        files = held[checkpoint]
        return files is not None and files.get(file) == entry

    def _delete_remote(self, gone: Collection[str]) -> list[str]:
        """Delete remote checkpoints in ``gone``, each only if a newer one is committed remotely."""
        remote = self.remote.committed()
        if not gone or not remote:
            return []
        created = {}
        for n in remote:
            try:
                created[n] = self._remote_manifest(n).created
            except (CheckpointError, OSError):
                continue
        deleted = []
        newest = max(created.values(), default=None)
        for name in sorted(gone):
            if name not in created or newest is None or created[name] >= newest:
                continue  # not there, or it is the newest: its successor is not committed remotely yet
            try:
                self.remote.delete(name)
            except (CheckpointError, OSError) as exc:
                log.warning("%r: could not delete remote %s: %s", self, name, exc)
                continue
            self._remote_known.pop(name, None)
            deleted.append(name)
            log.info("mirror retention deleted %s", self.remote.url(name))
        return deleted

    def prune_remote(self, keep: Collection[str]) -> list[str]:
        """Delete remote checkpoints not in ``keep`` (never the newest, never one without a newer one)."""
        with self._sync_lock:
            return self._delete_remote([n for n in self.remote.committed() if n not in keep])

    # -- manifests ------------------------------------------------------------------------------------

    def _local_manifests(self) -> dict[str, _Known]:
        out = {}
        for name in self.local.committed():
            self._seen_local.add(name)
            try:
                reader = self.local.reader(name)
                raw = reader.manifest_bytes()
                out[name] = _Known(raw, parse_manifest(raw, reader.file_where(MANIFEST)).created.timestamp())
            except (CheckpointError, OSError) as exc:
                log.warning("%r: skipping local %s: %s", self, name, exc)
        return out

    def _remote_manifest(self, name: str, *, refresh: bool = False) -> _Known:
        known = self._remote_known.get(name)
        if known is None or refresh:
            reader = self.remote.reader(name)
            raw = reader.manifest_bytes()
            known = _Known(raw, parse_manifest(raw, reader.file_where(MANIFEST)).created.timestamp())
            self._remote_known[name] = known
        return known

    # -- restore ---------------------------------------------------------------------------------------

    def download(self, name: str) -> str:
        """Copy remote checkpoint ``name`` into the local root (verifying every file); return its path."""
        reader = self.remote.reader(name)
        raw = reader.manifest_bytes()
        manifest = parse_manifest(raw, reader.file_where(MANIFEST))
        txn = self.local.begin(name, overwrite=True)
        try:
            for file, entry in manifest.files.items():
                copy_checked(reader, file, entry, manifest.hash_chunk_bytes, txn.open(file))
            return txn.commit(raw)
        except BaseException:
            txn.abort()
            raise

    def restore_newest(self, *, verify: bool = True, download: bool = True) -> str | None:
        """The newest valid checkpoint of either side, as a local path (downloaded if only remote).

        Candidates are ordered by manifest creation time; a local copy wins a tie. A local candidate is
        fully verified (``verify``); a remote one is verified while it downloads. A damaged remote one
        is quarantined remotely and the next older candidate tried; a damaged local one whose remote copy
        has the same manifest is quarantined locally and the remote copy taken, any other damaged local
        one is skipped (the Checkpointer quarantines local ones). ``download=False`` returns the remote URL instead
        of downloading. None when neither side has a valid checkpoint.

        :attr:`verified` then holds the manifest of the local checkpoint this call fully verified (None
        when it verified none), so a caller about to load it need not hash its files again.
        """
        self.verified = None
        local = self._local_manifests()
        try:
            remote_names = self.remote.committed()
        except (CheckpointError, OSError) as exc:
            log.warning("%r: cannot list the remote side, using local checkpoints only: %s", self, exc)
            remote_names = []
        candidates: list[tuple[float, int, str, str]] = [(k.created, 1, "local", n) for n, k in local.items()]
        twins: set[str] = set()  # on both sides, the same checkpoint: the remote copy is the local one's spare
        for name in remote_names:
            try:
                known = self._remote_manifest(name, refresh=True)
            except CorruptCheckpointError as exc:
                log.warning("%r: remote %s has an unreadable manifest: %s", self, name, exc)
                continue
            except (CheckpointError, OSError) as exc:
                log.warning("%r: cannot read remote %s: %s", self, name, exc)
                continue
            if name in local and local[name].manifest == known.manifest:
                twins.add(name)  # the same checkpoint: the local copy is the candidate
                continue
            candidates.append((known.created, 0, "remote", name))
        for _, _, side, name in sorted(candidates, reverse=True):
            set_aside = ""  # why a damaged local twin was set aside for its remote copy (told in a warning)
            if side == "local":
                path = self.local.path(name)
                try:
                    if verify:
                        with self.local.reader(name) as reader:
                            self.verified = (name, verify_checkpoint(reader))
                    return path
                except CorruptCheckpointError as exc:
                    if name not in twins:
                        log.warning("%r: local %s is damaged, trying older: %s", self, name, exc)
                        continue
                    # its remote copy is intact as far as its manifest tells: set the local one aside (never
                    # deleted) and take the remote one, instead of resuming from an older checkpoint
                    try:
                        aside = self.local.quarantine(name)
                    except (CheckpointError, OSError) as err:
                        log.warning("%r: could not set the damaged local %s aside, trying older: %s", self, name, err)
                        continue
                    set_aside = f"local checkpoint {path} is damaged ({exc}); it was moved aside to " + os.path.join(
                        self.local.root, aside
                    )
            if not download:
                return self.remote.url(name)
            try:
                path = self.download(name)
            except CorruptCheckpointError as exc:
                log.warning("%r: remote %s is damaged, quarantining it and trying older: %s", self, name, exc)
                try:
                    self.remote.quarantine(name)
                except (CheckpointError, OSError) as err:
                    log.warning("%r: could not quarantine remote %s: %s", self, name, err)
                if set_aside:
                    warn(f"{set_aside}; its copy at {self.remote.url(name)} is damaged too", ResumeWarning)
                continue
            if set_aside:
                warn(f"{set_aside}; its intact copy at {self.remote.url(name)} was taken instead", ResumeWarning)
            self._seen_local.add(name)
            self._remote_known.pop(name, None)
            log.info("restored %s from %s", path, self.remote.url(name))
            return path
        return None


def restore_newest(
    local_root: str | os.PathLike[str],
    remote_url: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    verify: bool = True,
    download: bool = True,
) -> str | None:
    """The newest valid checkpoint of ``local_root`` or ``remote_url`` as a local path (see
    :meth:`Mirror.restore_newest`); a fresh node with an empty disk gets the mirror's newest."""
    mirror = Mirror(local_root, remote_url, storage_options=storage_options, retention=False)
    return mirror.restore_newest(verify=verify, download=download)

