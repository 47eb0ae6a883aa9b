"""The manifest: ``manifest.json``, written last, describes a checkpoint completely.

Example (format 1)::

    {
     "format": "savegame",
     "format_version": 1,
     "created": "2026-11-22T07:31:59.123456Z",
     "versions": {"savegame": "0.1.0", "python": "3.11.7", "numpy": "2.4.6", "torch": "2.13.0"},
     "hash_algorithm": "xxh3_128",
     "metadata": {...},                 user metadata (tree-encoded, JSON-like)
     "progress": {...} | null,          epoch / step / metrics / best, filled by the Checkpointer
     "files": {"model.safetensors": {"bytes": 1234, "hash": "<hex>"}},
     "items": {"model": {"kind": "torch.nn.Module", "file": "model.safetensors", "skeleton": {...}},
               "epoch": {"kind": "data", "file": null, "skeleton": 7}},
     "manifest_hash": "<hex>"           hash of everything above (canonical JSON)
    }

The manifest is untrusted input when read: size, JSON nesting, every field's type and every limit are
checked, and the file's bytes must be exactly the canonical serialization of its content, so a single
flipped byte anywhere in it is detected.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidManifestError, UnsupportedFormatError
from .hashing import ALGORITHM, HEX_LENGTH, hash_bytes
from .tree import decode_plain

FORMAT = "savegame"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 512 * 1024 * 1024
MAX_ITEMS = 100_000
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,200}$")
_HEX = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True)
class FileEntry:
    """A data file of the checkpoint: its exact size and content hash."""

    bytes: int
    hash: str


@dataclass(frozen=True)
class ItemEntry:
    """A top-level item of the state: what it was, where its arrays are, and its skeleton."""

    kind: str
    file: str | None
    skeleton: Any


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest."""

    created: _dt.datetime
    versions: Mapping[str, str]
    metadata: Mapping[str, Any]
    progress: Mapping[str, Any] | None
    files: Mapping[str, FileEntry]
    items: Mapping[str, ItemEntry]
    format_version: int = FORMAT_VERSION
    hash_algorithm: str = ALGORITHM
    raw_metadata: Any = field(default=None, repr=False, compare=False)
    raw_progress: Any = field(default=None, repr=False, compare=False)

    @property
    def total_bytes(self) -> int:
        """Bytes of all data files (the manifest itself not included)."""
        return sum(f.bytes for f in self.files.values())


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _serialize(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, indent=1, ensure_ascii=True, allow_nan=False).encode() + b"\n"


def dump_manifest(
    *,
    created: _dt.datetime,
    versions: Mapping[str, str],
    metadata: Any,
    progress: Any,
    files: Mapping[str, FileEntry],
    items: Mapping[str, ItemEntry],
) -> bytes:
    """Serialize a manifest; ``metadata`` and ``progress`` are already tree-encoded nodes."""
    body: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": created.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "versions": dict(versions),
        "hash_algorithm": ALGORITHM,
        "metadata": metadata,
        "progress": progress,
        "files": {name: {"bytes": f.bytes, "hash": f.hash} for name, f in files.items()},
        "items": {name: {"kind": i.kind, "file": i.file, "skeleton": i.skeleton} for name, i in items.items()},
    }
    body["manifest_hash"] = hash_bytes(_canonical(body))
    return _serialize(body)


def parse_manifest(data: bytes, where: str) -> Manifest:
    """Parse and validate untrusted manifest bytes; raise a specific error naming ``where``."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise InvalidManifestError(f"{where}: manifest of {len(data)} bytes exceeds {MAX_MANIFEST_BYTES}")
    try:
        body = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidManifestError(f"{where}: manifest JSON is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidManifestError(f"{where}: manifest is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(body, dict):
        raise InvalidManifestError(f"{where}: manifest is not a JSON object")
    if body.get("format") != FORMAT:
        raise InvalidManifestError(f"{where}: not a savegame manifest (format={str(body.get('format'))[:40]!r})")
    version = body.get("format_version")
    if type(version) is not int:
        raise InvalidManifestError(f"{where}: format_version missing or not an integer")
    if version > FORMAT_VERSION or version < 1:
        raise UnsupportedFormatError(
            f"{where}: format version {version} is not supported by this savegame (reads up to "
            f"{FORMAT_VERSION}); upgrade savegame to read it"
        )
    stored_hash = body.pop("manifest_hash", None)
    if not isinstance(stored_hash, str):
        raise InvalidManifestError(f"{where}: manifest_hash missing")
    actual = hash_bytes(_canonical(body))
    if actual != stored_hash:
        from .errors import HashMismatchError

        raise HashMismatchError(f"{where}: manifest content does not match its manifest_hash (edited or corrupted)")
    body["manifest_hash"] = stored_hash
    if _serialize(body) != data:
        from .errors import HashMismatchError

        raise HashMismatchError(f"{where}: manifest bytes are not in canonical form (edited or corrupted)")
    if body.get("hash_algorithm") != ALGORITHM:
        raise UnsupportedFormatError(f"{where}: unknown hash algorithm {str(body.get('hash_algorithm'))[:40]!r}")
    created = _parse_time(body.get("created"), where)
    versions = body.get("versions")
    if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
        raise InvalidManifestError(f"{where}: versions must map names to strings")
    files = _parse_files(body.get("files"), where)
    items = _parse_items(body.get("items"), files, where)
    raw_metadata = body.get("metadata")
    raw_progress = body.get("progress")
    metadata = decode_plain(raw_metadata) if raw_metadata is not None else {}
    if not isinstance(metadata, dict):
        raise InvalidManifestError(f"{where}: metadata must be a dict")
    progress = decode_plain(raw_progress) if raw_progress is not None else None
    if progress is not None and not isinstance(progress, dict):
        raise InvalidManifestError(f"{where}: progress must be a dict or null")
    return Manifest(
        created=created,
        versions=versions,
        metadata=metadata,
        progress=progress,
        files=files,
        items=items,
        format_version=version,
        raw_metadata=raw_metadata,
        raw_progress=raw_progress,
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _parse_time(value: object, where: str) -> _dt.datetime:
    if not isinstance(value, str) or len(value) > 40:
        raise InvalidManifestError(f"{where}: created must be an ISO-8601 UTC time string")
    try:
        return _dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=_dt.timezone.utc)
    except ValueError:
        raise InvalidManifestError(f"{where}: created {value!r} is not an ISO-8601 UTC time") from None


def _parse_files(value: object, where: str) -> dict[str, FileEntry]:
    if not isinstance(value, dict) or len(value) > MAX_ITEMS:
        raise InvalidManifestError(f"{where}: files must be an object of at most {MAX_ITEMS} entries")
    files = {}
    for name, entry in value.items():
        if not _FILE_NAME.match(name) or name == "manifest.json":
            raise InvalidManifestError(f"{where}: invalid file name {name[:80]!r} (no paths or hidden names)")
        if not isinstance(entry, dict):
            raise InvalidManifestError(f"{where}: files[{name!r}] must be an object")
        size, digest = entry.get("bytes"), entry.get("hash")
        if type(size) is not int or not 0 <= size < 2**62:
            raise InvalidManifestError(f"{where}: files[{name!r}].bytes must be a non-negative integer")
        if not isinstance(digest, str) or len(digest) != HEX_LENGTH or not _HEX.match(digest):
            raise InvalidManifestError(f"{where}: files[{name!r}].hash must be {HEX_LENGTH} hex digits")
        files[name] = FileEntry(bytes=size, hash=digest)
    return files


def _parse_items(value: object, files: Mapping[str, FileEntry], where: str) -> dict[str, ItemEntry]:
    if not isinstance(value, dict) or len(value) > MAX_ITEMS:
        raise InvalidManifestError(f"{where}: items must be an object of at most {MAX_ITEMS} entries")
    items = {}
    for name, entry in value.items():
        if len(name) > 1024:
            raise InvalidManifestError(f"{where}: item name longer than 1024 characters")
        if not isinstance(entry, dict):
            raise InvalidManifestError(f"{where}: items[{name[:80]!r}] must be an object")
        kind, file = entry.get("kind"), entry.get("file")
        if not isinstance(kind, str) or len(kind) > 200:
            raise InvalidManifestError(f"{where}: items[{name[:80]!r}].kind must be a short string")
        if file is not None and (not isinstance(file, str) or file not in files):
            raise InvalidManifestError(f"{where}: items[{name[:80]!r}].file {str(file)[:80]!r} is not listed in files")
        if "skeleton" not in entry:
            raise InvalidManifestError(f"{where}: items[{name[:80]!r}] has no skeleton")
        items[name] = ItemEntry(kind=kind, file=file, skeleton=entry["skeleton"])
    return items
