"""Checkpoints on object storage (any fsspec URL): data first, the manifest last, versions instead of rename.

Object stores cannot rename a folder atomically, so a checkpoint is published by writing one object
last: its manifest. Layout under a root ``s3://bucket/run``::

    run/NAME/manifest.json              the commit marker: NAME is a committed checkpoint iff it exists
    run/NAME/VERSION/model.safetensors  the data of one upload (VERSION = v<UTC time>-<random>)
    run/NAME/VERSION/manifest.json      the same manifest bytes: each version folder is a complete,
                                        self-contained checkpoint directory (copy it to load it locally)
    run/NAME/VERSION/.staging           owner marker (host, pid, heartbeat) while the upload runs
    run/.quarantine-NAME-STAMP-RAND/    damaged checkpoints moved aside (copied, never listed or loaded)

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
"""

from __future__ import annotations

import errno
import inspect
import io
import json
import logging
import os
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlsplit

from savegame.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CommitError,
    ConfigError,
    InvalidManifestError,
    InvalidNameError,
    MissingFileError,
    NotACheckpointError,
    OccupiedPathError,
    StorageError,
    TruncatedFileError,
)
from savegame.format.naming import check_checkpoint_name, validate_name
from savegame.storage.base import MANIFEST, QUARANTINE_PREFIX, CheckpointRef
from savegame.storage.liveness import FOREIGN_WRITER_GRACE_SECONDS, writer_is_live
from savegame.storage.local import starts_like_manifest

log = logging.getLogger("savegame")

STAGING_MARKER = ".staging"
"""Object inside a version folder that names its writer while the upload runs."""

MIN_PART_SIZE = 5 << 20  # the S3 minimum for every part but the last
DEFAULT_PART_SIZE = 8 << 20
DEFAULT_CONCURRENCY = 4
DEFAULT_GRACE_SECONDS = FOREIGN_WRITER_GRACE_SECONDS  # a day: the one rule of storage.liveness
_MAX_PARTS = 10_000
_VERSION_RE = re.compile(r"^v\d{8}T\d{12}-[0-9a-f]{8}$")
_LIVE_OWNERS: set[str] = set()
"""Owner ids of the transactions running in this process (their version folders are never cleaned)."""
_LIVE_LOCK = threading.Lock()

T = TypeVar("T")


def _import_fsspec() -> Any:
    try:
        import fsspec
    except ImportError as exc:
        raise ConfigError(
            "remote checkpoint roots need fsspec and the backend for the URL's scheme: "
            "pip install 'savegame[s3]' (fsspec + s3fs), or gcsfs / adlfs for gs:// and az://"
        ) from exc
    return fsspec


def display_url(url: str) -> str:
    """``url`` without user info, query or fragment: safe to show in messages and logs."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{host}{parts.path}".rstrip("/")


# ---------------------------------------------------------------------------------------------------
# Errors: transient or not, and scrubbed of secrets

_TRANSIENT_TYPE_NAMES = frozenset(
    {
        # botocore
        "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
        "HTTPClientError", "ResponseStreamingError", "IncompleteReadError", "ProxyConnectionError",
        "ResponseParserError",
        # aiohttp / http.client / fsspec
        "ClientPayloadError", "ServerDisconnectedError", "ClientConnectorError", "ClientConnectionError",
        "ClientOSError", "ServerTimeoutError", "IncompleteRead", "RemoteDisconnected", "FSTimeoutError",
    }
)  # fmt: skip
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, n)
    for n in ("ECONNRESET", "ECONNREFUSED", "ECONNABORTED", "ETIMEDOUT", "EPIPE", "EHOSTUNREACH",
              "ENETUNREACH", "ENETDOWN", "ENETRESET")
    if hasattr(errno, n)
)  # fmt: skip


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        meta = response.get("ResponseMetadata")
        if isinstance(meta, Mapping) and isinstance(meta.get("HTTPStatusCode"), int):
            return int(meta["HTTPStatusCode"])
    status = getattr(exc, "status", None)
    if type(exc).__name__ == "ClientResponseError" and isinstance(status, int):
        return status
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether a failed request is worth retrying: HTTP 5xx, connection resets/refusals, timeouts.

    An HTTP status anywhere in the exception chain decides (5xx yes, anything else no: a 4xx means the
    request itself is wrong, missing or forbidden, and repeating it cannot help).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        status = _http_status(current)
        if status is not None:
            return status >= 500
        if isinstance(current, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError)):
            return False
        if isinstance(current, (ConnectionError, TimeoutError)):
            return True
        if any(t.__name__ in _TRANSIENT_TYPE_NAMES for t in type(current).__mro__):
            return True
        if isinstance(current, OSError) and current.errno in _TRANSIENT_ERRNOS:
            return True
        current = current.__cause__ or current.__context__
    return False


_SECRET_OPTION = re.compile(r"secret|token|password|passwd|credential|sas|signature|private|key$", re.I)


def _collect_secrets(options: Mapping[str, Any] | None, fs: Any) -> list[str]:
    """Secret strings to scrub from messages: option values whose key looks secret, the backend's."""
    found: set[str] = set()

    def visit(key: str, value: Any, depth: int) -> None:
        if depth > 4:
            return
        if isinstance(value, Mapping):
            for k, v in value.items():
                visit(str(k), v, depth + 1)
        elif isinstance(value, str) and _SECRET_OPTION.search(key) and len(value) >= 4:
            found.add(value)

    visit("", dict(options or {}), 0)
    for attr in ("secret", "token", "password", "key", "account_key", "sas_token"):
        value = getattr(fs, attr, None)
        if isinstance(value, str) and len(value) >= 4:
            found.add(value)
    for env in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN"):
        value = os.environ.get(env)
        if value and len(value) >= 4:
            found.add(value)
    return sorted(found, key=len, reverse=True)


# ---------------------------------------------------------------------------------------------------
# The storage


class RemoteStorage:
    """A root of checkpoints at an fsspec URL (``s3://bucket/run``, ``gs://...``, ``memory://...``).

    ``storage_options`` go to fsspec (for S3: ``key``, ``secret``, ``token``, ``endpoint_url``,
    ``client_kwargs``, ``config_kwargs``, ``profile``...). ``part_size``: bytes per uploaded part and
    per ranged read; ``max_concurrency``: parts/ranges in flight at once; ``retries``, ``backoff``:
    attempts after the first and the first delay (doubling, jittered, capped at ``max_backoff``) for
    transient errors; ``grace_seconds``: how old an orphan of another host must be before
    :meth:`cleanup` removes it. See the module docstring for the layout and the commit protocol.
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
        self.url_text = url
        self.root = display_url(url)
        options = dict(storage_options or {})
        self.storage_options: Mapping[str, Any] = options
        if fs is None:
            fsspec = _import_fsspec()
            try:
                fs, path = fsspec.core.url_to_fs(url, **options)
            except ImportError as exc:
                raise ConfigError(
                    f"{self.root}: the backend for this URL scheme is not installed ({exc.name or exc}); "
                    "for s3:// install 'savegame[s3]'"
                ) from None
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{self.root}: invalid storage_options ({type(exc).__name__})") from None
        else:
            path = fs._strip_protocol(url)
        self.fs = fs
        self._root = str(path).rstrip("/")
        self.part_size = int(part_size)
        self.max_concurrency = int(max_concurrency)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.grace_seconds = float(grace_seconds)
        self.heartbeat_seconds = max(1.0, self.grace_seconds / 6)
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        self.protocol = str(protocols[0])
        self.is_s3 = callable(getattr(fs, "call_s3", None)) and any(p in ("s3", "s3a") for p in protocols)
        self.atomic_create = self.is_s3 or "memory" in protocols
        try:
            self._create_mode = "mode" in inspect.signature(fs.pipe_file).parameters
        except (TypeError, ValueError):
            self._create_mode = False
        self.atomic_create = self.atomic_create and self._create_mode
        self._secrets = _collect_secrets(options, fs)

    def __repr__(self) -> str:
        return f"RemoteStorage({self.root!r})"

    # -- names and messages -------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return "/".join((self._root, *parts))

    def url(self, name: str) -> str:
        """``ROOT/NAME`` as a URL without credentials."""
        return f"{self.root}/{check_checkpoint_name(name)}"

    def path(self, name: str) -> str:
        """The same as :meth:`url` (the Checkpointer records it as the checkpoint's path)."""
        return self.url(name)

    def ref(self, name: str) -> CheckpointRef:
        """A handle on checkpoint ``name`` for ``savegame.load/verify/read_manifest``."""
        return CheckpointRef(self, check_checkpoint_name(name))

    def scrub(self, text: str) -> str:
        """``text`` with every secret this storage knows replaced by ``***``."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _fail(self, exc: BaseException, what: str) -> BaseException:
        """Our exception for a backend error: missing/existing stay FileNotFound/FileExists, the rest
        becomes :class:`StorageError`; the message names what failed and is scrubbed of secrets."""
        detail = self.scrub(str(exc) or type(exc).__name__)[:500]
        if isinstance(exc, FileNotFoundError):
            return FileNotFoundError(errno.ENOENT, f"{what}: not found ({detail})")
        if isinstance(exc, FileExistsError):
            return FileExistsError(errno.EEXIST, f"{what}: already exists ({detail})")
        if isinstance(exc, StorageError):
            return exc
        code = exc.errno if isinstance(exc, OSError) and isinstance(exc.errno, int) else errno.EIO
        return StorageError(code, f"{what}: {type(exc).__name__}: {detail}")

    # -- requests with retries ----------------------------------------------------------------------

    def _retry(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``fn``; on a transient error sleep (exponential backoff with jitter) and try again."""
        attempt = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if attempt >= self.retries or not is_transient(exc):
                    raise
                delay = min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random() / 2)
                attempt += 1
                log.warning(
                    "%s: %s, retrying in %.2f s (%d/%d)",
                    what, self.scrub(f"{type(exc).__name__}: {exc}")[:300], delay, attempt, self.retries,
                )  # fmt: skip
                time.sleep(delay)

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """:meth:`_retry`, then translate the final error (see :meth:`_fail`), hiding the backend's
        exception chain (its messages are not ours to vouch for)."""
        try:
            return self._retry(what, fn, *args, **kwargs)
        except (StorageError, CheckpointError):
            raise
        except Exception as exc:
            err = self._fail(exc, what)
        raise err from None

    def _where(self, path: str) -> str:
        rel = path[len(self._root) :].lstrip("/") if path.startswith(self._root) else path
        return f"{self.root}/{rel}" if rel else self.root

    def _cat(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        what = f"reading {self._where(path)}" + (f" bytes {start}-{end}" if start is not None else "")
        data = self._call(what, self.fs.cat_file, path, start=start, end=end)
        return bytes(data)

    def _info(self, path: str) -> dict[str, Any]:
        self.fs.invalidate_cache(path)
        info: dict[str, Any] = self._call(f"inspecting {self._where(path)}", self.fs.info, path)
        if info.get("type") != "file":
            raise FileNotFoundError(errno.ENOENT, f"{self._where(path)}: not an object")
        return info

    def _exists(self, path: str) -> bool:
        try:
            self._info(path)
        except FileNotFoundError:
            return False
        return True

    def _list(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Every object under ``prefix`` (fresh: listing caches are dropped first)."""
        self.fs.invalidate_cache()
        try:
            found = self._call(f"listing {self._where(prefix)}", self.fs.find, prefix + "/", detail=True)
        except FileNotFoundError:
            return {}
        return {p: i for p, i in found.items() if i.get("type", "file") == "file"}

    def _put(self, path: str, data: bytes, *, create: bool = False) -> None:
        """Write a small object in one request; ``create``: fail with FileExistsError if it exists."""
        what = f"writing {self._where(path)}"
        self._ensure_parent(path)
        try:
            if not create:
                self._call(what, self.fs.pipe_file, path, data)
            elif self._create_mode:
                self._call(what, self.fs.pipe_file, path, data, mode="create")
            else:  # an fsspec without mode="create": check, then put (racy; see the module docstring)
                if self._exists(path):
                    raise FileExistsError(errno.EEXIST, f"{what}: already exists")
                self._call(what, self.fs.pipe_file, path, data)
        except FileNotFoundError as exc:  # writing: the bucket (or container) is missing
            raise StorageError(errno.ENOENT, f"{exc.strerror or exc} (does the bucket exist?)") from None

    def _ensure_parent(self, path: str) -> None:
        if self.is_s3 or self.protocol in ("memory", "gs", "gcs", "az", "abfs", "abfss", "adl"):
            return  # object stores have no directories
        try:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        except OSError:
            pass

    def _rm(self, paths: Iterable[str]) -> None:
        """Delete objects (missing ones are fine); manifests first, so a half-done delete is unlisted."""
        todo = sorted(set(paths), key=lambda p: (not p.endswith("/" + MANIFEST), p))
        first = [p for p in todo if p.endswith("/" + MANIFEST)]
        rest = [p for p in todo if not p.endswith("/" + MANIFEST)]
        for group in (first, rest):
            if not group:
                continue
            try:
                self._call(f"deleting {len(group)} object(s) under {self.root}", self.fs.rm, group)
            except FileNotFoundError:
                for p in group:  # some were already gone: delete the rest one by one
                    try:
                        self._call(f"deleting {self._where(p)}", self.fs.rm_file, p)
                    except FileNotFoundError:
                        pass
            self.fs.invalidate_cache()

    # -- the Storage protocol -----------------------------------------------------------------------

    def begin(self, name: str, *, overwrite: bool = False) -> RemoteTransaction:
        """Start uploading checkpoint ``name`` (see the module docstring for the protocol)."""
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
        ours = {p for files in self._versions(name, objects).values() for p in files.values()}
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
        folders = self._versions(name, self._list(self._key(name)))
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

    def _versions(self, name: str, objects: Mapping[str, Any]) -> dict[str, dict[str, str]]:
        """``{version: {relative file: path}}`` of the objects under ``ROOT/NAME/``."""
        prefix = self._key(name) + "/"
        out: dict[str, dict[str, str]] = {}
        for path in objects:
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            if len(parts) >= 2 and _VERSION_RE.match(parts[0]):
                out.setdefault(parts[0], {})["/".join(parts[1:])] = path
        return out

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

    # -- reading ------------------------------------------------------------------------------------

    def iter_download(self, path: str, size: int, where: str) -> Iterator[memoryview]:
        """Read object ``path`` in order, ``max_concurrency`` ranged GETs at a time, yielding windows
        of up to ``max_concurrency * part_size`` bytes (each valid until the next is requested): a
        streaming copy holds one window, never the whole object."""
        from savegame._util.progress import ProgressBar

        window = self.part_size * self.max_concurrency
        buf = bytearray(min(window, size))
        progress = ProgressBar(f"downloading {where}", size)
        pool = ThreadPoolExecutor(self.max_concurrency, "savegame-download")
        try:
            for base in range(0, size, window):
                end = min(base + window, size)
                view = memoryview(buf)[: end - base]

                def fetch(start: int, stop: int, view: memoryview = view, base: int = base) -> None:
                    data = self._cat(path, start, stop)
                    if len(data) != stop - start:
                        raise TruncatedFileError(f"{where}: got {len(data)} bytes for range {start}-{stop}")
                    view[start - base : stop - base] = data

                step = self.part_size
                futures = [pool.submit(fetch, s, min(s + step, end)) for s in range(base, end, step)]
                for future in futures:
                    future.result()
                progress.advance(end - base)
                yield view
                view.release()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            progress.close()

    def download(self, path: str, size: int, where: str) -> bytearray:
        """Read object ``path`` (``size`` bytes) into a new buffer with parallel ranged GETs."""
        from savegame._util.progress import ProgressBar

        buf = bytearray(size)
        if size == 0:
            return buf
        view = memoryview(buf)
        chunk = self.part_size
        ranges = [(start, min(start + chunk, size)) for start in range(0, size, chunk)]
        progress = ProgressBar(f"downloading {where}", size)

        def fetch(start: int, end: int) -> None:
            data = self._cat(path, start, end)
            if len(data) != end - start:
                raise TruncatedFileError(f"{where}: got {len(data)} bytes for range {start}-{end}")
            view[start:end] = data
            progress.advance(len(data))

        try:
            if len(ranges) == 1:
                fetch(*ranges[0])
            else:
                with ThreadPoolExecutor(min(self.max_concurrency, len(ranges)), "savegame-download") as pool:
                    for future in [pool.submit(fetch, s, e) for s, e in ranges]:
                        future.result()
        finally:
            view.release()
            progress.close()
        return buf


def _mtime(info: Mapping[str, Any]) -> float | None:
    for field in ("LastModified", "mtime", "last_modified", "updated", "created"):
        value = info.get(field)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _new_version() -> str:
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now % 1 * 1_000_000):06d}"
    return f"v{stamp}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------------------------------
# Reading


class RemoteCheckpointReader:
    """A committed remote checkpoint opened for reading, pinned to the version its manifest names."""

    def __init__(self, storage: RemoteStorage, name: str) -> None:
        self.storage = storage
        self.name = name
        self.where = storage.url(name)
        self._manifest: bytes | None = None
        self._version: str | None = None
        self._sizes: dict[str, int] = {}

    def manifest_bytes(self) -> bytes:
        if self._manifest is None:
            from savegame.format.manifest import MAX_MANIFEST_BYTES

            st = self.storage
            top = st._key(self.name, MANIFEST)
            where = f"{self.where}/{MANIFEST}"
            try:
                size = int(st._info(top)["size"])
            except FileNotFoundError:
                raise self._absent() from None
            if size > MAX_MANIFEST_BYTES:
                raise InvalidManifestError(f"{where}: manifest of {size} bytes exceeds {MAX_MANIFEST_BYTES}")
            try:
                self._manifest = st._cat(top)
            except FileNotFoundError:
                raise self._absent() from None
        return self._manifest

    def _absent(self) -> Exception:
        if self.storage._list(self.storage._key(self.name)):
            return NotACheckpointError(
                f"{self.where}: no {MANIFEST}, so not a committed savegame checkpoint "
                "(an interrupted upload or delete; cleanup() removes it)"
            )
        return CheckpointNotFoundError(f"{self.where}: no such checkpoint")

    def resolve(self) -> tuple[str, dict[str, int]]:
        """The version whose manifest equals the commit marker, and its files' sizes (one listing)."""
        if self._version is None:
            st = self.storage
            manifest = self.manifest_bytes()
            listing = st._list(st._key(self.name))
            versions = st._versions(self.name, listing)
            for version in sorted(versions, reverse=True):  # newest first
                files = versions[version]
                own = files.get(MANIFEST)
                if own is None or int(listing[own].get("size", -1)) != len(manifest):
                    continue
                try:
                    if st._cat(own) != manifest:
                        continue
                except FileNotFoundError:
                    continue
                self._version = version
                self._sizes = {f: int(listing[p].get("size", 0)) for f, p in files.items()}
                break
            else:
                raise MissingFileError(
                    f"{self.where}: no data version matches the committed manifest "
                    "(deleted or overwritten while being read?)"
                )
        return self._version, self._sizes

    def file_where(self, file: str) -> str:
        if file == MANIFEST:
            return f"{self.where}/{MANIFEST}"
        return f"{self.where}/{self._version}/{file}" if self._version else f"{self.where}/{file}"

    def file_size(self, file: str) -> int:
        _, sizes = self.resolve()
        if file not in sizes or file in (MANIFEST, STAGING_MARKER):
            raise FileNotFoundError(errno.ENOENT, "not in the checkpoint", self.file_where(file))
        return sizes[file]

    def read_file(self, file: str, size: int) -> bytearray:
        version, _ = self.resolve()
        path = self.storage._key(self.name, version, file)
        return self.storage.download(path, size, self.file_where(file))

    def iter_file(self, file: str, size: int) -> Iterator[memoryview]:
        """The file in order, in windows (see :meth:`RemoteStorage.iter_download`)."""
        version, _ = self.resolve()
        path = self.storage._key(self.name, version, file)
        return self.storage.iter_download(path, size, self.file_where(file))

    def close(self) -> None:
        """Nothing to release (each file is fetched when read)."""
        return None


# ---------------------------------------------------------------------------------------------------
# Writing


class RemoteTransaction:
    """One checkpoint being uploaded into a fresh version folder (see the module docstring)."""

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
                old = st._versions(self.name, st._list(st._key(self.name)))
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


class _Sink:
    """A data file being uploaded (the :class:`~savegame.storage.base.FileSink` protocol)."""

    bytes_written: int
    path: str

    def write(self, data: bytes | bytearray | memoryview) -> int:
        raise NotImplementedError

    def seal(self) -> None:
        """No more writes will come: start uploading what is buffered (``close`` waits for it)."""

    def close(self) -> None:
        raise NotImplementedError

    def discard(self) -> None:
        raise NotImplementedError


class _BufferReader(io.RawIOBase):
    """A seekable read-only file over a part buffer, used as a request body.

    HTTP clients copy a ``bytes``/``bytearray`` body whole (aiohttp slices it, then joins it with the
    headers: two extra copies per request in flight); a file body is read in small chunks instead.
    """

    def __init__(self, buffer: bytearray | memoryview) -> None:
        super().__init__()
        self._view = memoryview(buffer).cast("B") if memoryview(buffer).format != "B" else memoryview(buffer)
        self._pos = 0

    def __len__(self) -> int:
        return len(self._view)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), len(self._view) - self._pos))
        memoryview(b).cast("B")[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        data = self._view[self._pos : end].tobytes()
        self._pos = max(self._pos, end)
        return data

    def close(self) -> None:
        super().close()
        self._view.release()


def _bytes_view(data: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class _MultipartSink(_Sink):
    """S3: one multipart upload per file, parts uploaded by the transaction's threads.

    Memory: whole parts inside a large ``write`` (the tensor-file writer hands over 64 MiB slices of
    tensor memory) are uploaded straight from the caller's memory, several in parallel, and ``write``
    returns when they are stored, so no copy of them is ever made. Only what does not fill a whole part
    (headers, small tensors, the head and tail of a slice) is copied into a part buffer, which is
    uploaded in the background once full. At most ``max_concurrency`` requests are in flight (a
    semaphore blocks the writer beyond that), so buffers never exceed ``max_concurrency + 1`` parts
    and are in practice one or two. Files smaller than one part are a single PUT. Part sizes double
    every 1000 parts, so files up to about 80 TB fit S3's 10000-part limit.
    """

    def __init__(self, txn: RemoteTransaction, path: str) -> None:
        self._txn = txn
        self._st = txn.storage
        self.path = path
        self.where = self._st._where(path)
        self._bucket, self._key, _ = self._st.fs.split_path(path)
        self._buf: bytearray | None = None
        self._fill = 0
        self._upload_id: str | None = None
        self._next_part = 1
        self._etags: dict[int, str] = {}
        self._futures: list[Future[None]] = []
        self._sealed = False
        self._closed = False
        self.bytes_written = 0

    def _part_size(self) -> int:
        return self._st.part_size << min((self._next_part - 1) // 1000, 20)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._sealed:
            raise StorageError(errno.EINVAL, f"{self.where}: write after the file was finished")
        view = _bytes_view(data)
        total = len(view)
        direct: list[Future[None]] = []
        try:
            while len(view):
                part = self._part_size()
                if self._buf is None and len(view) >= part:
                    direct.append(self._submit_part(view[:part], recycle=False))  # zero-copy
                    view = view[part:]
                    continue
                if self._buf is None:
                    self._buf = self._txn._take_buffer(part)
                    self._fill = 0
                n = min(len(view), len(self._buf) - self._fill)
                self._buf[self._fill : self._fill + n] = view[:n]
                self._fill += n
                view = view[n:]
                if self._fill == len(self._buf):
                    self._submit(final=False)
        finally:
            for future in direct:  # the caller's memory must not be needed after we return
                try:
                    future.result()
                except BaseException:
                    pass
        for future in direct:
            future.result()
        self.bytes_written += total
        return total

    def _check(self) -> None:
        for future in self._futures:
            if future.done() and future.exception() is not None:
                future.result()

    def _submit(self, *, final: bool) -> None:
        """Hand the current buffer to an upload thread (blocks while ``max_concurrency`` are in flight)."""
        self._check()
        buf, fill = self._buf if self._buf is not None else bytearray(), self._fill
        self._buf, self._fill = None, 0
        if fill < len(buf):
            del buf[fill:]  # the last part: shrink in place rather than copy
        if final and self._upload_id is None:
            self._txn._slots.acquire()
            self._futures.append(self._txn._executor().submit(self._put_whole, buf))
            return
        self._futures.append(self._submit_part(buf, recycle=True))

    def _submit_part(self, body: bytearray | memoryview, *, recycle: bool) -> Future[None]:
        """Start uploading the next part (blocks while ``max_concurrency`` requests are in flight)."""
        self._check()
        if self._upload_id is None:
            response = self._st._call(
                f"starting the upload of {self.where}", self._st.fs.call_s3, "create_multipart_upload",
                Bucket=self._bucket, Key=self._key,
            )  # fmt: skip
            self._upload_id = str(response["UploadId"])
        if self._next_part > _MAX_PARTS:
            raise StorageError(errno.EFBIG, f"{self.where}: more than {_MAX_PARTS} parts")
        number = self._next_part
        self._next_part += 1
        self._txn._slots.acquire()
        future = self._txn._executor().submit(self._put_part, number, body, recycle)
        self._txn._beat()
        return future

    def _request(self, method: str, buf: bytearray | memoryview, **kwargs: Any) -> Any:
        """One S3 request whose body is ``buf``, streamed from a fresh file view (so a retry re-reads it)."""
        body = _BufferReader(buf)
        try:
            return self._st.fs.call_s3(method, Body=body, ContentLength=len(buf), **kwargs)
        finally:
            body.close()

    def _put_whole(self, buf: bytearray) -> None:
        try:
            self._st._call(f"writing {self.where}", self._request, "put_object", buf,
                           Bucket=self._bucket, Key=self._key)  # fmt: skip
        finally:
            self._txn._slots.release()

    def _put_part(self, number: int, body: bytearray | memoryview, recycle: bool) -> None:
        try:
            response = self._st._call(
                f"uploading part {number} of {self.where}", self._request, "upload_part", body,
                Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, PartNumber=number,
            )  # fmt: skip
            self._etags[number] = str(response["ETag"])
        finally:
            self._txn._slots.release()
            if recycle and isinstance(body, bytearray):
                self._txn._give_buffer(body)

    def seal(self) -> None:
        if self._sealed:
            return
        if self._fill > 0 or self._upload_id is None:
            self._submit(final=True)
        self._sealed = True

    def close(self) -> None:
        if self._closed:
            return
        self.seal()
        for future in self._futures:
            future.result()
        if self._upload_id is not None:
            parts = [{"PartNumber": n, "ETag": self._etags[n]} for n in sorted(self._etags)]
            self._st._call(
                f"completing the upload of {self.where}", self._st.fs.call_s3, "complete_multipart_upload",
                Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, MultipartUpload={"Parts": parts},
            )  # fmt: skip
        self._closed = True

    def discard(self) -> None:
        self._sealed = self._closed = True
        self._buf = None
        for future in self._futures:
            future.cancel()
        for future in self._futures:
            if not future.cancelled():
                try:
                    future.result()
                except Exception:
                    pass
        if self._upload_id is not None:
            try:
                self._st._call(
                    f"aborting the upload of {self.where}", self._st.fs.call_s3, "abort_multipart_upload",
                    Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                )  # fmt: skip
            except (StorageError, OSError) as exc:
                log.warning("%s", exc)


class _StreamSink(_Sink):
    """Any other fsspec backend: a streaming file object (the backend buffers and uploads blocks)."""

    def __init__(self, txn: RemoteTransaction, path: str) -> None:
        self._txn = txn
        self._st = txn.storage
        self.path = path
        self.where = self._st._where(path)
        self._st._ensure_parent(path)
        self._file: Any = self._st._call(f"creating {self.where}", self._st.fs.open, path, "wb",
                                         block_size=self._st.part_size)  # fmt: skip
        self._closed = False
        self.bytes_written = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._closed:
            raise StorageError(errno.EINVAL, f"{self.where}: write after the file was finished")
        view = _bytes_view(data)
        try:
            for start in range(0, len(view), self._st.part_size):
                self._file.write(view[start : start + self._st.part_size])
        except Exception as exc:
            raise self._st._fail(exc, f"writing {self.where}") from None
        self.bytes_written += len(view)
        self._txn._beat()
        return len(view)

    def seal(self) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._file.close()
        except Exception as exc:
            raise self._st._fail(exc, f"finishing {self.where}") from None

    def discard(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            discard = getattr(self._file, "discard", None)
            if callable(discard):
                discard()
            else:
                self._file.close()
        except Exception:
            pass
