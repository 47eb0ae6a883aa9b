"""Tensor files: plain safetensors on disk, aligned, and read back by a strict, bounded header parser."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch

import savegame
from savegame.errors import InvalidTensorFileError, TruncatedFileError
from savegame.format.dtypes import ITEMSIZE
from savegame.format.hashing import hash_bytes
from savegame.format.tensorfile import (
    MAX_HEADER_BYTES,
    MAX_NAME_CHARS,
    MAX_NDIM,
    TensorData,
    TensorFileReader,
    order_for_alignment,
    parse_header,
    write_tensor_file,
)

# Every torch dtype safetensors has a code for (the file holds it under that code, unchanged).
NATIVE_TORCH = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
}
NUMPY_NATIVE = ["float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16",
                "uint8", "bool", "complex64"]


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bits of ``dtype`` (every bit pattern, so nan payloads and odd bools too, except for bool)."""
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape))
    itemsize = torch.empty((), dtype=dtype).element_size()
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _torch_state() -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for i, dtype in enumerate(NATIVE_TORCH):
        name = str(dtype).removeprefix("torch.")
        state[name] = _sample(dtype, (3, 5), i)
        state[f"{name}_odd"] = _sample(dtype, (7,), 100 + i)  # odd byte counts force alignment care
        state[f"{name}_scalar"] = _sample(dtype, (), 200 + i)
        state[f"{name}_empty"] = _sample(dtype, (0, 4), 300 + i)
    state["noncontiguous"] = torch.arange(24.0).reshape(4, 6).t()[1:, ::2]
    return state


def _raw_header(file: Path) -> tuple[int, dict[str, Any]]:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n, json.loads(raw[8 : 8 + n])


def test_files_open_with_plain_safetensors_for_every_dtype(tmp_path: Path) -> None:
    state = _torch_state()
    savegame.save(tmp_path / "ckpt", {"t": state})
    file = str(tmp_path / "ckpt" / "t.safetensors")
    with safetensors.safe_open(file, "pt") as f:
        assert set(f.keys()) == set(state)
        for key, expected in state.items():
            got = f.get_tensor(key)
            assert got.dtype == expected.dtype, key
            assert got.shape == expected.shape, key
            assert _bits(got) == _bits(expected), key
    plain = safetensors.torch.load_file(file)
    assert all(_bits(plain[k]) == _bits(v) and plain[k].dtype == v.dtype for k, v in state.items())
    loaded = savegame.load(tmp_path / "ckpt")["t"]
    assert all(_bits(loaded[k]) == _bits(v) and loaded[k].dtype == v.dtype for k, v in state.items())


def test_view_types_open_as_their_storage_type(tmp_path: Path) -> None:
    c128 = torch.randn(3, 2, dtype=torch.complex128)
    savegame.save(tmp_path / "ckpt", {"t": {"c128": c128}})
    with safetensors.safe_open(str(tmp_path / "ckpt" / "t.safetensors"), "pt") as f:
        stored = f.get_tensor("c128")
    assert stored.dtype == torch.float64 and stored.shape == (3, 2, 2)
    assert torch.equal(stored, torch.view_as_real(c128))


def test_files_open_with_safetensors_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for name in NUMPY_NATIVE:
        bits = rng.integers(0, 256, size=6 * np.dtype(name).itemsize, dtype=np.uint8)
        arrays[name] = (bits % 2).astype(bool).reshape(2, 3) if name == "bool" else bits.view(name).reshape(2, 3)
        arrays[name + "_0d"] = np.asarray(arrays[name].reshape(-1)[1])
    # torch tensors of the dtypes NumPy has, saved from torch, open as NumPy too
    tensors = {f"torch_{k}": torch.from_numpy(v.copy()) for k, v in arrays.items()}
    savegame.save(tmp_path / "ckpt", {"np": arrays, "pt": tensors})
    got = safetensors.numpy.load_file(str(tmp_path / "ckpt" / "np.safetensors"))
    assert set(got) == set(arrays)
    for key, expected in arrays.items():
        assert got[key].dtype == expected.dtype and got[key].shape == expected.shape, key
        assert got[key].tobytes() == expected.tobytes(), key
    got_pt = safetensors.numpy.load_file(str(tmp_path / "ckpt" / "pt.safetensors"))
    for key, expected in tensors.items():
        assert got_pt[key].tobytes() == expected.numpy().tobytes(), key


def test_every_tensor_is_aligned_to_its_element_size(tmp_path: Path) -> None:
    savegame.save(tmp_path / "ckpt", {"t": _torch_state(), "n": {"b": np.ones(3, bool), "d": np.ones(5)}})
    for file in sorted((tmp_path / "ckpt").glob("*.safetensors")):
        data_start, header = _raw_header(file)
        assert data_start % 64 == 0
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        assert len(entries) > 1
        for key, entry in entries.items():
            begin, end = entry["data_offsets"]
            assert (data_start + begin) % ITEMSIZE[entry["dtype"]] == 0, (file.name, key, entry)
            if (end - begin) % 64 == 0:  # these come first: each at a 64-byte boundary, as torch allocates
                assert (data_start + begin) % 64 == 0, (file.name, key, entry)
        reader = TensorFileReader(file)
        for key in entries:
            assert reader.array(key).flags.aligned, key


def test_order_puts_64_byte_multiples_first_then_element_size() -> None:
    def data(code: str, n: int) -> TensorData:
        return TensorData(f"{code}{n}", code, (n,), memoryview(bytes(n * ITEMSIZE[code])))

    tensors = [data("U8", 3), data("F32", 16), data("F16", 5), data("F64", 3), data("I64", 8), data("U8", 64)]
    ordered = [t.name for t in order_for_alignment(tensors)]
    assert ordered == ["F3216", "I648", "U864", "F643", "F165", "U83"]
    offset = 0
    for t in order_for_alignment(tensors):
        assert offset % ITEMSIZE[t.code] == 0
        offset += len(t.data)


def test_header_entries_in_any_order_parse_the_same() -> None:
    header = {
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
        "a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]},
    }
    _, infos = _parse(_file(header, bytes(16)))
    assert [(i.name, i.begin, i.end) for i in infos] == [("a", 0, 8), ("b", 8, 16)]


def test_writer_round_trip_hash_and_large_tensors() -> None:
    rng = np.random.default_rng(1)
    arrays = {
        "big": rng.standard_normal(300_000).astype(np.float32),  # > 256 KiB: written straight from memory
        "small": rng.integers(0, 9, 13).astype(np.int16),
        "flags": np.array([True, False, True]),
        "empty": np.zeros((0, 3), np.float64),
    }
    codes = {"big": "F32", "small": "I16", "flags": "BOOL", "empty": "F64"}
    tensors = order_for_alignment(
        [TensorData(k, codes[k], v.shape, memoryview(v.reshape(-1).view(np.uint8))) for k, v in arrays.items()]
    )
    sink = io.BytesIO()
    written = write_tensor_file(sink, tensors, metadata={"note": "x"})
    data = sink.getvalue()
    assert written.bytes == len(data)
    assert written.hash == hash_bytes(data)
    data_start, infos = parse_header(data, len(data), "mem")
    assert sorted(i.name for i in infos) == sorted(arrays)
    for info in infos:
        got = np.frombuffer(data, np.uint8, info.nbytes, data_start + info.begin)
        assert got.tobytes() == arrays[info.name].tobytes()
    loaded = safetensors.numpy.load(data)
    assert all(loaded[k].tobytes() == v.tobytes() for k, v in arrays.items())


def test_reader_accepts_files_written_by_safetensors(tmp_path: Path) -> None:
    tensors = {"w": torch.randn(4, 3), "b": torch.arange(5, dtype=torch.int64), "m": torch.tensor([True, False])}
    file = tmp_path / "x.safetensors"
    safetensors.torch.save_file(tensors, str(file), metadata={"format": "pt"})
    reader = TensorFileReader(file)
    assert set(reader.names()) == set(tensors)
    for k, v in tensors.items():
        assert reader.array(k).tobytes() == v.numpy().tobytes()
    assert reader.hash() == hash_bytes(file.read_bytes())


# ---------------------------------------------------------------------------------------------------
# The header parser


def _file(header: Any, data: bytes = b"", *, raw: bytes | None = None, length: int | None = None) -> bytes:
    body = raw if raw is not None else json.dumps(header).encode()
    body += b" " * ((-(8 + len(body))) % 8)
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def _parse(blob: bytes) -> Any:
    return parse_header(blob, len(blob), "where.safetensors")


def _entry(dtype: str, shape: list[Any], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_parse_valid_header() -> None:
    header = {"__metadata__": {"a": "b"}, "x": _entry("F32", [2], 0, 8), "y": _entry("U8", [3], 8, 11)}
    blob = _file(header, bytes(11))
    start, infos = _parse(blob)
    assert start == len(blob) - 11
    assert [(i.name, i.code, i.shape, i.begin, i.end) for i in infos] == [
        ("x", "F32", (2,), 0, 8),
        ("y", "U8", (3,), 8, 11),
    ]


BAD_HEADERS: dict[str, tuple[bytes, type[Exception], str]] = {
    "overlapping offsets": (
        _file({"x": _entry("F32", [2], 0, 8), "y": _entry("F32", [2], 4, 12)}, bytes(12)),
        InvalidTensorFileError, "overlaps",
    ),
    "same range twice": (
        _file({"x": _entry("F32", [2], 0, 8), "y": _entry("F32", [2], 0, 8)}, bytes(16)),
        InvalidTensorFileError, "overlaps",
    ),
    "gap between tensors": (
        _file({"x": _entry("F32", [2], 0, 8), "y": _entry("F32", [2], 12, 20)}, bytes(20)),
        InvalidTensorFileError, "gap",
    ),
    "gap at the start": (_file({"x": _entry("F32", [2], 4, 12)}, bytes(12)), InvalidTensorFileError, "gap"),
    "trailing bytes": (_file({"x": _entry("F32", [2], 0, 8)}, bytes(9)), InvalidTensorFileError, "unexplained"),
    "offsets past the end": (_file({"x": _entry("F32", [4], 0, 16)}, bytes(8)), TruncatedFileError, "16"),
    "offsets 2**80 past the end": (
        _file({"x": _entry("F32", [2**40, 2**38], 0, 2**80)}, bytes(8)), TruncatedFileError, "file holds 8",
    ),
    "offsets reversed": (_file({"x": _entry("U8", [0], 8, 0)}, bytes(8)), InvalidTensorFileError, "out of order"),
    "negative offset": (_file({"x": _entry("U8", [8], -8, 0)}, bytes(8)), InvalidTensorFileError, "out of order"),
    "offsets not a pair": (
        _file({"x": {"dtype": "U8", "shape": [8], "data_offsets": [0, 4, 8]}}, bytes(8)),
        InvalidTensorFileError, "data_offsets",
    ),
    "offsets strings": (
        _file({"x": {"dtype": "U8", "shape": [8], "data_offsets": ["0", "8"]}}, bytes(8)),
        InvalidTensorFileError, "data_offsets",
    ),
    "offsets bools": (
        _file({"x": {"dtype": "BOOL", "shape": [1], "data_offsets": [False, True]}}, bytes(1)),
        InvalidTensorFileError, "data_offsets",
    ),
    "shape larger than offsets": (
        _file({"x": _entry("F32", [3], 0, 8)}, bytes(8)), InvalidTensorFileError, "needs 12 bytes",
    ),
    "shape smaller than offsets": (
        _file({"x": _entry("F64", [1], 0, 16)}, bytes(16)), InvalidTensorFileError, "needs 8 bytes",
    ),
    "shape [2**40, 2**40] for 8 bytes": (
        _file({"x": _entry("F32", [2**40, 2**40], 0, 8)}, bytes(8)), InvalidTensorFileError, "needs",
    ),
    "negative dimension": (_file({"x": _entry("U8", [-1], 0, 0)}), InvalidTensorFileError, "dimension"),
    "float dimension": (_file({"x": _entry("U8", [2.0], 0, 2)}, bytes(2)), InvalidTensorFileError, "dimension"),
    "bool dimension": (_file({"x": _entry("U8", [True], 0, 1)}, bytes(1)), InvalidTensorFileError, "dimension"),
    "too many dimensions": (
        _file({"x": _entry("U8", [1] * (MAX_NDIM + 1), 0, 1)}, bytes(1)), InvalidTensorFileError, "shape",
    ),
    "shape not a list": (_file({"x": _entry("U8", 4, 0, 4)}, bytes(4)), InvalidTensorFileError, "shape"),
    "unknown dtype": (_file({"x": _entry("F128", [1], 0, 16)}, bytes(16)), InvalidTensorFileError, "F128"),
    "numpy dtype name": (_file({"x": _entry("float32", [1], 0, 4)}, bytes(4)), InvalidTensorFileError, "dtype"),
    "object dtype": (_file({"x": _entry("O", [1], 0, 8)}, bytes(8)), InvalidTensorFileError, "dtype"),
    "lowercase dtype": (_file({"x": _entry("f32", [1], 0, 4)}, bytes(4)), InvalidTensorFileError, "dtype"),
    "dtype not a string": (_file({"x": _entry(4, [1], 0, 4)}, bytes(4)), InvalidTensorFileError, "dtype"),
    "entry not an object": (_file({"x": [0, 4]}, bytes(4)), InvalidTensorFileError, "not an object"),
    "header is a list": (_file([]), InvalidTensorFileError, "not a JSON object"),
    "header is a string": (_file("x"), InvalidTensorFileError, "not a JSON object"),
    "header is a number": (_file(7), InvalidTensorFileError, "not a JSON object"),
    "header is null": (_file(None), InvalidTensorFileError, "not a JSON object"),
    "header not JSON": (_file(None, raw=b"{'x': 1}"), InvalidTensorFileError, "not valid JSON"),
    "header not UTF-8": (_file(None, raw=b'{"\xff": 1}'), InvalidTensorFileError, "not valid JSON"),
    "header nested 100000 deep": (_file(None, raw=b"[" * 100_000), InvalidTensorFileError, "not valid JSON"),
    "header with a million-digit int": (
        _file(None, raw=b'{"x": {"dtype": "U8", "shape": [' + b"1" * 10**6 + b'], "data_offsets": [0, 1]}}', data=b"1"),
        InvalidTensorFileError, "not valid JSON",
    ),
    "metadata not strings": (
        _file({"__metadata__": {"a": 1}, "x": _entry("U8", [1], 0, 1)}, bytes(1)), InvalidTensorFileError, "metadata",
    ),
    "metadata not an object": (_file({"__metadata__": "a"}), InvalidTensorFileError, "metadata"),
    "name too long": (
        _file({"n" * (MAX_NAME_CHARS + 1): _entry("U8", [1], 0, 1)}, bytes(1)), InvalidTensorFileError, "name",
    ),
    "header length 2**60": (_file({}, length=2**60), InvalidTensorFileError, "exceeds the limit"),
    "header length 2**64-1": (_file({}, length=2**64 - 1), InvalidTensorFileError, "exceeds the limit"),
    "header length over the limit": (_file({}, length=MAX_HEADER_BYTES + 1), InvalidTensorFileError, "exceeds"),
    "header length past the file": (_file({}, length=1000), TruncatedFileError, "past the end"),
    "header length cuts the JSON": (_file({"x": _entry("U8", [1], 0, 1)}, bytes(1), length=5),
                                    InvalidTensorFileError, "not valid JSON"),
    "shorter than the prefix": (b"\x08\0\0\0", TruncatedFileError, "too short"),
    "empty file": (b"", TruncatedFileError, "too short"),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_parse_rejects(case: str) -> None:
    blob, exc_type, needle = BAD_HEADERS[case]
    with pytest.raises(exc_type) as info:
        _parse(blob)
    assert "where.safetensors" in str(info.value)
    assert needle in str(info.value)


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_reader_rejects_bad_files(tmp_path: Path, case: str) -> None:
    blob, exc_type, needle = BAD_HEADERS[case]
    file = tmp_path / "bad.safetensors"
    file.write_bytes(blob)
    with pytest.raises(exc_type) as info:
        TensorFileReader(file)
    assert str(file) in str(info.value) and needle in str(info.value)


def test_empty_and_zero_size_tensors_are_fine() -> None:
    header = {"a": _entry("F32", [0, 5], 0, 0), "b": _entry("U8", [2], 0, 2), "c": _entry("I64", [0], 2, 2)}
    _, infos = _parse(_file(header, bytes(2)))
    assert {i.name: i.nbytes for i in infos} == {"a": 0, "b": 2, "c": 0}
    _, infos = _parse(_file({}))
    assert infos == []
