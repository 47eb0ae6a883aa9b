"""The manifest: ``manifest.json``, written last, describes a checkpoint completely.

Example (format 3)::

    {
     "format": "savegame",
     "format_version": 3,
     "created": "2026-11-22T07:31:59.123456Z",
     "versions": {"savegame": "0.1.0", "python": "3.11.7", "numpy": "2.4.6", "torch": "2.13.0"},
     "hash_algorithm": "xxh3_128",
     "hash_chunk_bytes": 67108864,      files longer than this are hashed in chunks (see savegame.format.hashing)
     "metadata": {...},                 user metadata (tree-encoded, JSON-like)
     "progress": {...} | null,          epoch / step / metrics / best, filled by the Checkpointer
     "files": {"model.safetensors": {"bytes": 1234, "hash": "<hex>"}},
     "items": {"model": {"kind": "torch.nn.Module", "file": "model.safetensors", "skeleton": {...}},
               "epoch": {"kind": "data", "file": null, "skeleton": 7}},
     "manifest_hash": "<hex>"           hash of every byte of the file before these hex digits
    }

The file is ``json.dumps(body, indent=1, ensure_ascii=True)`` plus a newline, ``manifest_hash`` last.
Format 1 (still read) hashed the content instead: the canonical compact JSON of the body with sorted keys,
and required the bytes to be exactly the serialization of that content. Format 2 hashes the bytes
themselves, which detects the same edits (a changed value, another indentation, a reordered key) without
re-serializing the whole manifest on every read. Format 3 adds ``hash_chunk_bytes``: the hash of a data file
longer than that is the hash of its chunks' digests, so one large file is verified on several cores. Format 4
(written only by incremental saves; every other save still writes 3) adds two optional fields to an item:
``linked`` (``{file: [array keys]}``: other files of the same checkpoint, hard links of an earlier
checkpoint's files, that hold the item's unchanged arrays) and ``array_hashes`` (each array's hash, which
the next incremental save compares with). A reader of format 3 refuses such a manifest as written by a
newer savegame instead of reading it as a damaged one.

The manifest is untrusted input when read: size, JSON nesting, every field's type and every limit are
checked, and its hash covers every byte of it, so a single flipped byte anywhere in it is detected.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from savegame.errors import (
    HashMismatchError,
    InvalidManifestError,
    UnsupportedFormatError,
    UnsupportedTypeError,
)
from savegame.format import hashing
from savegame.format.hashing import ALGORITHM, HEX_LENGTH, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, hash_bytes
from savegame.format.tree import MAX_DEPTH, decode_plain

FORMAT = "savegame"
FORMAT_VERSION = 4
"""The newest format this savegame writes; it reads every format from 1 up to this one."""
PLAIN_FORMAT_VERSION = 3
"""The version of a manifest without the fields of version 4 (an item's ``linked`` files and
``array_hashes``, written by incremental saves): a full save stays readable by a savegame that reads
up to version 3, and an incremental one is refused by it as "written by a newer savegame, upgrade" (never
taken for a damaged checkpoint)."""
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
"""Largest manifest read. Parsing costs a small multiple of the size (JSON objects are larger than their
text), so this bounds what a hostile manifest can make a reader allocate."""
MAX_ITEMS = 100_000
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,200}")  # used with fullmatch: no trailing newline
_HEX = re.compile(r"[0-9a-f]+")
_FREE_CONTAINERS = 4096
_MIN_BYTES_PER_CONTAINER = 12
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_HASH_KEY = b',\n "manifest_hash": "'  # the file's last entry: _HASH_KEY + hex digits + _END
_END = b'"\n}\n'
_TAIL_BYTES = len(_HASH_KEY) + HEX_LENGTH + len(_END)
_CREATED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


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
    linked: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Incremental checkpoints: arrays of this item kept in other files of the checkpoint (hard links or
    server-side copies of a previous checkpoint's file), as ``{file: (key, ...)}``; every other key is in
    :attr:`file`. Empty for a full save."""
    array_hashes: Mapping[str, str] | None = None
    """Incremental checkpoints: the XXH3-128 of every array (its dtype, shape and bytes,
    :func:`savegame.format.hashing.array_hash`) by key, what the next incremental save compares with."""

    @property
    def files(self) -> tuple[str, ...]:
        """Every data file holding arrays of this item: :attr:`file` first, then the linked ones."""
        return ((self.file,) if self.file is not None else ()) + tuple(self.linked)


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest."""

    created: _dt.datetime
    versions: Mapping[str, str]
    metadata: Mapping[str, Any]
    progress: Mapping[str, Any] | None
    files: Mapping[str, FileEntry]
    items: Mapping[str, ItemEntry]
    format_version: int = PLAIN_FORMAT_VERSION
    hash_algorithm: str = ALGORITHM
    hash_chunk_bytes: int | None = None
    """Files longer than this have a chunked hash (:class:`~savegame.format.hashing.FileHasher`); None: whole files."""
    raw_metadata: Any = field(default=None, repr=False, compare=False)
    raw_progress: Any = field(default=None, repr=False, compare=False)

    @property
    def total_bytes(self) -> int:
        """Bytes of all data files (the manifest itself not included)."""
        return sum(f.bytes for f in self.files.values())

    @property
    def linked_bytes(self) -> int:
        """Bytes of the data files an incremental save hard-linked (or copied on the server) from an earlier
        checkpoint instead of writing them: shared with it on disk. 0 for a full save."""
        linked = {file for item in self.items.values() for file in item.linked}
        return sum(self.files[file].bytes for file in linked if file in self.files)


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _serialize(obj: Mapping[str, Any]) -> bytes:
    """The manifest's file form: ``json.dumps(obj, indent=1, ensure_ascii=True, allow_nan=False)`` + newline.

    Produced by :func:`_indent1` (byte-identical, several times faster than the json module's pure-Python
    indenting encoder, which both save and load run over every skeleton node); anything it does not
    handle falls back to ``json.dumps`` itself.
    """
    try:
        return _indent1(obj).encode() + b"\n"
    except _NotPlain:
        return json.dumps(obj, indent=1, ensure_ascii=True, allow_nan=False).encode() + b"\n"


def sign_manifest(body: Mapping[str, Any]) -> bytes:
    """The file form of a manifest ``body`` with its format-2 ``manifest_hash`` (any old one replaced):
    the XXH3-128 of every byte before the hash's hex digits, which end the file."""
    text = _serialize({**{k: v for k, v in body.items() if k != "manifest_hash"}, "manifest_hash": ""})
    prefix = text[: -len(_END)]
    return prefix + hash_bytes(prefix).encode() + _END


def _signed_bytes(data: bytes) -> bool:
    """Whether ``data`` ends with a format-2 ``manifest_hash`` that matches every byte before it."""
    if len(data) < _TAIL_BYTES or not data.endswith(_END) or data[-_TAIL_BYTES:][: len(_HASH_KEY)] != _HASH_KEY:
        return False
    signed = len(data) - HEX_LENGTH - len(_END)
    with memoryview(data) as view:
        actual = hash_bytes(view[:signed])
    return data[signed : signed + HEX_LENGTH] == actual.encode()


class _NotPlain(Exception):
    """A value :func:`_indent1` leaves to ``json.dumps`` (non-string keys, unusual types)."""


_encode_str = json.encoder.encode_basestring_ascii
_NEWLINES = ["\n" + " " * i for i in range(MAX_DEPTH + 8)]


def _newline(level: int) -> str:
    return _NEWLINES[level] if level < len(_NEWLINES) else "\n" + " " * level


def _indent1(obj: object) -> str:
    """``json.dumps(obj, indent=1, ensure_ascii=True, allow_nan=False)`` for str-keyed dicts, lists, tuples,
    str, int, float, bool and None (exact types; :class:`_NotPlain` otherwise)."""
    out: list[str] = []
    _emit(obj, 0, out)
    return "".join(out)


def _scalar(v: object) -> str | None:
    t = type(v)
    if t is str:
        return _encode_str(v)  # type: ignore[arg-type]
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if t is int:
        return int.__repr__(v)  # type: ignore[arg-type]
    if t is float:
        assert isinstance(v, float)
        if not math.isfinite(v):
            raise ValueError("Out of range float values are not JSON compliant: " + repr(v))
        return float.__repr__(v)
    if isinstance(v, str):  # a str subclass (torch's TorchVersion): json.dumps writes it as its string
        return _encode_str(v)
    return None


def _emit(o: object, level: int, out: list[str]) -> None:
    text = _scalar(o)
    if text is not None:
        out.append(text)
        return
    t = type(o)
    if t is dict:
        assert isinstance(o, dict)
        if not o:
            out.append("{}")
            return
        inner = _newline(level + 1)
        sep = "," + inner
        out.append("{" + inner)
        first = True
        for k, v in o.items():
            if type(k) is not str:
                raise _NotPlain
            if not first:
                out.append(sep)
            first = False
            out.append(_encode_str(k) + ": ")
            if type(v) is str:
                out.append(_encode_str(v))
            else:
                _emit(v, level + 1, out)
        out.append(_newline(level) + "}")
        return
    if t is list or t is tuple:
        assert isinstance(o, (list, tuple))
        if not o:
            out.append("[]")
            return
        inner = _newline(level + 1)
        sep = "," + inner
        out.append("[" + inner)
        first = True
        for v in o:
            if not first:
                out.append(sep)
            first = False
            _emit(v, level + 1, out)
        out.append(_newline(level) + "]")
        return
    raise _NotPlain


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
        "format_version": version_for(items.values()),
        "created": created.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "versions": dict(versions),
        "hash_algorithm": ALGORITHM,
        "hash_chunk_bytes": hashing.HASH_CHUNK_BYTES,  # what write_tensor_file hashed the files with
        "metadata": metadata,
        "progress": progress,
        "files": {name: {"bytes": f.bytes, "hash": f.hash} for name, f in files.items()},
        "items": {name: item_body(i) for name, i in items.items()},
    }
    data = sign_manifest(body)
    if len(data) > MAX_MANIFEST_BYTES:
        raise UnsupportedTypeError(
            f"manifest of {len(data)} bytes exceeds {MAX_MANIFEST_BYTES} (too much metadata or non-array state; "
            "store large data as arrays)"
        )
    check_manifest_cost(data, "manifest")
    return data


def version_for(items: Iterable[ItemEntry]) -> int:
    """The format version a manifest of ``items`` is written with: 4 if an item uses its fields, else 3."""
    return FORMAT_VERSION if any(i.linked or i.array_hashes is not None for i in items) else PLAIN_FORMAT_VERSION


def item_body(item: ItemEntry) -> dict[str, Any]:
    """An item's manifest entry; the incremental fields only when set (a full save's entry is unchanged)."""
    body: dict[str, Any] = {"kind": item.kind, "file": item.file, "skeleton": item.skeleton}
    if item.linked:
        body["linked"] = {f: list(keys) for f, keys in item.linked.items()}
    if item.array_hashes is not None:
        body["array_hashes"] = dict(item.array_hashes)
    return body


def parse_manifest(data: bytes, where: str) -> Manifest:
    """Parse and validate untrusted manifest bytes; raise a specific error naming ``where``.

    The order matters: size and parse cost first (bounded memory), then the JSON, then the self hash
    (so a damaged byte anywhere, the format version included, is reported as corruption), and only
    then the meaning of the fields.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise InvalidManifestError(f"{where}: manifest of {len(data)} bytes exceeds {MAX_MANIFEST_BYTES}")
    _check_parse_cost(data, where)
    try:
        return _parse_manifest(data, where)
    except RecursionError:
        # json.loads accepts nesting up to the interpreter's recursion limit; the encoders that check the
        # hash and the canonical form run a few frames deeper. Either way such a file is not ours.
        raise InvalidManifestError(f"{where}: manifest JSON is nested too deeply") from None


def _check_parse_cost(data: bytes, where: str) -> None:
    """Refuse manifests whose parse would cost far more memory than their size (many tiny containers).

    Every JSON container becomes a Python list or dict of 70-250 bytes; in the canonical form savegame
    writes (one value per indented line), a container costs more than 12 bytes of text on average, so
    one every :data:`_MIN_BYTES_PER_CONTAINER` bytes is never reached by a real manifest. Counting
    brackets over-counts the ones inside strings, which only makes the check stricter for them.
    """
    containers = data.count(b"[") + data.count(b"{")
    if containers > _FREE_CONTAINERS and containers * _MIN_BYTES_PER_CONTAINER > len(data):
        brackets = data.translate(_BRACKETS, _NOT_BRACKETS)  # only the brackets, "{" as "[": a copy <= 1/12 size
        if b"[" * (MAX_DEPTH + 1) in brackets:
            raise InvalidManifestError(f"{where}: manifest JSON is nested too deeply")
        raise InvalidManifestError(
            f"{where}: {containers} JSON containers in {len(data)} bytes: too dense for a savegame manifest "
            "(its parse would cost many times the file's size)"
        )


def check_manifest_cost(data: bytes, what: str) -> None:
    """Refuse to write a manifest that :func:`parse_manifest` would refuse to read (see _check_parse_cost)."""
    try:
        _check_parse_cost(data, what)
    except InvalidManifestError as exc:
        raise UnsupportedTypeError(
            f"{exc}; store many small containers (e.g. lists of empty lists) as an array instead"
        ) from None


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf, which no savegame writes as a JSON number
        raise ValueError(f"number {text[:40]} is out of range")
    return value


_MAX_JSON_INT = 2**53
"""savegame writes JSON integers only below 2**53 in magnitude (larger ones as ``{"$": "int"}`` strings)."""


class _HugeInt(ValueError):
    """A JSON integer beyond 2**53 (its digits in ``text``)."""

    def __init__(self, text: str) -> None:
        super().__init__(f"integer {text[:40]}... beyond 2**53 (savegame never writes one as a JSON number)")
        self.text = text


def _parse_int(text: str) -> int:
    value = int(text)
    if len(text) > 15 and not -_MAX_JSON_INT < value < _MAX_JSON_INT:  # 10**400 would crash float(): refused
        raise _HugeInt(text)
    return value


def _huge_int_field(document: str, digits: str) -> str:
    """The key whose value is the integer ``digits`` in ``document`` (for the error), or ``"a value"``."""
    found = re.search(r'"([^"\\]{1,100})"\s*:\s*' + re.escape(digits) + r"(?![0-9])", document)
    return f"field {found.group(1)!r}" if found else "a value"


def _parse_manifest(data: bytes, where: str) -> Manifest:
    signed = _signed_bytes(data)
    try:
        body = _DECODER.decode(data.decode("utf-8"))
    except _HugeInt as exc:
        field = _huge_int_field(data.decode("utf-8"), exc.text)
        raise InvalidManifestError(f"{where}: {field} holds an {exc}") from None
    except RecursionError:
        raise InvalidManifestError(f"{where}: manifest JSON is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidManifestError(f"{where}: manifest is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(body, dict):
        raise InvalidManifestError(f"{where}: manifest is not a JSON object")
    if body.get("format") != FORMAT:
        raise InvalidManifestError(f"{where}: not a savegame manifest (format={str(body.get('format'))[:40]!r})")
    version = body.get("format_version")
    stored_hash = body.pop("manifest_hash", None)
    if not isinstance(stored_hash, str):
        raise InvalidManifestError(f"{where}: manifest_hash missing")
    if type(version) is int and version == 1:
        _check_format_1(body, stored_hash, data, where)
    elif not signed:
        newer = ""
        if type(version) is int and version > FORMAT_VERSION:
            newer = f"; or written by a newer savegame (format version {version}, this one reads {FORMAT_VERSION})"
        raise HashMismatchError(f"{where}: manifest bytes do not match its manifest_hash (edited or corrupted{newer})")
    if type(version) is not int:
        raise InvalidManifestError(f"{where}: format_version missing or not an integer")
    if version < 1:
        raise InvalidManifestError(f"{where}: format version {version} was never written by savegame (corrupt)")
    if version > FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{where}: format version {version} is not supported by this savegame (reads up to "
            f"{FORMAT_VERSION}); upgrade savegame to read it"
        )
    if body.get("hash_algorithm") != ALGORITHM:
        raise UnsupportedFormatError(f"{where}: unknown hash algorithm {str(body.get('hash_algorithm'))[:40]!r}")
    chunk = _parse_chunk(body.get("hash_chunk_bytes"), where) if version >= 3 else None
    created = _parse_time(body.get("created"), where)
    versions = body.get("versions")
    if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
        raise InvalidManifestError(f"{where}: versions must map names to strings")
    files = _parse_files(body.get("files"), where)
    items = _parse_items(body.get("items"), files, where, version)
    raw_metadata = body.get("metadata")
    raw_progress = body.get("progress")
    metadata = _decode_field(raw_metadata, "metadata", where) if raw_metadata is not None else {}
    if not isinstance(metadata, dict):
        raise InvalidManifestError(f"{where}: metadata must be a dict")
    progress = _decode_field(raw_progress, "progress", where) if raw_progress is not None else None
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
        hash_chunk_bytes=chunk,
        raw_metadata=raw_metadata,
        raw_progress=raw_progress,
    )


def _parse_chunk(value: object, where: str) -> int:
    if type(value) is not int or not MIN_CHUNK_BYTES <= value <= MAX_CHUNK_BYTES or value & (value - 1):
        raise InvalidManifestError(
            f"{where}: hash_chunk_bytes must be a power of two from {MIN_CHUNK_BYTES} to {MAX_CHUNK_BYTES}, "
            f"not {str(value)[:40]}"
        )
    return value


def _check_format_1(body: dict[str, Any], stored_hash: str, data: bytes, where: str) -> None:
    """Format 1's checks: the hash of the content's canonical compact JSON, then the bytes must be exactly
    the serialization of that content (another indentation or key order is an edit the hash cannot see)."""
    try:
        actual = hash_bytes(_canonical(body))
    except ValueError as exc:  # a value JSON cannot hold exactly; not written by savegame
        raise InvalidManifestError(f"{where}: manifest holds an invalid value ({str(exc)[:200]})") from None
    if actual != stored_hash:
        raise HashMismatchError(f"{where}: manifest content does not match its manifest_hash (edited or corrupted)")
    if _serialize({**body, "manifest_hash": stored_hash}) != data:
        raise HashMismatchError(f"{where}: manifest bytes are not in canonical form (edited or corrupted)")


def _decode_field(node: Any, name: str, where: str) -> Any:
    try:
        return decode_plain(node)
    except InvalidManifestError as exc:
        raise InvalidManifestError(f"{where}: {name}: {exc}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_parse_float, parse_int=_parse_int)
"""The manifest's JSON decoder, built once (``json.loads`` with hooks builds one per call); stateless."""


def _parse_time(value: object, where: str) -> _dt.datetime:
    if not isinstance(value, str) or len(value) > 40:
        raise InvalidManifestError(f"{where}: created must be an ISO-8601 UTC time string")
    try:
        if not _CREATED.fullmatch(value):
            raise ValueError(value)
        return _dt.datetime.fromisoformat(value[:-1]).replace(tzinfo=_dt.timezone.utc)
    except ValueError:
        raise InvalidManifestError(f"{where}: created {value!r} is not an ISO-8601 UTC time") from None


def _parse_files(value: object, where: str) -> dict[str, FileEntry]:
    if not isinstance(value, dict) or len(value) > MAX_ITEMS:
        raise InvalidManifestError(f"{where}: files must be an object of at most {MAX_ITEMS} entries")
    files = {}
    for name, entry in value.items():
        if not isinstance(name, str) or not _FILE_NAME.fullmatch(name) or name == "manifest.json":
            raise InvalidManifestError(f"{where}: invalid file name {name[:80]!r} (no paths or hidden names)")
        if not isinstance(entry, dict):
            raise InvalidManifestError(f"{where}: files[{name!r}] must be an object")
        size, digest = entry.get("bytes"), entry.get("hash")
        if type(size) is not int or not 0 <= size < 2**62:
            raise InvalidManifestError(f"{where}: files[{name!r}].bytes must be a non-negative integer")
        if not isinstance(digest, str) or len(digest) != HEX_LENGTH or not _HEX.fullmatch(digest):
            raise InvalidManifestError(f"{where}: files[{name!r}].hash must be {HEX_LENGTH} hex digits")
        files[name] = FileEntry(bytes=size, hash=digest)
    return files


def _parse_items(value: object, files: Mapping[str, FileEntry], where: str, version: int) -> dict[str, ItemEntry]:
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
        label = f"{where}: items[{name[:80]!r}]"
        if version < FORMAT_VERSION and ("linked" in entry or "array_hashes" in entry):
            raise InvalidManifestError(
                f"{label} has fields of format version {FORMAT_VERSION} in a version {version} manifest"
            )
        linked = _parse_linked(entry.get("linked", {}), file, files, label)
        hashes = _parse_array_hashes(entry.get("array_hashes"), label)
        items[name] = ItemEntry(kind=kind, file=file, skeleton=entry["skeleton"], linked=linked, array_hashes=hashes)
    return items


MAX_LINKED_FILES = 64
"""Most files an item's arrays may be spread over besides its own (a hostile manifest is refused)."""


def _parse_linked(
    value: object, file: str | None, files: Mapping[str, FileEntry], label: str
) -> dict[str, tuple[str, ...]]:
    """An item's ``linked`` field: other files of *this* checkpoint (listed in ``files``, never its own
    file, never a path), each with the distinct array keys it holds for the item, no key in two files."""
    if not isinstance(value, dict) or len(value) > MAX_LINKED_FILES:
        raise InvalidManifestError(f"{label}.linked must be an object of at most {MAX_LINKED_FILES} files")
    if value and file is None:
        raise InvalidManifestError(f"{label}.linked needs the item's own file")
    linked: dict[str, tuple[str, ...]] = {}
    seen: set[str] = set()
    for other, keys in value.items():
        if other == file or other not in files:
            raise InvalidManifestError(f"{label}.linked file {str(other)[:80]!r} is not another file listed in files")
        if not isinstance(keys, list) or not keys or not all(type(k) is str for k in keys):
            raise InvalidManifestError(f"{label}.linked[{other[:80]!r}] must be a non-empty list of array keys")
        if len(set(keys)) != len(keys) or seen.intersection(keys):
            raise InvalidManifestError(f"{label}.linked[{other[:80]!r}] repeats an array key")
        seen.update(keys)
        linked[other] = tuple(keys)
    return linked


def _parse_array_hashes(value: object, label: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        type(d) is str and len(d) == HEX_LENGTH and _HEX.fullmatch(d) for d in value.values()
    ):
        raise InvalidManifestError(f"{label}.array_hashes must map array keys to {HEX_LENGTH} hex digits")
    return value
