"""manifest.json: exact round trip, canonical bytes, version handling and validation of every field."""

from __future__ import annotations

import datetime as dt
import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import savegame
from savegame.errors import (
    CorruptCheckpointError,
    HashMismatchError,
    InvalidManifestError,
    UnsupportedFormatError,
)
from savegame.format import manifest as M
from savegame.format.hashing import hash_bytes
from savegame.format.manifest import FileEntry, ItemEntry, dump_manifest, parse_manifest
from savegame.format.tree import encode_plain

WHERE = "/ckpt/manifest.json"
CREATED = dt.datetime(2026, 11, 22, 7, 31, 59, 123456, tzinfo=dt.timezone.utc)
METADATA = {
    "run": "exp-1",
    "lr": 0.001,
    "neg_zero": -0.0,
    "nan": float("nan"),
    "inf": float("-inf"),
    "big": 2**100,
    "blob": b"\x00\xffpickle?",
    "shape": (3, 4),
    "by_epoch": {1: 0.5, 2: 0.25},
    "none": None,
    "flag": True,
    "unicode": "épsilon ✓",
}


def _dump(**overrides: Any) -> bytes:
    args: dict[str, Any] = {
        "created": CREATED,
        "versions": {"savegame": "0.1.0", "python": "3.11"},
        "metadata": encode_plain(METADATA, "metadata"),
        "progress": encode_plain({"epoch": 3, "step": 1200}, "progress"),
        "files": {"model.safetensors": FileEntry(bytes=496, hash="a" * 32)},
        "items": {
            "model": ItemEntry(kind="torch.nn.Module", file="model.safetensors",
                               skeleton={"w": {"$": "tensor", "key": "w"}}),
            "epoch": ItemEntry(kind="data", file=None, skeleton=3),
        },
    }
    args.update(overrides)
    return dump_manifest(**args)


def _sign(body: dict[str, Any]) -> bytes:
    """Serialize ``body`` the way savegame does, with a fresh manifest_hash over its bytes."""
    return M.sign_manifest(body)


def _sign_format_1(body: dict[str, Any]) -> bytes:
    """Serialize ``body`` as format 1 did: manifest_hash over the canonical JSON of the content."""
    body = {k: v for k, v in body.items() if k != "manifest_hash"}
    body["format_version"] = 1
    body["manifest_hash"] = hash_bytes(M._canonical(body))
    return M._serialize(body)


def _body() -> dict[str, Any]:
    body: dict[str, Any] = json.loads(_dump())
    return body


def _same(a: Any, b: Any) -> bool:
    """Equality that tells -0.0 from 0.0 and accepts nan == nan (same bits), and checks types."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack(">d", a) == struct.pack(">d", b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


# ---------------------------------------------------------------------------------------------------
# Round trip and canonical form


def test_dump_parse_round_trip() -> None:
    data = _dump()
    m = parse_manifest(data, WHERE)
    assert m.format_version == M.PLAIN_FORMAT_VERSION == 3  # no fields of format 4: still readable by 3
    assert M.FORMAT_VERSION == savegame.FORMAT_VERSION == 4
    assert m.created == CREATED
    assert dict(m.versions) == {"savegame": "0.1.0", "python": "3.11"}
    assert _same(dict(m.metadata), METADATA)
    assert m.progress == {"epoch": 3, "step": 1200}
    assert m.files == {"model.safetensors": FileEntry(bytes=496, hash="a" * 32)}
    assert m.items["model"] == ItemEntry("torch.nn.Module", "model.safetensors", {"w": {"$": "tensor", "key": "w"}})
    assert m.items["epoch"] == ItemEntry("data", None, 3)
    assert m.total_bytes == 496
    assert list(m.items) == ["model", "epoch"]  # order kept


def test_dump_is_deterministic_canonical_and_self_hashed() -> None:
    data = _dump()
    assert data == _dump()
    assert data.endswith(b"\n") and data.isascii()
    body = json.loads(data)
    assert M._serialize(body) == data
    assert body["format_version"] == M.PLAIN_FORMAT_VERSION == 3
    assert body["hash_chunk_bytes"] == savegame.format.hashing.HASH_CHUNK_BYTES
    assert list(body)[-1] == "manifest_hash"
    stored = body.pop("manifest_hash")
    # Since format 2: the hash covers every byte of the file before its own hex digits (which end the file).
    assert data.endswith(f'"manifest_hash": "{stored}"\n}}\n'.encode())
    assert stored == hash_bytes(data[: len(data) - len(stored) - len(b'"\n}\n')])
    assert len(stored) == 32 and int(stored, 16) >= 0
    assert _sign(body) == data


def test_saved_manifest_round_trips(tmp_path: Path) -> None:
    saved = savegame.save(tmp_path / "ckpt", {"x": np.arange(4.0), "epoch": 7}, metadata=METADATA)
    read = savegame.read_manifest(tmp_path / "ckpt")
    assert read.created == saved.created and read.files == saved.files and read.items == saved.items
    assert _same(dict(read.metadata), METADATA)
    raw = (tmp_path / "ckpt" / "manifest.json").read_bytes()
    assert M._serialize(json.loads(raw)) == raw


NON_CANONICAL: dict[str, Callable[[bytes], bytes]] = {
    "indent 2": lambda d: json.dumps(json.loads(d), indent=2).encode() + b"\n",
    "compact": lambda d: json.dumps(json.loads(d), separators=(",", ":")).encode(),
    "sorted keys": lambda d: json.dumps(json.loads(d), indent=1, sort_keys=True).encode() + b"\n",
    "no final newline": lambda d: d[:-1],
    "two final newlines": lambda d: d + b"\n",
    "CRLF": lambda d: d.replace(b"\n", b"\r\n"),
    "leading space": lambda d: b" " + d,
    "raw UTF-8 instead of escapes": lambda d: json.dumps(json.loads(d), indent=1, ensure_ascii=False).encode() + b"\n",
    "escaped letter": lambda d: d.replace(b'"savegame"', b'"save\\u0067ame"', 1),
}


@pytest.mark.parametrize("case", list(NON_CANONICAL))
@pytest.mark.parametrize("version", [1, 3])
def test_same_content_in_other_bytes_is_rejected(case: str, version: int) -> None:
    data = _dump() if version == 3 else _sign_format_1(json.loads(_dump()))
    assert parse_manifest(data, WHERE).format_version == version
    other = NON_CANONICAL[case](data)
    assert other != data and json.loads(other) == json.loads(data)
    # Formats 2 and 3 hash the bytes; format 1 hashed the content and required the canonical bytes.
    with pytest.raises(HashMismatchError, match="manifest_hash" if version == 3 else "canonical") as info:
        parse_manifest(other, WHERE)
    assert WHERE in str(info.value)


def test_format_1_is_still_read() -> None:
    body = json.loads(_dump())
    old = parse_manifest(_sign_format_1(body), WHERE)
    new = parse_manifest(_dump(), WHERE)
    assert old.format_version == 1 and new.format_version == M.PLAIN_FORMAT_VERSION
    assert (old.created, old.files, old.items, old.progress) == (new.created, new.files, new.items, new.progress)
    with pytest.raises(HashMismatchError, match="manifest_hash"):
        parse_manifest(_sign_format_1(body).replace(b'"step": 1200', b'"step": 1201'), WHERE)
    # A newer file whose version digit was damaged into 1 is checked the format-1 way: a mismatch.
    with pytest.raises(HashMismatchError):
        parse_manifest(_dump().replace(b'"format_version": 3', b'"format_version": 1'), WHERE)


def test_saved_checkpoint_with_a_format_1_manifest_loads(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    savegame.save(tmp_path / "ckpt", {"model": model, "epoch": 4})
    manifest = tmp_path / "ckpt" / "manifest.json"
    manifest.write_bytes(_sign_format_1(json.loads(manifest.read_bytes())))
    assert savegame.verify(tmp_path / "ckpt").format_version == 1
    fresh = torch.nn.Linear(3, 2)
    report = savegame.load(tmp_path / "ckpt", {"model": fresh})
    assert report.state == {"epoch": 4}
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)


def _as_format_2(body: dict[str, Any]) -> bytes:
    """A manifest as format 2 wrote it: no hash_chunk_bytes (every file hashed whole)."""
    body = {k: v for k, v in body.items() if k not in ("manifest_hash", "hash_chunk_bytes")}
    body["format_version"] = 2
    return _sign(body)


def test_format_2_is_still_read_with_whole_file_hashes(tmp_path: Path) -> None:
    m = parse_manifest(_as_format_2(json.loads(_dump())), WHERE)
    assert m.format_version == 2 and m.hash_chunk_bytes is None
    assert parse_manifest(_dump(), WHERE).hash_chunk_bytes == savegame.format.hashing.HASH_CHUNK_BYTES
    model = torch.nn.Linear(3, 2)
    savegame.save(tmp_path / "ckpt", {"model": model, "epoch": 4})
    manifest = tmp_path / "ckpt" / "manifest.json"
    manifest.write_bytes(_as_format_2(json.loads(manifest.read_bytes())))  # files under one chunk: same hashes
    assert savegame.verify(tmp_path / "ckpt").format_version == 2
    fresh = torch.nn.Linear(3, 2)
    assert savegame.load(tmp_path / "ckpt", {"model": fresh}).state == {"epoch": 4}
    assert torch.equal(fresh.weight, model.weight)


@pytest.mark.parametrize("chunk", [None, "67108864", 67108864.0, True, 0, 1 << 19, 3 << 20, 1 << 41, -(1 << 20)])
def test_invalid_hash_chunk_bytes(chunk: Any) -> None:
    body = _body()
    body["hash_chunk_bytes"] = chunk
    if chunk is None:
        del body["hash_chunk_bytes"]
    with pytest.raises(InvalidManifestError, match="hash_chunk_bytes") as info:
        parse_manifest(_sign(body), WHERE)
    assert WHERE in str(info.value)


def test_content_edit_is_a_hash_mismatch() -> None:
    data = _dump()
    with pytest.raises(HashMismatchError, match="manifest_hash") as info:
        parse_manifest(data.replace(b'"step": 1200', b'"step": 1201'), WHERE)
    assert WHERE in str(info.value)
    with pytest.raises(HashMismatchError):
        parse_manifest(data.replace(b'"bytes": 496', b'"bytes": 497'), WHERE)


# ---------------------------------------------------------------------------------------------------
# Versions


@pytest.mark.parametrize("version", [M.FORMAT_VERSION + 1, M.FORMAT_VERSION + 2, 10**9])
def test_newer_format_version(version: int) -> None:
    body = _body()
    body["format_version"] = version
    body["items"] = {"something": "new"}  # a newer format may change anything but the envelope
    with pytest.raises(UnsupportedFormatError) as info:
        parse_manifest(_sign(body), WHERE)
    assert WHERE in str(info.value) and f"version {version}" in str(info.value)
    assert not isinstance(info.value, CorruptCheckpointError)


@pytest.mark.parametrize("version", ["1", 1.0, True, None, [1]])
def test_format_version_of_the_wrong_type(version: Any) -> None:
    body = _body()
    body["format_version"] = version
    with pytest.raises(InvalidManifestError, match="format_version"):
        parse_manifest(_sign(body), WHERE)


def test_format_version_missing() -> None:
    body = _body()
    del body["format_version"]
    with pytest.raises(InvalidManifestError, match="format_version"):
        parse_manifest(_sign(body), WHERE)


@pytest.mark.parametrize("version", [0, -1])
def test_format_version_below_one_is_invalid(version: int) -> None:
    body = _body()
    body["format_version"] = version
    with pytest.raises(InvalidManifestError):
        parse_manifest(_sign(body), WHERE)


def test_unknown_hash_algorithm() -> None:
    body = _body()
    body["hash_algorithm"] = "sha256"
    with pytest.raises(UnsupportedFormatError, match="sha256"):
        parse_manifest(_sign(body), WHERE)


# ---------------------------------------------------------------------------------------------------
# Field validation (re-signed, so the field check is what fires)


def _files(body: dict[str, Any]) -> dict[str, Any]:
    files: dict[str, Any] = body["files"]
    return files


def _rename_file(body: dict[str, Any], name: str) -> None:
    body["files"][name] = body["files"].pop("model.safetensors")
    body["items"]["model"]["file"] = name


INVALID: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "format missing": (lambda b: b.pop("format"), "not a savegame manifest"),
    "format other": (lambda b: b.update(format="safetensors"), "not a savegame manifest"),
    "manifest_hash missing": (lambda b: None, "manifest_hash"),  # handled in the test
    "created missing": (lambda b: b.pop("created"), "created"),
    "created not UTC ISO": (lambda b: b.update(created="2026-11-22 07:31:59"), "created"),
    "created a number": (lambda b: b.update(created=1700000000), "created"),
    "created very long": (lambda b: b.update(created="2026-11-22T07:31:59.123456Z" + " " * 100), "created"),
    "versions not a dict": (lambda b: b.update(versions=["0.1.0"]), "versions"),
    "version not a string": (lambda b: b["versions"].update(torch=2), "versions"),
    "files not a dict": (lambda b: b.update(files=[]), "files"),
    "file entry not a dict": (lambda b: _files(b).update({"model.safetensors": [496, "a" * 32]}), "files["),
    "file bytes missing": (lambda b: _files(b)["model.safetensors"].pop("bytes"), "bytes"),
    "file bytes negative": (lambda b: _files(b)["model.safetensors"].update(bytes=-1), "bytes"),
    "file bytes 2**62": (lambda b: _files(b)["model.safetensors"].update(bytes=2**62), "beyond 2**53"),
    "file bytes 10**300": (lambda b: _files(b)["model.safetensors"].update(bytes=10**300), "beyond 2**53"),
    "file bytes float": (lambda b: _files(b)["model.safetensors"].update(bytes=496.0), "bytes"),
    "file bytes string": (lambda b: _files(b)["model.safetensors"].update(bytes="496"), "bytes"),
    "file bytes bool": (lambda b: _files(b)["model.safetensors"].update(bytes=True), "bytes"),
    "file hash short": (lambda b: _files(b)["model.safetensors"].update(hash="a" * 31), "hash"),
    "file hash uppercase": (lambda b: _files(b)["model.safetensors"].update(hash="A" * 32), "hash"),
    "file hash not hex": (lambda b: _files(b)["model.safetensors"].update(hash="g" * 32), "hash"),
    "file hash null": (lambda b: _files(b)["model.safetensors"].update(hash=None), "hash"),
    "file name with ..": (lambda b: _rename_file(b, "../model.safetensors"), "invalid file name"),
    "file name absolute": (lambda b: _rename_file(b, "/etc/passwd"), "invalid file name"),
    "file name with slash": (lambda b: _rename_file(b, "sub/model.safetensors"), "invalid file name"),
    "file name with backslash": (lambda b: _rename_file(b, "..\\model.safetensors"), "invalid file name"),
    "file name hidden": (lambda b: _rename_file(b, ".model.safetensors"), "invalid file name"),
    "file name empty": (lambda b: _rename_file(b, ""), "invalid file name"),
    "file name NUL": (lambda b: _rename_file(b, "model\0.safetensors"), "invalid file name"),
    "file name too long": (lambda b: _rename_file(b, "m" * 300), "invalid file name"),
    "file name is the manifest": (lambda b: _rename_file(b, "manifest.json"), "invalid file name"),
    "items not a dict": (lambda b: b.update(items=[["model", {}]]), "items"),
    "item not a dict": (lambda b: b["items"].update(model="model.safetensors"), "items["),
    "item kind missing": (lambda b: b["items"]["model"].pop("kind"), "kind"),
    "item kind too long": (lambda b: b["items"]["model"].update(kind="k" * 201), "kind"),
    "item file not listed": (lambda b: b["items"]["model"].update(file="other.safetensors"), "not listed"),
    "item file not a string": (lambda b: b["items"]["model"].update(file=7), "not listed"),
    "item skeleton missing": (lambda b: b["items"]["model"].pop("skeleton"), "skeleton"),
    "item name too long": (lambda b: b["items"].update({"i" * 1025: {"kind": "data", "file": None, "skeleton": 1}}),
                           "item name"),
    "metadata a list": (lambda b: b.update(metadata=[1, 2]), "metadata"),
    "metadata a string": (lambda b: b.update(metadata="x"), "metadata"),
    "metadata with an array node": (lambda b: b.update(metadata={"a": {"$": "ndarray", "key": "a"}}), "arrays"),
    "metadata with an unknown tag": (lambda b: b.update(metadata={"a": {"$": "pickle", "v": "gASV"}}), "tag"),
    "metadata with bad base64": (lambda b: b.update(metadata={"a": {"$": "bytes", "v": "!!"}}), "base64"),
    "metadata with bad float bits": (lambda b: b.update(metadata={"a": {"$": "float", "bits": "7ff8"}}), "float"),
    "metadata with a 5000-digit int": (lambda b: b.update(metadata={"a": {"$": "int", "v": "9" * 5000}}), "big int"),
    "metadata with a non-numeric int": (lambda b: b.update(metadata={"a": {"$": "int", "v": "12a"}}), "big int"),
    "metadata with a sign-only int": (lambda b: b.update(metadata={"a": {"$": "int", "v": "-"}}), "big int"),
    "metadata with an underscored int": (lambda b: b.update(metadata={"a": {"$": "int", "v": "1_000"}}), "big int"),
    "metadata nested 300 deep": (lambda b: b.update(metadata={"a": json.loads("[" * 300 + "]" * 300)}), "deeper"),
    "progress a list": (lambda b: b.update(progress=[3]), "progress"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_field(case: str) -> None:
    body = _body()
    mutate, needle = INVALID[case]
    mutate(body)
    data = _sign(body)
    if case == "manifest_hash missing":
        data = M._serialize({k: v for k, v in json.loads(data).items() if k != "manifest_hash"})
    with pytest.raises(InvalidManifestError) as info:
        parse_manifest(data, WHERE)
    assert needle in str(info.value)
    if "metadata" not in case:  # metadata errors name the key path instead
        assert WHERE in str(info.value)


NOT_A_MANIFEST: dict[str, bytes] = {
    "empty": b"",
    "not UTF-8": b'{"format": "savegame\xff"}',
    "not JSON": b"format = 'savegame'",
    "a list": b"[1, 2]\n",
    "a string": b'"savegame"',
    "NaN constant": b'{"format": "savegame", "format_version": NaN}',
    "Infinity constant": b'{"format": "savegame", "format_version": 1, "x": -Infinity}',
    "nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
    "a million-digit int": b'{"format": "savegame", "format_version": ' + b"1" * 10**6 + b"}",
    "a pickle": b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.",
}


@pytest.mark.parametrize("case", list(NOT_A_MANIFEST))
def test_not_a_manifest(case: str) -> None:
    with pytest.raises(InvalidManifestError) as info:
        parse_manifest(NOT_A_MANIFEST[case], WHERE)
    assert WHERE in str(info.value)


def test_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _dump()
    monkeypatch.setattr(M, "MAX_MANIFEST_BYTES", len(data) - 1)
    with pytest.raises(InvalidManifestError, match="exceeds"):
        parse_manifest(data, WHERE)
    monkeypatch.setattr(M, "MAX_MANIFEST_BYTES", len(data))
    parse_manifest(data, WHERE)


def test_manifest_hash_wrong_type_or_value() -> None:
    body = _body()
    body["manifest_hash"] = 12345
    with pytest.raises(InvalidManifestError, match="manifest_hash"):
        parse_manifest(M._serialize(body), WHERE)
    body["manifest_hash"] = "0" * 32
    with pytest.raises(HashMismatchError):
        parse_manifest(M._serialize(body), WHERE)


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"1e999999"])
def test_out_of_range_float_is_an_invalid_manifest(number: bytes) -> None:
    data = _dump().replace(b'"lr": 0.001', b'"lr": ' + number)
    with pytest.raises(CorruptCheckpointError) as info:
        parse_manifest(data, WHERE)
    assert WHERE in str(info.value)


def test_file_name_with_trailing_newline_is_invalid() -> None:
    body = _body()
    _rename_file(body, "model.safetensors\n")
    with pytest.raises(InvalidManifestError, match="invalid file name"):
        parse_manifest(_sign(body), WHERE)


@pytest.mark.parametrize("digits", ["--5", "²"])
def test_malformed_big_int_is_an_invalid_manifest(digits: str) -> None:
    body = _body()
    body["metadata"] = {"a": {"$": "int", "v": digits}}
    with pytest.raises(InvalidManifestError, match="big int"):
        parse_manifest(_sign(body), WHERE)


def test_nan_and_negative_zero_survive_exactly() -> None:
    payload = struct.unpack(">d", bytes.fromhex("7ff8000000000123"))[0]
    m = parse_manifest(_dump(metadata=encode_plain({"x": payload, "z": -0.0}, "metadata")), WHERE)
    assert struct.pack(">d", m.metadata["x"]).hex() == "7ff8000000000123"
    assert math.copysign(1.0, m.metadata["z"]) == -1.0


@pytest.mark.parametrize("field", ["metrics", "timing", "best", "epoch"])
def test_a_huge_integer_anywhere_in_a_manifest_is_invalid_not_a_crash(tmp_path: Path, field: str) -> None:
    """A re-signed manifest with ``10**400`` in its progress crashed every CLI command ("internal error:
    OverflowError") and made Checkpointer.restore raise a bare OverflowError, so training could not resume.
    savegame never writes a JSON integer beyond 2**53: the manifest is invalid, and resume falls back."""
    import torch

    from savegame import Checkpointer, ResumeWarning
    from savegame.errors import InvalidManifestError

    model = torch.nn.Linear(2, 2)
    with Checkpointer(tmp_path, monitor="val_loss", name="e{epoch}") as ckpt:
        for epoch in (1, 2):
            ckpt.step({"model": model}, epoch=epoch, metrics={"val_loss": 1.0 / epoch})
    path = tmp_path / "e2" / "manifest.json"
    body = json.loads(path.read_bytes())
    huge = 10**400
    if field == "metrics":
        body["progress"]["metrics"]["val_loss"] = huge
    elif field == "timing":
        body["progress"]["timing"]["saves"] = huge
    elif field == "best":
        body["progress"]["best"]["value"] = huge
    else:
        body["progress"]["epoch"] = huge
    path.write_bytes(M.sign_manifest(body))
    with pytest.raises(InvalidManifestError, match="beyond 2\\*\\*53"):
        M.parse_manifest(path.read_bytes(), str(path))
    with Checkpointer(tmp_path, monitor="val_loss") as ckpt, pytest.warns(ResumeWarning, match="e2"):
        assert ckpt.restore({"model": model}).name == "e1"
