"""The storage protocols: what the writer and the Checkpointer need from a place that holds checkpoints.

A *root* holds checkpoints, each a named folder of files. Writing one goes through a
:class:`Transaction`, which makes the whole folder appear at once or not at all:

1. ``storage.begin(name)`` -> a transaction (nothing visible yet);
2. ``txn.open(file)`` -> a :class:`FileSink` per data file; ``write`` its bytes, then ``close()``
   (which makes the file durable);
3. ``txn.commit(manifest)`` writes ``manifest.json`` last and publishes the folder: an atomic rename on
   a filesystem, the manifest itself as the commit marker on an object store;
4. on any error, ``txn.abort()`` removes everything the transaction wrote.

Readers only ever list and open committed checkpoints.
"""

from __future__ import annotations

from typing import Protocol

MANIFEST = "manifest.json"
STAGING_PREFIX = ".staging-"
QUARANTINE_PREFIX = ".quarantine-"
TRASH_PREFIX = ".trash-"


class FileSink(Protocol):
    """A file being written. ``write`` writes all of ``data``; ``close`` makes it durable."""

    def write(self, data: bytes | bytearray | memoryview) -> int: ...

    def close(self) -> None: ...


class Transaction(Protocol):
    """One checkpoint being written (see the module docstring for the call order)."""

    name: str

    def open(self, file: str) -> FileSink: ...

    def commit(self, manifest: bytes) -> str: ...

    def abort(self) -> None: ...


class Storage(Protocol):
    """A root of checkpoints."""

    def begin(self, name: str, *, overwrite: bool = False) -> Transaction: ...

    def committed(self) -> list[str]: ...

    def delete(self, name: str) -> None: ...

    def quarantine(self, name: str) -> str: ...

    def cleanup(self) -> list[str]: ...
