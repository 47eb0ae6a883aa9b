"""Bad input: every kind of damaged, forged or foreign checkpoint raises its own CheckpointError subclass.

Real checkpoints of trained torch models are written to real files and then damaged. Where a check sits
behind the hash check, the manifest is re-signed (the ``resign`` fixture) so the check under test fires.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame
from savegame.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    HashMismatchError,
    InvalidManifestError,
    InvalidTensorFileError,
    MissingFileError,
    NotACheckpointError,
    TruncatedFileError,
    UnsupportedFormatError,
)
from savegame.format.manifest import MAX_MANIFEST_BYTES
from savegame.format.tensorfile import MAX_HEADER_BYTES
from savegame.storage.local import LocalStorage

Helper = Callable[..., Any]


def _all_readers(path: Path) -> list[tuple[str, Callable[[], Any]]]:
    """Every public way of reading a checkpoint: each must reject the same bad input."""
    return [
        ("verify", lambda: savegame.verify(path)),
        ("load", lambda: savegame.load(path)),
        ("load(verify=False)", lambda: savegame.load(path, verify=False)),
    ]


def _expect(exc_type: Any, fn: Callable[[], Any], *needles: str) -> BaseException:
    with pytest.raises(exc_type) as info:
        fn()
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in error message {message!r}"
    assert isinstance(info.value, CheckpointError)
    return info.value


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file())


def _header(file: Path) -> tuple[dict[str, Any], bytes]:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_tensor_file(file: Path, header: Any, data: bytes, *, header_bytes: bytes | None = None) -> None:
    raw = header_bytes if header_bytes is not None else json.dumps(header).encode()
    raw += b" " * ((-(8 + len(raw))) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


# ---------------------------------------------------------------------------------------------------
# Paths that are not checkpoints


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "ckpt"
    for fn in (savegame.load, savegame.verify, savegame.read_manifest):
        err = _expect(CheckpointNotFoundError, lambda fn=fn: fn(missing), str(missing))
        assert isinstance(err, FileNotFoundError)


def test_directory_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"w": torch.ones(3)}, other / "model.pt")
    (other / "notes.txt").write_text("hello")
    plain_file = tmp_path / "file.safetensors"
    plain_file.write_bytes(b"\0" * 64)
    manifest_dir = tmp_path / "manifest_is_a_dir"
    (manifest_dir / "manifest.json").mkdir(parents=True)
    for path in (empty, other, plain_file, manifest_dir):
        for fn in (savegame.load, savegame.verify, savegame.read_manifest):
            _expect(NotACheckpointError, lambda fn=fn, path=path: fn(path), str(path))


def test_leftover_staging_directory_is_invisible_to_load(small_checkpoint: Path) -> None:
    root = small_checkpoint.parent
    # A crashed writer's staging directory, complete with a valid-looking manifest: still not a checkpoint.
    staging = root / f".staging-{os.uname().nodename}-999999999-0123456789ab"
    shutil.copytree(small_checkpoint, staging)
    # A save that died before its manifest was written: data files, no manifest.
    half = root / "half"
    shutil.copytree(small_checkpoint, half)
    (half / "manifest.json").unlink()
    assert LocalStorage(root).committed() == ["ckpt"]
    for path in (staging, half):
        for fn in (savegame.load, savegame.verify, savegame.read_manifest):
            _expect(NotACheckpointError, lambda fn=fn, path=path: fn(path), str(path))
    assert savegame.load(small_checkpoint)["epoch"] == 3  # the committed one is unaffected


def test_manifest_from_a_newer_format(small_checkpoint: Path, resign: Helper) -> None:
    newer = savegame.FORMAT_VERSION + 1
    resign(small_checkpoint, lambda b: b.update(format_version=newer))
    manifest = str(small_checkpoint / "manifest.json")
    readers = [*_all_readers(small_checkpoint), ("read_manifest", lambda: savegame.read_manifest(small_checkpoint))]
    for name, fn in readers:
        err = _expect(UnsupportedFormatError, fn, manifest, f"version {newer}")
        assert not isinstance(err, CorruptCheckpointError), name


def test_manifest_with_impossible_old_format_version_is_corrupt(small_checkpoint: Path, resign: Helper) -> None:
    resign(small_checkpoint, lambda b: b.update(format_version=0))
    _expect(InvalidManifestError, lambda: savegame.verify(small_checkpoint), "manifest.json")


# ---------------------------------------------------------------------------------------------------
# Damaged files


def test_truncated_tensor_file_at_many_offsets(small_checkpoint: Path) -> None:
    for file in (small_checkpoint / "model.safetensors", small_checkpoint / "optimizer.safetensors"):
        original = file.read_bytes()
        for cut in sorted({0, 1, 7, 8, 9, 16, 100, len(original) // 2, len(original) - 8, len(original) - 1}):
            file.write_bytes(original[:cut])
            for _, fn in _all_readers(small_checkpoint):
                _expect(TruncatedFileError, fn, str(file), f"{cut} bytes")
        file.write_bytes(original + b"\0" * 8)  # longer than the manifest says
        for _, fn in _all_readers(small_checkpoint):
            _expect(TruncatedFileError, fn, str(file))
        file.write_bytes(original)
    savegame.verify(small_checkpoint)


def test_truncated_manifest_at_every_offset(small_checkpoint: Path) -> None:
    manifest = small_checkpoint / "manifest.json"
    original = manifest.read_bytes()
    escapes = []
    for cut in range(len(original) - 1, -1, -1):
        os.truncate(manifest, cut)  # shrinking in place: rewriting the file each time is much slower
        try:
            savegame.verify(small_checkpoint)
            escapes.append((cut, "verify passed"))
        except CorruptCheckpointError as exc:
            if str(manifest) not in str(exc):
                escapes.append((cut, str(exc)))
        except Exception as exc:
            escapes.append((cut, repr(exc)))
    assert not escapes, escapes[:10]
    manifest.write_bytes(original)
    savegame.verify(small_checkpoint)


def test_bit_flipped_tensor_file_is_a_hash_mismatch(small_checkpoint: Path, train: Helper) -> None:
    file = small_checkpoint / "optimizer.safetensors"
    original = file.read_bytes()
    positions = (0, 9, len(original) // 2, len(original) - 1)  # length prefix, header, data
    for pos, bit in [(p, b) for p in positions for b in range(8)][::3]:  # every bit, at every position
        damaged = bytearray(original)
        damaged[pos] ^= 1 << bit
        file.write_bytes(damaged)
        _expect(HashMismatchError, lambda: savegame.verify(small_checkpoint), str(file))
        _expect(HashMismatchError, lambda: savegame.load(small_checkpoint), str(file))
        target = dict(zip(("model", "optimizer"), train(steps=0)))
        _expect(HashMismatchError, lambda: savegame.load(small_checkpoint, target))  # noqa: B023


def test_damaged_checkpoint_leaves_the_target_untouched(small_checkpoint: Path, train: Helper) -> None:
    file = small_checkpoint / "optimizer.safetensors"
    damaged = bytearray(file.read_bytes())
    damaged[-1] ^= 0x01
    file.write_bytes(damaged)
    model, opt = train(steps=0, seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(HashMismatchError):
        savegame.load(small_checkpoint, {"model": model, "optimizer": opt})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_file(small_checkpoint: Path) -> None:
    file = small_checkpoint / "model.safetensors"
    original = file.read_bytes()
    file.unlink()
    for _, fn in _all_readers(small_checkpoint):
        _expect(MissingFileError, fn, str(file))
    file.mkdir()  # a directory where the file should be
    for _, fn in _all_readers(small_checkpoint):
        _expect(MissingFileError, fn, str(file))
    file.rmdir()
    elsewhere = small_checkpoint.parent / "elsewhere.safetensors"
    elsewhere.write_bytes(original)
    file.symlink_to(elsewhere)  # never follow links out of the checkpoint
    for _, fn in _all_readers(small_checkpoint):
        _expect(MissingFileError, fn, str(file))


def test_manifest_edited_without_resigning_is_a_hash_mismatch(small_checkpoint: Path) -> None:
    manifest = small_checkpoint / "manifest.json"
    original = manifest.read_bytes()
    manifest.write_bytes(original.replace(b'"lr": 0.01', b'"lr": 0.02'))
    for _, fn in _all_readers(small_checkpoint):
        _expect(HashMismatchError, fn, str(manifest))
    # Same content, re-indented: the hash covers the bytes, so this is an edit too.
    manifest.write_bytes(json.dumps(json.loads(original), indent=2).encode() + b"\n")
    for _, fn in _all_readers(small_checkpoint):
        _expect(HashMismatchError, fn, str(manifest), "manifest_hash")


def test_file_hash_entry_mismatch(small_checkpoint: Path, resign: Helper) -> None:
    file = small_checkpoint / "model.safetensors"
    resign(small_checkpoint, lambda b: b["files"]["model.safetensors"].update(hash="0" * 32))
    _expect(HashMismatchError, lambda: savegame.verify(small_checkpoint), str(file))
    _expect(HashMismatchError, lambda: savegame.load(small_checkpoint), str(file))
    assert set(savegame.load(small_checkpoint, verify=False)) == {"model", "optimizer", "epoch"}


def _flip_every_byte(path: Path, xors: tuple[int, ...]) -> list[tuple[str, int, int, str]]:
    """Flip every byte of every file of ``path`` with each of ``xors``, one at a time; return escapes."""
    escapes = []
    for file in _files(path):
        original = file.read_bytes()
        with open(file, "r+b") as f:
            for pos, byte in enumerate(original):
                for x in xors:
                    f.seek(pos)
                    f.write(bytes([byte ^ x]))
                    f.flush()
                    try:
                        savegame.verify(path)
                        escapes.append((file.name, pos, x, "verify passed"))
                    except CorruptCheckpointError:
                        pass
                    except Exception as exc:  # anything else is a finding too
                        escapes.append((file.name, pos, x, f"{type(exc).__name__}: {exc}"[:160]))
                f.seek(pos)
                f.write(bytes([byte]))
        assert file.read_bytes() == original
    savegame.verify(path)
    return escapes


def test_verify_detects_every_flipped_byte_in_every_file(small_checkpoint: Path) -> None:
    total = sum(f.stat().st_size for f in _files(small_checkpoint))
    assert total < 20_000
    escapes = _flip_every_byte(small_checkpoint, (0xFF,))
    assert not escapes, escapes[:20]


def test_verify_detects_every_single_bit_flip_in_tensor_files(small_checkpoint: Path) -> None:
    """Every byte, each of its 8 bits (a check that ignored a high bit, or the data past the header, would
    let that flip through)."""
    escapes = []
    for file in (small_checkpoint / "model.safetensors", small_checkpoint / "optimizer.safetensors"):
        original = file.read_bytes()
        with open(file, "r+b") as f:
            for pos, byte in enumerate(original):
                for x in (1 << bit for bit in range(8)):
                    f.seek(pos)
                    f.write(bytes([byte ^ x]))
                    f.flush()
                    try:
                        savegame.verify(small_checkpoint)
                        escapes.append((file.name, pos, x))
                    except HashMismatchError:
                        pass
                f.seek(pos)
                f.write(bytes([byte]))
    assert not escapes, escapes[:20]


def test_verify_detects_every_single_bit_flip_in_manifest(small_checkpoint: Path) -> None:
    manifest = small_checkpoint / "manifest.json"
    original = manifest.read_bytes()
    escapes = []
    with open(manifest, "r+b") as f:
        for pos, byte in enumerate(original):
            for x in (0x01, 0x02, 0x08):
                f.seek(pos)
                f.write(bytes([byte ^ x]))
                f.flush()
                try:
                    savegame.verify(small_checkpoint)
                    escapes.append((pos, x, "verify passed"))
                except CorruptCheckpointError:
                    pass
                except Exception as exc:
                    escapes.append((pos, x, f"{type(exc).__name__}: {exc}"[:160]))
            f.seek(pos)
            f.write(bytes([byte]))
    assert not escapes, escapes[:20]


def test_one_changed_byte_in_a_float_exponent_is_detected(small_checkpoint: Path) -> None:
    manifest = small_checkpoint / "manifest.json"
    original = manifest.read_bytes()
    assert original.count(b"1e-08") == 1  # Adam's eps in param_groups
    manifest.write_bytes(original.replace(b"1e-08", b"1e408"))  # one byte changed: '-' -> '4'
    _expect(CorruptCheckpointError, lambda: savegame.verify(small_checkpoint), str(manifest))


def test_zeroed_4k_pages(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 16))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    path = tmp_path / "big"
    savegame.save(path, {"model": model, "optimizer": opt})
    for file in _files(path):
        original = file.read_bytes()
        pages = range(0, len(original), 4096)
        assert file.name == "manifest.json" or len(pages) > 1
        for start in pages:
            damaged = bytearray(original)
            damaged[start : start + 4096] = bytes(len(damaged[start : start + 4096]))
            if damaged == original:
                continue
            file.write_bytes(damaged)
            expected = HashMismatchError if file.suffix == ".safetensors" else InvalidManifestError
            _expect(expected, lambda: savegame.verify(path), str(file))
            _expect(expected, lambda: savegame.load(path), str(file))
        file.write_bytes(original)
    savegame.verify(path)


def test_swapped_files_between_two_items(tmp_path: Path, train: Helper) -> None:
    model, opt = train()
    ema, _ = train(seed=1)  # same architecture: its file has exactly the same size
    path = tmp_path / "ckpt"
    savegame.save(path, {"model": model, "ema": ema, "optimizer": opt})
    a, b, o = path / "model.safetensors", path / "ema.safetensors", path / "optimizer.safetensors"
    assert a.stat().st_size == b.stat().st_size != o.stat().st_size
    data_a, data_b, data_o = a.read_bytes(), b.read_bytes(), o.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    for _, fn in _all_readers(path)[:2]:
        _expect(HashMismatchError, fn, str(path))
    a.write_bytes(data_o)
    o.write_bytes(data_a)
    for _, fn in _all_readers(path):
        _expect(TruncatedFileError, fn, str(path))
    a.write_bytes(data_a)
    o.write_bytes(data_o)
    # The same item's file from another save of the same model (one more training step).
    b.write_bytes(data_b)
    other = tmp_path / "other"
    opt.zero_grad()
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    savegame.save(other, {"model": model, "ema": ema, "optimizer": opt})
    shutil.copyfile(other / "model.safetensors", a)
    _expect(HashMismatchError, lambda: savegame.verify(path), str(a))


# ---------------------------------------------------------------------------------------------------
# Forged manifests (re-signed, so the hash check passes and the field checks fire)


def _deep_list(depth: int) -> list[Any]:
    root: list[Any] = []
    node = root
    for _ in range(depth):
        child: list[Any] = []
        node.append(child)
        node = child
    return root


def _skeleton(body: dict[str, Any]) -> dict[str, Any]:
    skel: dict[str, Any] = body["items"]["model"]["skeleton"]
    return skel


ABSURD_MANIFESTS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "file bytes 2**62": (lambda b: b["files"]["model.safetensors"].update(bytes=2**62), "bytes"),
    "file bytes negative": (lambda b: b["files"]["model.safetensors"].update(bytes=-1), "bytes"),
    "file bytes float": (lambda b: b["files"]["model.safetensors"].update(bytes=496.0), "bytes"),
    "file bytes bool": (lambda b: b["files"]["model.safetensors"].update(bytes=True), "bytes"),
    "file hash not hex": (lambda b: b["files"]["model.safetensors"].update(hash="z" * 32), "hash"),
    "file name escapes": (
        lambda b: (
            b["files"].update({"../../etc/passwd": b["files"].pop("model.safetensors")}),
            b["items"]["model"].update(file="../../etc/passwd"),
        ),
        "invalid file name",
    ),
    "file name absolute": (
        lambda b: (
            b["files"].update({"/etc/passwd": b["files"].pop("model.safetensors")}),
            b["items"]["model"].update(file="/etc/passwd"),
        ),
        "invalid file name",
    ),
    "file name hidden": (
        lambda b: (
            b["files"].update({".model": b["files"].pop("model.safetensors")}),
            b["items"]["model"].update(file=".model"),
        ),
        "invalid file name",
    ),
    "file is the manifest": (lambda b: b["files"].update({"manifest.json": {"bytes": 1, "hash": "0" * 32}}), ""),
    "item file not listed": (lambda b: b["items"]["model"].update(file="ghost.safetensors"), "ghost"),
    "item without skeleton": (lambda b: b["items"]["model"].pop("skeleton"), "skeleton"),
    "skeleton nested 1000 deep": (lambda b: _skeleton(b).update(deep=_deep_list(1000)), "nested deeper"),
    "metadata nested 1000 deep": (lambda b: b.update(metadata={"deep": _deep_list(1000)}), "nested deeper"),
    "skeleton unknown tag": (lambda b: _skeleton(b).update(x={"$": "pickle", "v": "gASV"}), "unknown skeleton tag"),
    "skeleton 10**5-digit int": (lambda b: _skeleton(b).update(x={"$": "int", "v": "9" * 100_000}), "big int"),
    "skeleton array not in file": (lambda b: _skeleton(b)["0.weight"].update(key="ghost"), "ghost"),
    "created not a time": (lambda b: b.update(created="yesterday"), "created"),
    "items not an object": (lambda b: b.update(items=[]), "items"),
    "metadata not a dict": (lambda b: b.update(metadata=[1, 2]), "metadata"),
}


@pytest.mark.parametrize("case", list(ABSURD_MANIFESTS))
def test_absurd_manifest_fields(small_checkpoint: Path, case: str, resign: Helper) -> None:
    mutate, needle = ABSURD_MANIFESTS[case]
    resign(small_checkpoint, mutate)
    for _, fn in _all_readers(small_checkpoint):
        _expect(InvalidManifestError, fn, needle)
    assert not (small_checkpoint / "ghost.safetensors").exists()


ABSURD_ARRAY_NODES: dict[str, Callable[[dict[str, Any]], None]] = {
    "logical shape [2**40, 2**40]": lambda n: n.update(dtype="complex128", shape=[2**40, 2**40]),
    "logical dtype object": lambda n: n.update(dtype="object", shape=[8, 4]),
    "logical dtype float128": lambda n: n.update(dtype="float128", shape=[8, 4]),
    "tensor as numpy scalar of shape [8, 4]": lambda n: n.update({"$": "npscalar"}),
}


@pytest.mark.parametrize("case", list(ABSURD_ARRAY_NODES))
def test_absurd_array_nodes_are_rejected_by_load(small_checkpoint: Path, case: str, resign: Helper) -> None:
    resign(small_checkpoint, lambda b: ABSURD_ARRAY_NODES[case](_skeleton(b)["0.weight"]))
    for _, fn in _all_readers(small_checkpoint)[1:]:
        _expect(CorruptCheckpointError, fn, "0.weight")


@pytest.mark.parametrize("case", ["logical dtype object", "logical dtype float128"])
def test_absurd_numpy_logical_dtype_is_a_manifest_error(tmp_path: Path, case: str, resign: Helper) -> None:
    path = tmp_path / "np"
    savegame.save(path, {"model": {"0.weight": torch.ones(8, 4).numpy()}})
    resign(path, lambda b: ABSURD_ARRAY_NODES[case](_skeleton(b)["0.weight"]))
    _expect(InvalidManifestError, lambda: savegame.load(path), "model.0.weight")


@pytest.mark.parametrize("case", list(ABSURD_ARRAY_NODES))
def test_verify_rejects_what_load_rejects(small_checkpoint: Path, case: str, resign: Helper) -> None:
    resign(small_checkpoint, lambda b: ABSURD_ARRAY_NODES[case](_skeleton(b)["0.weight"]))
    _expect(CorruptCheckpointError, lambda: savegame.verify(small_checkpoint))


# ---------------------------------------------------------------------------------------------------
# Tensor files whose header lies (file hash and size re-signed, so the header check is what fires)


def _lie(file: Path, how: str) -> None:
    header, data = _header(file)
    names = [k for k in header if k != "__metadata__"]
    last = max(names, key=lambda k: header[k]["data_offsets"][1])
    first = min(names, key=lambda k: header[k]["data_offsets"][0])
    if how == "shape disagrees with offsets":
        header[first]["shape"] = [d + 1 for d in header[first]["shape"]]
    elif how == "overlapping offsets":
        header[last]["data_offsets"] = [0, header[last]["data_offsets"][1] - header[last]["data_offsets"][0]]
    elif how == "gap":
        begin, end = header[last]["data_offsets"]
        header[last]["data_offsets"] = [begin + 8, end + 8]
        data += bytes(8)
    elif how == "trailing bytes":
        data += bytes(8)
    elif how == "unknown dtype":
        header[first]["dtype"] = "F128"
    elif how == "dtype is a python type":
        header[first]["dtype"] = "object"
    elif how == "negative dimension":
        header[first]["shape"] = [-1, *header[first]["shape"]]
    elif how == "header is a list":
        header = [header]
    elif how == "shape [2**40, 2**40]":
        header[first]["shape"] = [2**40, 2**40]
    else:
        raise AssertionError(how)
    _write_tensor_file(file, header, data)


LIES = [
    "shape disagrees with offsets",
    "overlapping offsets",
    "gap",
    "trailing bytes",
    "unknown dtype",
    "dtype is a python type",
    "negative dimension",
    "header is a list",
    "shape [2**40, 2**40]",
]


@pytest.mark.parametrize("how", LIES)
def test_tensor_file_header_lies(small_checkpoint: Path, how: str, resign: Helper, train: Helper) -> None:
    file = small_checkpoint / "model.safetensors"
    _lie(file, how)
    resign(small_checkpoint)
    for _, fn in _all_readers(small_checkpoint):
        _expect(InvalidTensorFileError, fn, str(file))
    model, opt = train(steps=0)
    _expect(InvalidTensorFileError, lambda: savegame.load(small_checkpoint, {"model": model, "optimizer": opt}))


def test_tensor_file_offsets_past_the_end(small_checkpoint: Path, resign: Helper) -> None:
    file = small_checkpoint / "model.safetensors"
    header, data = _header(file)
    last = max(header, key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin, end + 4]
    header[last]["shape"] = [(end + 4 - begin) // 4]
    _write_tensor_file(file, header, data)
    resign(small_checkpoint)
    for _, fn in _all_readers(small_checkpoint):
        # The file has exactly the size the manifest records; its header asks for more data than it holds.
        _expect((InvalidTensorFileError, TruncatedFileError), fn, str(file), "data bytes")


# ---------------------------------------------------------------------------------------------------
# Bounded time and memory: hostile sizes are rejected from their description, never allocated


def _bounded(fn: Callable[[], Any], exc_type: Any, *needles: str, max_mb: float = 40) -> None:
    tracemalloc.start()
    start = time.perf_counter()
    try:
        _expect(exc_type, fn, *needles)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - start
    assert peak < max_mb * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert elapsed < 10, f"{elapsed:.1f} s"


def test_header_claiming_length_2_to_the_60(small_checkpoint: Path, resign: Helper) -> None:
    file = small_checkpoint / "model.safetensors"
    with open(file, "r+b") as f:
        f.write(struct.pack("<Q", 2**60))
    resign(small_checkpoint)
    for _, fn in _all_readers(small_checkpoint):
        _bounded(fn, InvalidTensorFileError, str(file), str(2**60))


def test_header_claiming_a_larger_header_than_the_file(small_checkpoint: Path, resign: Helper) -> None:
    file = small_checkpoint / "model.safetensors"
    with open(file, "r+b") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES - 4096))  # under the header limit, far beyond this file
    resign(small_checkpoint)
    for _, fn in _all_readers(small_checkpoint):
        _bounded(fn, TruncatedFileError, str(file))


def test_header_claiming_shape_2_to_the_40_squared(small_checkpoint: Path, resign: Helper) -> None:
    file = small_checkpoint / "model.safetensors"
    _, data = _header(file)
    # A self-consistent header describing a 2**82-byte tensor, in a file of a few hundred bytes.
    _write_tensor_file(file, {"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 2**82]}}, data)
    resign(small_checkpoint)
    for _, fn in _all_readers(small_checkpoint):
        _bounded(fn, (InvalidTensorFileError, TruncatedFileError), str(file))


def test_tensor_header_nested_100000_deep_and_huge_integer(small_checkpoint: Path, resign: Helper) -> None:
    file = small_checkpoint / "model.safetensors"
    for raw in (b"[" * 100_000, b'{"w": {"dtype": "F32", "shape": [' + b"7" * 10**6 + b'], "data_offsets": [0, 4]}}'):
        _write_tensor_file(file, None, b"\0" * 4, header_bytes=raw)
        resign(small_checkpoint)
        for _, fn in _all_readers(small_checkpoint):
            _bounded(fn, InvalidTensorFileError, str(file))


def test_manifest_nested_100000_deep(small_checkpoint: Path) -> None:
    manifest = small_checkpoint / "manifest.json"
    manifest.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    for _, fn in _all_readers(small_checkpoint):
        _bounded(fn, InvalidManifestError, str(manifest), "nested too deeply")


def test_manifest_with_a_million_digit_integer(small_checkpoint: Path) -> None:
    manifest = small_checkpoint / "manifest.json"
    body = manifest.read_bytes()
    manifest.write_bytes(body.replace(b'"epoch": {', b'"n": ' + b"9" * 10**6 + b', "epoch": {', 1))
    assert manifest.stat().st_size > 10**6
    for _, fn in _all_readers(small_checkpoint):
        _bounded(fn, InvalidManifestError, str(manifest))


def test_manifest_claiming_a_300_mb_file(small_checkpoint: Path, resign: Helper) -> None:
    file = small_checkpoint / "optimizer.safetensors"
    resign(small_checkpoint, lambda b: b["files"]["optimizer.safetensors"].update(bytes=300 * 2**20))
    for _, fn in _all_readers(small_checkpoint):
        _bounded(fn, TruncatedFileError, str(file), str(300 * 2**20))


def test_manifest_larger_than_the_limit_is_not_read(small_checkpoint: Path) -> None:
    manifest = small_checkpoint / "manifest.json"
    with open(manifest, "r+b") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: costs no disk, would cost 512 MiB to read
    for _, fn in _all_readers(small_checkpoint):
        _bounded(fn, InvalidManifestError, str(manifest), "exceeds")
