"""Corrupted and hostile checkpoints, beyond tests/test_corruption.py, test_manifest.py, test_tensorfile.py
and test_no_pickle.py (which cover the named cases one by one): here the damage is swept exhaustively or
fuzzed, and every rejection is checked for bounded memory and time, with unpickling trapped.

* corruption sweeps: all 8 single-bit flips of every byte of the manifest and of every tensor-file
  header, a random sample of bit flips anywhere in a richer checkpoint, truncation at every offset,
  manifests swapped between saves -- 100% detected by ``verify``;
* hostile inputs: nesting depth swept up to the recursion limit, giant strings and keys, a size
  product that wraps around 2**64, duplicate header keys, names with ``../``, symlinks out of the root
  (checkpoint, manifest, debris that cleanup or delete would remove), FIFOs;
* fuzzing (hypothesis) of the manifest parser and the tensor-file header parser: only
  ``CheckpointError`` subclasses ever escape, and what is accepted is self-consistent.

``SAVEGAME_FUZZ_EXAMPLES`` sets the examples per fuzz test (200 by default, a short CI run).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import shutil
import signal
import struct
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import savegame
from crash import figures
from savegame.errors import (
    CheckpointError,
    CorruptCheckpointError,
    InvalidManifestError,
    InvalidNameError,
    InvalidTensorFileError,
    NotACheckpointError,
    TruncatedFileError,
)
from savegame.format import manifest as M
from savegame.format.hashing import hash_bytes
from savegame.format.manifest import parse_manifest
from savegame.format.tensorfile import HEADER_PARSE_FACTOR, ITEMSIZE, MAX_HEADER_BYTES, parse_header
from savegame.format.tree import Decoder
from savegame.storage.local import LocalStorage

FUZZ_EXAMPLES = int(os.environ.get("SAVEGAME_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------------
# Helpers


_CANARY: dict[str, Any] = {"armed": False, "events": []}
_WATCHED_EVENTS = ("pickle.find_class", "os.system", "os.exec", "os.posix_spawn", "subprocess.Popen", "ctypes.dlopen")


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _CANARY["armed"] and event in _WATCHED_EVENTS:
        _CANARY["events"].append((event, repr(args)[:200]))


sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only while a test here is running


@pytest.fixture(autouse=True)
def nothing_is_executed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The canary: an unpickler resolving any global (what every code-executing pickle must do), a shell,
    a new process or a loaded library during a test fails it; so do calls to the pickle-based loaders."""
    calls: list[str] = []

    def trap(name: str) -> Callable[..., Any]:
        def called(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} was called while reading a checkpoint")

        return called

    for module, attr in ((pickle, "loads"), (pickle, "load"), (torch, "load"), (np, "load")):
        monkeypatch.setattr(module, attr, trap(f"{module.__name__}.{attr}"))
    _CANARY["events"] = []
    _CANARY["armed"] = True
    try:
        yield
    finally:
        _CANARY["armed"] = False
    assert calls == [], f"code-executing loaders were called: {calls}"
    assert _CANARY["events"] == [], f"something was executed: {_CANARY['events']}"


def sign(body: dict[str, Any]) -> bytes:
    """Serialize a manifest body with a valid ``manifest_hash`` (a forger can always do this)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))  # deep test structures must serialize here
    try:
        return M.sign_manifest(body)
    finally:
        sys.setrecursionlimit(limit)


def bounded(fn: Callable[[], Any], *, max_bytes: int, max_seconds: float = 10.0) -> BaseException | None:
    """Run ``fn``; return what it raised (None if it returned). Fails past the memory or time budget."""
    tracemalloc.start()
    start = time.perf_counter()
    raised: BaseException | None = None
    try:
        fn()
    except BaseException as exc:
        raised = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    elapsed = time.perf_counter() - start
    assert peak <= max_bytes, f"peak {peak / 2**20:.1f} MiB > budget {max_bytes / 2**20:.1f} MiB"
    assert elapsed <= max_seconds, f"{elapsed:.1f} s"
    return raised


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file())


def _header_len(file: Path) -> int:
    (n,) = struct.unpack("<Q", file.read_bytes()[:8])
    return 8 + int(n)


@pytest.fixture
def small(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    path = tmp_path / "small"
    savegame.save(path, {"model": model, "optimizer": opt, "epoch": 1}, metadata={"run": "x"})
    return path


@pytest.fixture
def rich(tmp_path: Path) -> Path:
    """Many kinds of state: tied weights, bf16, bool, int64, numpy, big ints, bytes, nan, nested keys."""
    torch.manual_seed(1)
    emb = torch.nn.Embedding(50, 16)
    head = torch.nn.Linear(16, 50, bias=False)
    head.weight = emb.weight  # tied
    model = torch.nn.Sequential(emb, torch.nn.LayerNorm(16), head)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 50, (4, 3))).sum().backward()
    opt.step()
    extra = {
        "bf16": torch.randn(7, 5).to(torch.bfloat16),
        "mask": torch.rand(33) > 0.5,
        "ids": torch.arange(-9, 9, dtype=torch.int64),
        "np": np.linspace(0, 1, 101),
        "big": 2**100 + 7,
        "blob": b"\x00\x01pickle?",
        "nan": float("nan"),
        "by_step": {1: (2, 3.5), (4, "x"): None},
    }
    path = tmp_path / "rich"
    savegame.save(path, {"model": model, "optimizer": opt, "extra": extra}, metadata={"lr": 1e-3})
    return path


# ---------------------------------------------------------------------------------------------------
# Corruption sweeps: 100% detected


def _flip_bits(path: Path, file: Path, positions: Iterator[tuple[int, int]]) -> tuple[int, list[str], list[str]]:
    """Flip single bits of ``file`` (one at a time, restored after).

    Returns the number of flips, the escapes (verify passed, or raised something that is not a
    CheckpointError) and the misclassifications (a CheckpointError that is not a corruption error).
    """
    original = file.read_bytes()
    flips = 0
    escapes: list[str] = []
    misclassified: list[str] = []
    with open(file, "r+b") as f:
        for pos, bit in positions:
            f.seek(pos)
            f.write(bytes([original[pos] ^ (1 << bit)]))
            f.flush()
            flips += 1
            try:
                savegame.verify(path)
                escapes.append(f"{file.name}@{pos} bit {bit}: verify passed")
            except CorruptCheckpointError:
                pass
            except CheckpointError as exc:
                misclassified.append(f"{file.name}@{pos} bit {bit}: {type(exc).__name__}: {str(exc)[-90:]}")
            except Exception as exc:
                escapes.append(f"{file.name}@{pos} bit {bit}: {type(exc).__name__}: {exc}"[:200])
            f.seek(pos)
            f.write(original[pos : pos + 1])
    assert file.read_bytes() == original
    return flips, escapes, misclassified


def test_every_bit_of_every_manifest_and_header_byte(small: Path) -> None:
    flips = 0
    escapes: list[str] = []
    misclassified: list[str] = []
    for file in _files(small):
        end = file.stat().st_size if file.name == "manifest.json" else _header_len(file)
        n, e, m = _flip_bits(small, file, ((pos, bit) for pos in range(end) for bit in range(8)))
        flips += n
        escapes += e
        misclassified += m
    savegame.verify(small)
    figures.add("corruption", "bit flips (manifest and headers, exhaustive)", flips)
    assert not escapes, escapes[:20]
    # The hash covers the bytes and is checked before the version's meaning: a damaged version digit is
    # corruption, never "a newer format".
    assert not misclassified, misclassified[:20]


def test_random_bit_flips_anywhere(rich: Path) -> None:
    rng = random.Random(1234)
    files = _files(rich)
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    flips = 0
    escapes: list[str] = []
    for file, size in zip(files, sizes):
        count = max(20, 3000 * size // total)
        positions = ((rng.randrange(size), rng.randrange(8)) for _ in range(count))
        n, e, m = _flip_bits(rich, file, positions)
        flips += n
        escapes += e + m
    savegame.verify(rich)
    figures.add("corruption", "bit flips (random, anywhere)", flips)
    assert not escapes, escapes[:20]


def test_truncation_at_every_offset(rich: Path) -> None:
    cuts = 0
    for file in _files(rich):
        original = file.read_bytes()
        header = len(original) if file.name == "manifest.json" else _header_len(file)
        offsets = sorted(set(range(0, min(header + 64, len(original)))) | set(range(header, len(original), 61)))
        for cut in offsets:
            os.truncate(file, cut)
            with pytest.raises(CorruptCheckpointError):
                savegame.verify(rich)
            cuts += 1
        for extra in (1, 7, 8, 4096):
            file.write_bytes(original + bytes(extra))
            with pytest.raises(CorruptCheckpointError):
                savegame.verify(rich)
            cuts += 1
        file.write_bytes(original)
    savegame.verify(rich)
    figures.add("corruption", "truncations and extensions", cuts)


def test_manifest_swapped_with_another_save_of_the_same_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.Adam(model.parameters())
    paths = []
    for step in range(3):
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
        paths.append(tmp_path / f"step-{step}")
        savegame.save(paths[-1], {"model": model, "optimizer": opt, "step": step})
    manifests = [(p / "manifest.json").read_bytes() for p in paths]
    swaps = 0
    for i, path in enumerate(paths):
        for j, other in enumerate(manifests):
            if i == j:
                continue
            (path / "manifest.json").write_bytes(other)  # same sizes, other hashes: a stale manifest
            with pytest.raises(CorruptCheckpointError, match="hash"):
                savegame.verify(path)
            with pytest.raises(CorruptCheckpointError):
                savegame.load(path)
            swaps += 1
        (path / "manifest.json").write_bytes(manifests[i])
        savegame.verify(path)
    figures.add("corruption", "manifests swapped between saves", swaps)


# ---------------------------------------------------------------------------------------------------
# Hostile manifests (signed: the hash check passes, the validation behind it must hold)


def _deep(depth: int, leaf: Any = None) -> Any:
    node: Any = leaf
    for _ in range(depth):
        node = [node]
    return node


def _deep_dict(depth: int) -> Any:
    node: Any = 0
    for _ in range(depth):
        node = {"k": node}
    return node


def _valid_body(path: Path) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((path / "manifest.json").read_bytes())
    return body


def _json_depth_limit() -> int:
    """The deepest list ``json.loads`` accepts from about the stack depth ``parse_manifest`` runs at."""
    import json as _json

    low, high = 10, 100_000
    while low < high:
        mid = (low + high + 1) // 2
        try:
            _json.loads("[" * mid + "]" * mid)
            low = mid
        except RecursionError:
            high = mid - 1
    return low


@pytest.mark.parametrize("where", ["metadata", "skeleton"])
def test_nesting_swept_up_to_the_recursion_limit(small: Path, where: str) -> None:
    """Depths around the decoder's limit (200) and around the interpreter's recursion limit (where the
    JSON parser gives up), all signed so every check behind the hash runs: a CheckpointError, never a
    RecursionError or a crash. Far deeper ones (unsigned: the JSON parser is what must stop them) too."""
    base = _valid_body(small)
    limit = _json_depth_limit()
    signed = [*range(190, 215), 250, 400, 800, 1200, limit + 2]
    cases = [(d, make, True) for d in signed for make in (_deep, _deep_dict) if d < 1000 or make is _deep]
    cases += [(d, _deep, False) for d in (limit + 50, 10_000, 200_000)]
    outcomes: dict[str, int] = {}
    for depth, make, signed_ok in cases:
        body = json.loads(json.dumps(base))
        value = make(depth) if depth < 20_000 else None
        target = body.setdefault("metadata", {}) if where == "metadata" else body["items"]["epoch"]
        if signed_ok:
            target["x" if where == "metadata" else "skeleton"] = value
            data = sign(body)
        else:  # too deep to serialize here: splice the nesting into the JSON text
            target["x" if where == "metadata" else "skeleton"] = "@@"
            data = json.dumps(body).encode().replace(b'"@@"', b"[" * depth + b"]" * depth)
        raised = bounded(lambda data=data: parse_and_decode(data), max_bytes=16 * len(data) + (32 << 20))
        assert raised is None or isinstance(raised, CheckpointError), f"depth {depth}: {raised!r}"
        if depth > 205:
            assert raised is not None, f"depth {depth} accepted"
        kind = "accepted" if raised is None else type(raised).__name__
        outcomes[kind] = outcomes.get(kind, 0) + 1
    figures.add("hostile", "nesting depths (signed manifests)", len(cases))


def test_nesting_just_below_the_json_limit_is_a_checkpoint_error(small: Path) -> None:
    base = _valid_body(small)
    limit = _json_depth_limit()
    escapes = []
    for depth in range(limit - 8, limit + 1):
        body = json.loads(json.dumps(base))
        body["metadata"] = {"x": _deep(depth)}
        data = sign(body)
        try:
            parse_and_decode(data)
        except CheckpointError:
            pass
        except RecursionError as exc:
            escapes.append((depth, repr(exc)[:80]))
    assert escapes == []


def parse_and_decode(data: bytes) -> None:
    """What verify does with a manifest before touching files: parse it and decode every skeleton."""
    manifest = parse_manifest(data, "/hostile/manifest.json")
    for name, item in manifest.items.items():
        Decoder(resolve=lambda node, path: None).decode(item.skeleton, (name,))


def test_giant_strings_and_keys(small: Path) -> None:
    base = _valid_body(small)
    cases: dict[str, Callable[[dict[str, Any]], None]] = {
        "64 MiB + 1 string in metadata": lambda b: b.update(metadata={"s": "x" * (64 * 2**20 + 1)}),
        "2 MiB item name": lambda b: b["items"].update(
            {"i" * (2 * 2**20): {"kind": "data", "file": None, "skeleton": 1}}
        ),
        "2 MiB kind": lambda b: b["items"]["epoch"].update(kind="k" * (2 * 2**20)),
        "1 MiB file name": lambda b: b["files"].update({"f" * 2**20: {"bytes": 1, "hash": "0" * 32}}),
        "100k-digit big int": lambda b: b.update(metadata={"n": {"$": "int", "v": "9" * 100_000}}),
    }
    for name, mutate in cases.items():
        body = json.loads(json.dumps(base))
        mutate(body)
        data = sign(body)
        raised = bounded(lambda data=data: parse_and_decode(data), max_bytes=8 * len(data) + (16 << 20))
        assert isinstance(raised, CheckpointError), f"{name}: {raised!r}"
    figures.add("hostile", "giant strings, keys and numbers", len(cases))


def test_a_giant_dict_key_is_refused_like_a_giant_string(small: Path) -> None:
    body = _valid_body(small)
    body["items"]["epoch"]["skeleton"] = {"k" * (64 * 2**20 + 1): 1}
    data = sign(body)
    with pytest.raises(InvalidManifestError):
        parse_and_decode(data)


def test_large_legitimate_string_costs_about_its_size(small: Path) -> None:
    body = _valid_body(small)
    body["metadata"] = {"notes": {"k": "y" * (20 * 2**20)}}
    data = sign(body)
    raised = bounded(lambda: parse_and_decode(data), max_bytes=4 * len(data))
    assert raised is None


def test_manifest_parse_memory_is_bounded_by_its_size(small: Path) -> None:
    body = _valid_body(small)
    body["metadata"] = {"many": [[] for _ in range(60_000)]}
    data = sign(body)
    raised = bounded(lambda: parse_and_decode(data), max_bytes=2 * len(data) + (1 << 20), max_seconds=60)
    assert raised is None or isinstance(raised, CheckpointError)


def test_tensor_header_parse_memory_is_bounded_by_its_size() -> None:
    header = {f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(30_000)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-(8 + len(raw))) % 8)
    blob = struct.pack("<Q", len(raw)) + raw
    # A lean parse still keeps ~250 bytes of Python objects per entry (several times the entry's JSON), so the
    # bound is a fixed factor of the header, whose size is capped: a forged file costs at most
    # HEADER_PARSE_FACTOR * MAX_HEADER_BYTES (~256 MiB), never more.
    limit = HEADER_PARSE_FACTOR * len(blob) + (1 << 20)
    raised = bounded(lambda: parse_header(blob, len(blob), "bomb"), max_bytes=limit, max_seconds=60)
    assert raised is None or isinstance(raised, CheckpointError)
    assert HEADER_PARSE_FACTOR * MAX_HEADER_BYTES <= 256 << 20


def test_writer_refuses_a_header_readers_would_refuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import savegame.format.tensorfile as tf
    from savegame.errors import UnsupportedTypeError

    monkeypatch.setattr(tf, "MAX_HEADER_BYTES", 4096)
    with pytest.raises(UnsupportedTypeError, match="split the state"):
        savegame.save(tmp_path / "c", {"m": {f"t{i}": np.zeros(1) for i in range(200)}})
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------------------
# Hostile tensor files (the manifest re-signed to match, so only the header check stands in the way)


def _resign_files(path: Path) -> None:
    body = _valid_body(path)
    for name, entry in body["files"].items():
        data = (path / name).read_bytes()
        entry["bytes"], entry["hash"] = len(data), hash_bytes(data)
    (path / "manifest.json").write_bytes(sign(body))


def _tensor_file(raw_header: bytes, data: bytes) -> bytes:
    raw_header += b" " * ((-(8 + len(raw_header))) % 8)
    return struct.pack("<Q", len(raw_header)) + raw_header + data


HOSTILE_HEADERS: dict[str, tuple[bytes, bytes]] = {
    # 2**33 * 2**31 * 4 bytes = 2**66 = 0 (mod 2**64): a C parser without checked_mul sees 0 bytes.
    "shape x itemsize wraps to 0 mod 2**64": (
        json.dumps(
            {
                "weight": {"dtype": "F32", "shape": [2**33, 2**31], "data_offsets": [0, 0]},
                "bias": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            }
        ).encode(),
        bytes(8),
    ),
    "shape wraps to the real size mod 2**64": (
        json.dumps({"weight": {"dtype": "U8", "shape": [2**32 + 1, 2**32], "data_offsets": [0, 2**32]}}).encode(),
        bytes(16),
    ),
    "duplicate key hides a region": (
        b'{"weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
        b'"weight": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}',
        bytes(16),
    ),
    "65 dimensions": (
        json.dumps({"weight": {"dtype": "U8", "shape": [1] * 65, "data_offsets": [0, 1]}}).encode(),
        bytes(1),
    ),
    "tensor name of 1 MiB": (
        json.dumps({"w" * 2**20: {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode(),
        bytes(1),
    ),
    "metadata value not a string": (
        json.dumps(
            {"__metadata__": {"a": {"b": "c"}}, "w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
        ).encode(),
        bytes(1),
    ),
    "dtype key missing": (json.dumps({"w": {"shape": [1], "data_offsets": [0, 1]}}).encode(), bytes(1)),
    "header of NULs": (b"\0" * 64, b""),
    "header of invalid UTF-8": (b'{"\xff\xfe": 1}', b""),
}


@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
def test_hostile_tensor_headers(small: Path, case: str) -> None:
    raw, data = HOSTILE_HEADERS[case]
    file = small / "model.safetensors"
    file.write_bytes(_tensor_file(raw, data))
    _resign_files(small)
    for fn in (
        lambda: savegame.verify(small),
        lambda: savegame.load(small),
        lambda: savegame.load(small, verify=False),
    ):
        raised = bounded(fn, max_bytes=32 << 20)
        assert isinstance(raised, (InvalidTensorFileError, TruncatedFileError, InvalidManifestError)), repr(raised)
        assert str(file) in str(raised)
    figures.add("hostile", "hostile tensor headers", 1)


def test_empty_tensor_with_a_giant_dimension_allocates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    savegame.save(path, {"x": {"e": np.zeros((0, 3), dtype=np.float32)}})
    file = path / "x.safetensors"
    header = json.dumps({"e": {"dtype": "F32", "shape": [0, 2**62 - 1], "data_offsets": [0, 0]}}).encode()
    file.write_bytes(_tensor_file(header, b""))
    body = _valid_body(path)
    body["items"]["x"]["skeleton"]["e"].pop("shape", None)
    (path / "manifest.json").write_bytes(sign(body))
    _resign_files(path)
    raised = bounded(lambda: savegame.load(path), max_bytes=16 << 20)
    assert raised is None or isinstance(raised, CheckpointError), repr(raised)


# ---------------------------------------------------------------------------------------------------
# Names and symlinks: nothing outside the root is read as a checkpoint, written or removed


@pytest.mark.parametrize("name", ["../x", "..", "/etc", "a/b", ".hidden", "x\0y", ".staging-evil", ""])
def test_storage_refuses_path_like_names(tmp_path: Path, name: str) -> None:
    root = tmp_path / "root"
    storage = LocalStorage(root)
    (tmp_path / "x").mkdir()
    for call in (
        lambda: storage.begin(name),
        lambda: storage.delete(name),
        lambda: storage.quarantine(name),
        lambda: storage.path(name),
    ):
        with pytest.raises(InvalidNameError):
            call()
    txn = storage.begin("ok")
    with pytest.raises(InvalidNameError):
        txn.open(name if name else "../escape")
    txn.abort()
    assert (tmp_path / "x").is_dir() and sorted(os.listdir(root)) == []


def _outside(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    return outside


def test_debris_symlinks_never_make_cleanup_or_delete_touch_the_outside(small: Path, tmp_path: Path) -> None:
    root = small.parent
    outside = _outside(tmp_path)
    shutil.copytree(small, outside / "ckpt")
    (root / ".staging-otherhost-1-0123456789ab").symlink_to(outside)  # "a dead writer's staging dir"
    (root / f".staging-{os.uname().nodename}-999999999-0123456789ab").symlink_to(outside)
    (root / ".trash-gone-12345678").symlink_to(outside / "ckpt")  # "a checkpoint moved aside mid-overwrite"
    (root / ".trash-del-x-12345678").symlink_to(outside)
    (root / "linked").symlink_to(outside / "ckpt")  # a checkpoint that is a symlink
    storage = LocalStorage(root)
    assert storage.committed() == ["small"], "a symlinked directory is not a checkpoint of this root"
    storage.cleanup()
    for name in ("linked", "gone"):
        if os.path.lexists(root / name):
            try:
                storage.delete(name)
            except CheckpointError:
                pass
    storage.cleanup()
    assert (outside / "precious.txt").read_text() == "keep me"
    savegame.verify(outside / "ckpt")
    assert storage.committed() == ["small"]


def test_a_symlinked_manifest_is_refused(small: Path, tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    shutil.copytree(small, outside / "real")
    twin = small.parent / "twin"
    shutil.copytree(small, twin)
    (twin / "manifest.json").unlink()
    (twin / "manifest.json").symlink_to(outside / "real" / "manifest.json")
    with pytest.raises(CheckpointError):
        savegame.verify(twin)


def _with_alarm(fn: Callable[[], Any], seconds: int = 5) -> BaseException | None:
    def timeout(signum: int, frame: Any) -> None:
        raise TimeoutError("blocked")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        fn()
    except BaseException as exc:
        return exc
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return None


@pytest.mark.parametrize("which", ["manifest.json", "model.safetensors"])
def test_a_fifo_is_refused_without_blocking(small: Path, which: str) -> None:
    (small / which).unlink()
    os.mkfifo(small / which)
    for fn in (lambda: savegame.verify(small), lambda: savegame.load(small)):
        raised = _with_alarm(fn)
        assert isinstance(raised, CheckpointError), repr(raised)
    assert isinstance(_with_alarm(lambda: savegame.verify(small)), (NotACheckpointError, CorruptCheckpointError))


# ---------------------------------------------------------------------------------------------------
# Fuzzing: only CheckpointError escapes; what is accepted is consistent

def _only_checkpoint_errors(fn: Callable[[], Any]) -> Any:
    """Run ``fn``: it returns, or raises a CheckpointError; anything else propagates (a finding)."""
    try:
        return fn()
    except CheckpointError:
        return None


json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
tags = st.sampled_from(
    [
        "tuple",
        "dict",
        "odict",
        "int",
        "float",
        "bytes",
        "ndarray",
        "npscalar",
        "tensor",
        "torch.dtype",
        "set",
        "pickle",
        "",
    ]
)


def _tagged(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    fields = st.dictionaries(
        st.sampled_from(["v", "k", "key", "bits", "dtype", "shape", "byteorder"]), children, max_size=4
    )
    return st.builds(lambda tag, f: {"$": tag, **f}, tags, fields)


json_values = st.recursive(
    json_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(st.text(max_size=8), children, max_size=5), _tagged(children)
    ),
    max_leaves=30,
)
FIELDS = ["format", "format_version", "created", "versions", "hash_algorithm", "metadata", "progress", "files", "items"]


def _body_template() -> dict[str, Any]:
    return {
        "format": "savegame",
        "format_version": 1,
        "created": "2026-11-22T07:31:59.123456Z",
        "versions": {"savegame": "0.1.0"},
        "hash_algorithm": "xxh3_128",
        "metadata": {"a": 1},
        "progress": None,
        "files": {"model.safetensors": {"bytes": 8, "hash": "0" * 32}},
        "items": {
            "model": {
                "kind": "torch.nn.Module",
                "file": "model.safetensors",
                "skeleton": {"w": {"$": "tensor", "key": "w"}},
            }
        },
    }


def _set_path(body: Any, path: list[Any], value: Any) -> Any:
    if not path:
        return value
    if isinstance(body, dict) and body:
        key = list(body)[path[0] % len(body)]
        body[key] = _set_path(body[key], path[1:], value)
    elif isinstance(body, list) and body:
        i = path[0] % len(body)
        body[i] = _set_path(body[i], path[1:], value)
    return body


@FUZZ
@given(
    paths=st.lists(st.lists(st.integers(0, 20), max_size=5), min_size=1, max_size=3),
    values=st.lists(json_values, min_size=3, max_size=3),
)
def test_fuzz_signed_manifests(paths: list[list[int]], values: list[Any]) -> None:
    """Replace random subtrees of a valid manifest by random JSON (with skeleton tags), re-sign, parse."""
    body = _body_template()
    for path, value in zip(paths, values):
        body = _set_path(body, path, value)
    if not isinstance(body, dict):
        body = {"x": body}
    data = sign(body)
    _only_checkpoint_errors(lambda: parse_and_decode(data))


@FUZZ
@given(data=st.binary(max_size=600), cut=st.integers(0, 2000), flips=st.lists(st.integers(0, 10**6), max_size=4))
def test_fuzz_manifest_bytes(data: bytes, cut: int, flips: list[int]) -> None:
    """Raw bytes, and real manifests truncated or with bytes changed: only CheckpointError."""
    _only_checkpoint_errors(lambda: parse_manifest(data, "/fuzz"))
    real = bytearray(sign(_body_template()))
    for f in flips:
        real[f % len(real)] = (real[f % len(real)] + 1 + f // len(real)) % 256
    _only_checkpoint_errors(lambda: parse_manifest(bytes(real[: max(cut, len(real) // 2)]), "/fuzz"))


dtypes = st.sampled_from([*sorted(ITEMSIZE), "F128", "object", "", "f32"])
dims = st.one_of(st.integers(0, 6), st.integers(-2, 2**64), st.sampled_from([2**31, 2**32, 2**33, 2**62]))
entries = st.fixed_dictionaries(
    {
        "dtype": dtypes,
        "shape": st.lists(dims, max_size=4),
        "data_offsets": st.lists(st.integers(-2, 2**66), min_size=2, max_size=3),
    },
)


@FUZZ
@given(
    header=st.dictionaries(st.text(max_size=6), st.one_of(entries, json_values), max_size=6),
    data_len=st.integers(0, 300),
    garbage=st.binary(max_size=16),
    claimed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
def test_fuzz_tensor_headers(header: dict[str, Any], data_len: int, garbage: bytes, claimed: int | None) -> None:
    raw = json.dumps(header).encode() + garbage
    raw += b" " * ((-(8 + len(raw))) % 8)
    blob = struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + bytes(data_len)
    result = _only_checkpoint_errors(lambda: parse_header(blob, len(blob), "/fuzz.safetensors"))
    if result is None:
        return
    start, infos = result
    expected = 0
    for info in sorted(infos, key=lambda i: i.begin):  # accepted: contiguous, inside the file, sizes agree
        assert info.begin == expected and info.end >= info.begin
        assert math.prod(info.shape) * ITEMSIZE[info.code] == info.end - info.begin
        expected = info.end
    assert start + expected == len(blob)


@FUZZ
@given(blob=st.binary(max_size=400))
def test_fuzz_tensor_file_bytes(tmp_path_factory: pytest.TempPathFactory, blob: bytes) -> None:
    from savegame.format.tensorfile import TensorFileReader

    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    path.write_bytes(blob)
    reader = _only_checkpoint_errors(lambda: TensorFileReader(path))
    if reader is not None:
        for name in reader.tensors:
            reader.array(name)
