"""A root of checkpoints at an fsspec URL: :class:`RemoteStorage` (the :class:`~savegame.storage.base.Storage`
of ``s3://``, ``gs://``, ``memory://``...).

A :class:`~savegame.storage.remote.transport.RemoteTransport` with the checkpoint semantics on top:
``begin`` / ``join`` (:mod:`~savegame.storage.remote.write`), ``reader``
(:mod:`~savegame.storage.remote.read`), refusing to save over what is not a savegame checkpoint
(``check_target``), listing committed and quarantined checkpoints, ``delete`` (commit marker first),
``quarantine`` (server-side copy aside, then delete) and ``cleanup`` of interrupted uploads, which
asks :mod:`savegame.storage.liveness` whether a version folder's writer may still be running. Made by
:func:`savegame.storage.storage_for` / :func:`savegame.storage.locate` for URLs (the api, the
Checkpointer, the mirror, the CLI).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import uuid
from collections.abc import Mapping
from typing import Any

from savegame.errors import (
    CheckpointNotFoundError,
    CommitError,
    ConfigError,
    InvalidManifestError,
    InvalidNameError,
    MissingFileError,
    NotACheckpointError,
    OccupiedPathError,
    StorageError,
)
from savegame.format.naming import check_checkpoint_name, validate_name
from savegame.storage.base import MANIFEST, QUARANTINE_PREFIX, CheckpointRef
from savegame.storage.liveness import FOREIGN_WRITER_GRACE_SECONDS, writer_is_live
from savegame.storage.local.occupancy import starts_like_manifest
from savegame.storage.remote.layout import _VERSION_RE, STAGING_MARKER, versions_under
from savegame.storage.remote.read import RemoteCheckpointReader
from savegame.storage.remote.transport import (
    DEFAULT_CONCURRENCY,
    DEFAULT_PART_SIZE,
    MIN_PART_SIZE,
    RemoteTransport,
    _mtime,
    log,
)
from savegame.storage.remote.write import _LIVE_LOCK, _LIVE_OWNERS, RemoteJoinedTransaction, RemoteTransaction

DEFAULT_GRACE_SECONDS = FOREIGN_WRITER_GRACE_SECONDS  # a day: the one rule of storage.liveness


class RemoteStorage(RemoteTransport):
    """A root of checkpoints at an fsspec URL (``s3://bucket/run``, ``gs://...``, ``memory://...``).

    ``storage_options`` go to fsspec (for S3: ``key``, ``secret``, ``token``, ``endpoint_url``,
    ``client_kwargs``, ``config_kwargs``, ``profile``...). ``part_size``: bytes per uploaded part and
    per ranged read; ``max_concurrency``: parts/ranges in flight at once; ``retries``, ``backoff``:
    attempts after the first and the first delay (doubling, jittered, capped at ``max_backoff``) for
    transient errors; ``grace_seconds``: how old an orphan of another host must be before
    :meth:`cleanup` removes it. The layout and the commit protocol:
    :mod:`savegame.storage.remote`.
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        max_concurrency: int = DEFAULT_CONCURRENCY,
        retries: int = 5,
        backoff: float = 0.25,
        max_backoff: float = 20.0,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
        fs: Any = None,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ConfigError(f"part_size must be at least {MIN_PART_SIZE} bytes (the S3 minimum), got {part_size}")
        if max_concurrency < 1 or retries < 0 or backoff < 0 or grace_seconds < 0:
            raise ConfigError("max_concurrency must be >= 1 and retries, backoff, grace_seconds >= 0")
        super().__init__(
            url,
            storage_options=storage_options,
            part_size=part_size,
            max_concurrency=max_concurrency,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
            fs=fs,
        )
        self.grace_seconds = float(grace_seconds)
        self.heartbeat_seconds = max(1.0, self.grace_seconds / 6)

    def __repr__(self) -> str:
        return f"RemoteStorage({self.root!r})"

    def path(self, name: str) -> str:
        """The same as :meth:`url` (the Checkpointer records it as the checkpoint's path)."""
        return self.url(name)

    def ref(self, name: str) -> CheckpointRef:
        """A handle on checkpoint ``name`` for ``savegame.load/verify/read_manifest``."""
        return CheckpointRef(self, check_checkpoint_name(name))

    # -- the Storage protocol -----------------------------------------------------------------------

    def begin(self, name: str, *, overwrite: bool = False) -> RemoteTransaction:
        """Start uploading checkpoint ``name`` (the protocol: :mod:`savegame.storage.remote`)."""
        validate_name(name)  # a new checkpoint gets a portable name, whichever save path chose it
        self.check_target(name, overwrite=overwrite)
        return RemoteTransaction(self, name, overwrite=overwrite)

    def check_target(self, name: str, *, overwrite: bool) -> None:
        """Refuse to save over anything at ``ROOT/NAME`` but a committed savegame checkpoint (that one only
        with ``overwrite``): an object named NAME, objects under ``NAME/`` outside savegame's version
        folders, a ``NAME/manifest.json`` another program wrote (:class:`OccupiedPathError`). Nothing is
        written or deleted before this passes. An interrupted upload (version folders only) may be reused.
        """
        url = self.url(name)
        top = self._key(name, MANIFEST)
        if self._exists(top):
            if not starts_like_manifest(self._cat(top, 0, 256)):
                raise self._occupied(url, f"a folder whose {MANIFEST} is not a savegame manifest")
            if not overwrite:
                raise CommitError(errno.EEXIST, f"{url} already exists")
            return
        if self._exists(self._key(name)):
            raise self._occupied(url, "an object (a file)")
        objects = self._list(self._key(name))
        ours = {p for files in versions_under(self._key(name), objects).values() for p in files.values()}
        foreign = sorted(p for p in objects if p not in ours)
        if foreign:
            raise self._occupied(
                url, f"a folder of {len(foreign)} object(s) that are not a savegame checkpoint (such as "
                f"{self._where(foreign[0])})"
            )  # fmt: skip

    @staticmethod
    def _occupied(url: str, kind: str) -> OccupiedPathError:
        return OccupiedPathError(
            errno.EEXIST,
            f"{url} is {kind}: nothing was saved and it was left untouched (overwrite=True replaces savegame "
            "checkpoints only); save to another name, or move it away first",
        )

    def join(self, name: str, token: str, *, timeout: float = 60.0) -> RemoteJoinedTransaction:
        """Upload into the transaction another process began with ``begin(name)`` (``token`` = its
        ``txn.token``, a version folder name): files go to ``NAME/<token>/``; only the owner commits.

        The token must look like a version folder :meth:`begin` makes (``v<UTC time>-<random>``), so a
        token received from elsewhere cannot point anywhere else (:class:`InvalidNameError` otherwise).
        Waits up to ``timeout`` seconds for the owner's ``.staging`` marker to be readable, and refuses
        (:class:`StorageError` ENOENT) a folder without one or whose marker names another checkpoint.
        """
        check_checkpoint_name(name)
        if not isinstance(token, str) or not _VERSION_RE.match(token):
            shown = token[:80] if isinstance(token, str) else type(token).__name__
            raise InvalidNameError(f"{shown!r} does not name a version folder of {self.url(name)}")
        where = self._where(self._key(name, token))
        path = self._key(name, token, STAGING_MARKER)
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            try:
                marker = json.loads(self._cat(path))
                break
            except FileNotFoundError:
                if time.monotonic() >= deadline:
                    raise StorageError(
                        errno.ENOENT, f"{where}: no upload is running there (its owner's marker did not appear "
                        f"within {timeout} s)"
                    ) from None  # fmt: skip
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
            except ValueError:
                marker = None
                break
        if not isinstance(marker, dict) or marker.get("format") != "savegame-staging" or marker.get("name") != name:
            raise StorageError(errno.ENOENT, f"{where}: not an upload of {name} in progress (unexpected marker)")
        return RemoteJoinedTransaction(self, name, token, marker)

    def exists(self, name: str) -> bool:
        """Whether ``name`` is committed (its commit marker exists)."""
        return self._exists(self._key(check_checkpoint_name(name), MANIFEST))

    def committed(self) -> list[str]:
        """Names with a commit marker, sorted (one listing of the root)."""
        names = set()
        for path in self._list(self._root):
            parts = path[len(self._root) + 1 :].split("/")
            if len(parts) == 2 and parts[1] == MANIFEST and not parts[0].startswith("."):
                names.add(parts[0])
        return sorted(names)

    def quarantined(self) -> list[str]:
        """Folder names of quarantined checkpoints."""
        found = set()
        for path in self._list(self._root):
            top = path[len(self._root) + 1 :].split("/", 1)[0]
            if top.startswith(QUARANTINE_PREFIX):
                found.add(top)
        return sorted(found)

    def reader(self, name: str) -> RemoteCheckpointReader:
        """Open committed checkpoint ``name`` (the manifest is fetched now, data files when read)."""
        check_checkpoint_name(name)
        reader = RemoteCheckpointReader(self, name)
        reader.manifest_bytes()
        return reader

    def delete(self, name: str) -> None:
        """Delete checkpoint ``name``: the commit marker first (it disappears from listings at once),
        then its version folders (those of uploads still running under the name are left alone)."""
        top = self._key(check_checkpoint_name(name), MANIFEST)
        if not self._exists(top):
            raise StorageError(errno.ENOENT, f"cannot delete checkpoint {self.url(name)}: it is not committed")
        self._rm([top])
        folders = versions_under(self._key(name), self._list(self._key(name)))
        self._rm(p for files in folders.values() if not self._is_live(files, by_age=False) for p in files.values())

    def quarantine(self, name: str) -> str:
        """Copy checkpoint ``name`` to a hidden ``.quarantine-NAME-STAMP-RAND`` prefix, then delete it.

        The copy is server-side; if it fails half-way the original is left as it was. Returns the new
        folder name (under the root).
        """
        check_checkpoint_name(name)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        new = f"{QUARANTINE_PREFIX}{name}-{stamp}-{uuid.uuid4().hex[:6]}"
        src_prefix = self._key(name)
        objects = self._list(src_prefix)
        if self._key(name, MANIFEST) not in objects:
            raise StorageError(errno.ENOENT, f"cannot quarantine {self.url(name)}: it is not committed")
        for path in sorted(objects, key=lambda p: p.endswith("/" + MANIFEST)):
            dest = self._key(new, path[len(src_prefix) + 1 :])
            self._ensure_parent(dest)
            self._call(f"copying {self._where(path)} to {self._where(dest)}", self.fs.copy, path, dest)
        self.delete(name)
        return new

    def cleanup(self) -> list[str]:
        """Remove what interrupted uploads and deletes left behind; return ``NAME/VERSION`` removed.

        A version folder is removed when it is not the committed version of its name and no live
        writer owns it: its ``.staging`` marker names a dead process of this host, or a heartbeat
        older than ``grace_seconds``; without marker, when its newest object is older than that.
        Unfinished multipart uploads into removed folders (or older than the grace period) are aborted.
        """
        listing = self._list(self._root)
        by_name: dict[str, dict[str, dict[str, str]]] = {}
        for path in listing:
            parts = path[len(self._root) + 1 :].split("/")
            if len(parts) >= 3 and not parts[0].startswith(".") and _VERSION_RE.match(parts[1]):
                by_name.setdefault(parts[0], {}).setdefault(parts[1], {})["/".join(parts[2:])] = path
        removed: list[str] = []
        for name, versions in sorted(by_name.items()):
            top = self._key(name, MANIFEST)
            live_version = None
            if top in listing:
                if len(versions) == 1:
                    continue  # the usual case: one committed version, nothing to clean
                try:
                    live_version = RemoteCheckpointReader(self, name).resolve()[0]
                except (CheckpointNotFoundError, NotACheckpointError, MissingFileError, InvalidManifestError):
                    live_version = None
            for version, files in sorted(versions.items()):
                if version == live_version or self._is_live(files, listing, by_age=True):
                    continue
                try:
                    self._rm(files.values())
                except (StorageError, OSError) as exc:
                    log.warning("cleanup could not remove %s/%s/%s: %s", self.root, name, version, exc)
                    continue
                removed.append(f"{name}/{version}")
                log.info("cleanup removed %s/%s/%s (interrupted or superseded upload)", self.root, name, version)
        if self.is_s3:
            self._abort_stale_uploads({f"{self._key(r)}/" for r in removed})
        return removed

    # -- helpers for cleanup / delete ---------------------------------------------------------------
    def _is_live(
        self, files: Mapping[str, str], listing: Mapping[str, Mapping[str, Any]] | None = None, *, by_age: bool
    ) -> bool:
        """Whether a version folder belongs to a running upload: its ``.staging`` marker names a live
        writer. ``by_age``: a folder without a readable marker also counts as live while its newest
        object is younger than the grace period (it may be a version a reader is still reading)."""
        now = time.time()
        marker = files.get(STAGING_MARKER)
        if marker is not None:
            try:
                info = json.loads(self._cat(marker))
            except (OSError, ValueError):
                info = None
            if isinstance(info, dict):
                owner = info.get("owner")
                with _LIVE_LOCK:
                    if owner in _LIVE_OWNERS:
                        return True
                beat = info.get("heartbeat")
                touched = float(beat) if isinstance(beat, (int, float)) and not isinstance(beat, bool) else None
                host, pid = info.get("host"), info.get("pid")
                if touched is not None or (host == socket.gethostname() and isinstance(pid, int)):
                    # not among this process's live owners: its own marker is an ended transaction's
                    return writer_is_live(
                        host=host, pid=pid, touched=touched, grace=self.grace_seconds, now=now, this_process=False
                    )
        if not by_age:
            return False
        if listing is None:
            listing = self._list(os.path.dirname(next(iter(files.values()))) if files else self._root)
        times = [t for p in files.values() if (t := _mtime(listing.get(p, {}))) is not None]
        return writer_is_live(
            host=None, pid=None, touched=max(times) if times else None, grace=self.grace_seconds, now=now
        )

    def _abort_stale_uploads(self, removed_prefixes: set[str]) -> None:
        bucket, key_prefix, _ = self.fs.split_path(self._root + "/")
        try:
            response = self._call(
                f"listing unfinished uploads under {self.root}",
                self.fs.call_s3, "list_multipart_uploads", Bucket=bucket, Prefix=key_prefix,
            )  # fmt: skip
        except (StorageError, OSError) as exc:
            log.warning("cleanup could not list unfinished uploads under %s: %s", self.root, exc)
            return
        now = time.time()
        for upload in response.get("Uploads", []) or []:
            key = upload.get("Key", "")
            path = f"{bucket}/{key}"
            initiated = upload.get("Initiated")
            age = now - initiated.timestamp() if hasattr(initiated, "timestamp") else 0.0
            stale = age > max(self.grace_seconds, FOREIGN_WRITER_GRACE_SECONDS)
            if stale or any(path.startswith(p) for p in removed_prefixes):
                try:
                    self._call(
                        f"aborting the unfinished upload of {self._where(path)}",
                        self.fs.call_s3, "abort_multipart_upload", Bucket=bucket, Key=key,
                        UploadId=upload["UploadId"],
                    )  # fmt: skip
                except (StorageError, OSError) as exc:
                    log.warning("cleanup: %s", exc)
