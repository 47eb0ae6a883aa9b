"""Where checkpoints live: the storage protocols, a local directory, any fsspec URL.

:func:`storage_for` picks the implementation from the path: a plain path (or ``file://``) is a
:class:`LocalStorage`, anything else with a scheme (``s3://``, ``gs://``, ``az://``, ``memory://``...)
a :class:`RemoteStorage` (which imports fsspec only then).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from savegame.errors import ConfigError, InvalidNameError
from savegame.storage.base import CheckpointReader, CheckpointRef, FileSink, Storage, Transaction
from savegame.storage.local import (
    FileOps,
    LocalCheckpointReader,
    LocalStorage,
    check_checkpoint_name,
    open_local_checkpoint,
)
from savegame.storage.remote import RemoteCheckpointReader, RemoteStorage

__all__ = [
    "CheckpointReader",
    "CheckpointRef",
    "FileOps",
    "FileSink",
    "LocalCheckpointReader",
    "LocalStorage",
    "RemoteCheckpointReader",
    "RemoteStorage",
    "Storage",
    "Transaction",
    "is_url",
    "locate",
    "open_local_checkpoint",
    "path_text",
    "storage_for",
]


def is_url(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a remote URL (``scheme://...`` other than ``file://``)."""
    if not isinstance(path, str) or "://" not in path:
        return False
    scheme = path.split("://", 1)[0]
    return bool(scheme) and scheme.lower() not in ("file", "local") and all(c.isalnum() or c in "+-.:" for c in scheme)


def path_text(path: object, what: str = "path") -> str:
    """``os.fspath(path)`` for a str or ``os.PathLike`` of str; :class:`ConfigError` for anything else
    (an int, None, bytes, a list), naming what was given, instead of a TypeError from deep inside."""
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(text, str):
        raise ConfigError(
            f"{what} must be a local path (str or os.PathLike) or a URL like s3://bucket/run/NAME, "
            f"got {type(path).__name__} {str(path)[:80]!r}"
        )
    return text


def _local_path(path: str | os.PathLike[str]) -> str:
    text = path_text(path)
    for prefix in ("file://", "local://"):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text


def storage_for(
    url_or_path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> Storage:
    """The storage for a root of checkpoints: :class:`LocalStorage` for a path (created if missing),
    :class:`RemoteStorage` for a URL, with ``storage_options`` passed to fsspec."""
    path_text(url_or_path, "the checkpoint directory")
    if is_url(url_or_path):
        return RemoteStorage(os.fspath(url_or_path), storage_options=storage_options)
    if storage_options:
        raise ConfigError(f"storage_options apply to URLs (s3://...), not to the local path {os.fspath(url_or_path)!r}")
    return LocalStorage(_local_path(url_or_path))


def locate(
    path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> tuple[Storage, str]:
    """Split a checkpoint's path or URL into its root's storage and its name.

    ``runs/exp/epoch-3`` -> (``LocalStorage("runs/exp")``, ``"epoch-3"``); ``s3://bucket/run/epoch-3``
    -> (``RemoteStorage("s3://bucket/run")``, ``"epoch-3"``).
    """
    if is_url(path):
        url = os.fspath(path)
        parts = urlsplit(url)
        base = url[: len(url) - len(parts.query) - 1] if parts.query else url
        root, _, name = base.rstrip("/").rpartition("/")
        if not name or root.endswith(":/") or root.endswith(":"):
            raise InvalidNameError(f"{url.split('://', 1)[0]}:// URL needs a root and a name, like s3://bucket/run/NAME")
        check_checkpoint_name(name)
        return RemoteStorage(root, storage_options=storage_options), name
    if storage_options:
        raise ConfigError(f"storage_options apply to URLs (s3://...), not to the local path {os.fspath(path)!r}")
    full = os.path.abspath(_local_path(path))
    root, name = os.path.split(full.rstrip(os.sep))
    check_checkpoint_name(name)
    return LocalStorage(root), name
