"""Reading one remote checkpoint: :class:`RemoteCheckpointReader`, pinned to one version.

A reader takes ``NAME/manifest.json`` (the commit marker) and reads the files of the version folder
whose own manifest has the same bytes, so an overwrite running meanwhile cannot mix versions. Files
are downloaded whole (parallel ranged GETs) or streamed in windows (the mirror's copies), through the
storage's transport. :meth:`~savegame.storage.remote.root.RemoteStorage.reader` opens one;
:meth:`~savegame.storage.remote.root.RemoteStorage.cleanup` asks one which version is committed.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from savegame.errors import CheckpointNotFoundError, InvalidManifestError, MissingFileError, NotACheckpointError
from savegame.storage.base import MANIFEST
from savegame.storage.remote.layout import STAGING_MARKER, versions_under

if TYPE_CHECKING:
    from savegame.storage.remote.root import RemoteStorage


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
            versions = versions_under(st._key(self.name), listing)
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

    def prefetch(self, files: Iterable[str] | None) -> None:
        """No hint is used: each file is downloaded with parallel ranged reads when it is read."""
        return None
