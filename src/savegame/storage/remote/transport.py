"""Every request to the object store under one root URL: the fsspec filesystem, retries, error translation.

:class:`RemoteTransport` opens the fsspec filesystem for a URL (importing fsspec only then) and makes
every request through :meth:`~RemoteTransport._call`: retried with exponential backoff and jitter on
transient errors (:func:`is_transient`: HTTP 5xx, connection resets, timeouts; never a 4xx), then
translated (missing and existing stay ``FileNotFoundError`` / ``FileExistsError``, the rest becomes
:class:`StorageError`) with a message scrubbed of every secret this root knows (options, the
backend's credentials, the usual environment variables). On top: small objects (read, inspect,
list, put, delete with manifests first) and whole-file reads by parallel ranged GETs.
:class:`~savegame.storage.remote.root.RemoteStorage` is a transport (it adds the checkpoint
semantics); the reader (:mod:`~savegame.storage.remote.read`), the transactions
(:mod:`~savegame.storage.remote.write`) and the upload sinks (:mod:`~savegame.storage.remote.upload`)
make their requests through it.
"""

from __future__ import annotations

import errno
import inspect
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlsplit

from savegame._util.logs import get_logger
from savegame.errors import CheckpointError, ConfigError, StorageError, TruncatedFileError
from savegame.format.naming import check_checkpoint_name
from savegame.storage.base import MANIFEST

log = get_logger("savegame")

MIN_PART_SIZE = 5 << 20  # the S3 minimum for every part but the last
DEFAULT_PART_SIZE = 8 << 20
DEFAULT_CONCURRENCY = 4

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
# The transport


class RemoteTransport:
    """Requests under the root at fsspec URL ``url`` (see the module docstring).

    ``storage_options`` go to fsspec; ``part_size``: bytes per uploaded part and per ranged read;
    ``max_concurrency``: parts/ranges in flight at once; ``retries``, ``backoff``, ``max_backoff``:
    attempts after the first, the first delay and its cap for transient errors; ``fs``: an fsspec
    filesystem to use instead of opening one. :class:`~savegame.storage.remote.root.RemoteStorage`
    checks these values before it calls this constructor.
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: Mapping[str, Any] | None,
        part_size: int,
        max_concurrency: int,
        retries: int,
        backoff: float,
        max_backoff: float,
        fs: Any,
    ) -> None:
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

    # -- names and messages -------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return "/".join((self._root, *parts))

    def url(self, name: str) -> str:
        """``ROOT/NAME`` as a URL without credentials."""
        return f"{self.root}/{check_checkpoint_name(name)}"

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
            else:  # an fsspec without mode="create": check, then put (racy; see savegame.storage.remote)
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
