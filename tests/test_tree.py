"""Nested state round-trips exactly through save/load: same types, keys and bits."""

from __future__ import annotations

import math
import re
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import savegame
from savegame.errors import UnsupportedTypeError


def same(a: Any, b: Any) -> bool:
    """Exact equality: types, keys, order, and bit patterns of floats and arrays."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return list(a.keys()) == list(b.keys()) and all(
            same(k1, k2) and same(a[k1], b[k2]) for k1, k2 in zip(a, b)
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [-0.0, 0.0, math.inf, -math.inf, struct.unpack("<d", b"\x01\x00\x00\x00\x00\x00\xf8\xff")[0]]
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | floats
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
array_dtypes = st.sampled_from(
    ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
     "float16", "float32", "float64", "complex64", "complex128", ">f4", ">i8"]
)
arrays = array_dtypes.flatmap(
    lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
)
np_scalars = st.sampled_from([np.float32(1.5), np.int64(-3), np.bool_(True), np.uint8(7), np.float64("nan")])
keys = st.text(max_size=8) | st.integers(min_value=-5, max_value=10**20)
trees = st.recursive(
    scalars | arrays | np_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(keys, children, max_size=4)
        | st.dictionaries(st.text(max_size=6), children, max_size=4).map(OrderedDict)
    ),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=trees)
def test_nested_state_round_trips_exactly(tmp_path: Path, tree: Any) -> None:
    path = tmp_path / "ckpt"
    savegame.save(path, {"item": tree, "other": [tree]})
    loaded = savegame.load(path)
    assert same(loaded["item"], tree)
    assert same(loaded["other"], [tree])
    savegame.verify(path)


def test_dollar_keys_and_tag_lookalikes_are_plain_data(tmp_path: Path) -> None:
    tricky = {"$": "tensor", "key": "x", "nested": {"$": "int", "v": "5"}}
    savegame.save(tmp_path / "c", {"d": tricky})
    assert savegame.load(tmp_path / "c")["d"] == tricky


def test_metadata_round_trips(tmp_path: Path) -> None:
    meta = {"run": "exp1", "lr": 1e-3, "tags": ("a", "b"), 3: None, "nan": math.nan}
    savegame.save(tmp_path / "c", {"x": 1}, metadata=meta)
    got = savegame.read_manifest(tmp_path / "c").metadata
    assert same({k: v for k, v in got.items() if k != "nan"}, {k: v for k, v in meta.items() if k != "nan"})
    assert math.isnan(got["nan"])


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({"a": {"b": object()}}, "item.a.b"),
        ({"a": [1, {2, 3}]}, "item.a.1"),
        ({"a": np.array(["x", "y"])}, "item.a"),
        ({"a": np.array([object()], dtype=object)}, "item.a"),
        ({"a": type("S", (str,), {})("sub")}, "item.a"),
    ],
)
def test_unsupported_values_name_their_path(tmp_path: Path, value: Any, where: str) -> None:
    with pytest.raises(UnsupportedTypeError, match="^" + re.escape(where) + ": cannot store"):
        savegame.save(tmp_path / "c", {"item": value})
    assert not (tmp_path / "c").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # the aborted staging directory is gone


def test_arrays_are_not_allowed_in_metadata(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedTypeError, match="metadata"):
        savegame.save(tmp_path / "c", {"x": 1}, metadata={"a": np.zeros(3)})


def test_state_must_be_a_dict(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedTypeError, match="dict of items"):
        savegame.save(tmp_path / "c", [1, 2])  # type: ignore[arg-type]


def test_shared_numpy_arrays_are_stored_once(tmp_path: Path) -> None:
    a = np.arange(1000, dtype=np.float64)
    savegame.save(tmp_path / "c", {"x": {"a": a, "b": a}})
    files = savegame.read_manifest(tmp_path / "c").files
    assert files["x.safetensors"].bytes < 8000 + 1000
    loaded = savegame.load(tmp_path / "c")["x"]
    assert loaded["a"] is loaded["b"]


def test_contains_walks_dicts_lists_and_tuples_to_the_depth_limit() -> None:
    from savegame.format.tree import MAX_DEPTH, contains

    def is_seven(v: object) -> bool:
        return v == 7

    assert contains({"a": [1, (2, {"b": 7})]}, is_seven)
    assert not contains({"a": [1, (2, {"b": 8})], "c": "7"}, is_seven)
    deep: object = 7
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    assert contains(deep, is_seven)  # found at the deepest level a saved state can have
    assert not contains([deep, 1], is_seven)  # one level deeper is not looked at


def test_numpy_subclasses_are_refused_not_flattened(tmp_path: Path) -> None:
    """A MaskedArray came back as a plain array without its mask (its mean went from 2.0 to -331.7) and an
    np.matrix as an ndarray: every ndarray subclass is refused by name; an np.memmap is plain data."""
    import numpy as np

    import savegame
    from savegame.errors import UnsupportedTypeError

    masked = np.ma.masked_array([1.0, -999.0, 3.0], mask=[False, True, False])
    with pytest.warns(PendingDeprecationWarning):  # NumPy discourages np.matrix; users still have them
        matrix = np.matrix([[1, 2]])
    for value in (masked, matrix):
        with pytest.raises(UnsupportedTypeError, match=r"x: cannot store .*subclass of numpy.ndarray"):
            savegame.save(tmp_path / "c", {"x": value})
        assert not (tmp_path / "c").exists()
    mapped = np.memmap(tmp_path / "m.bin", dtype=np.float32, mode="w+", shape=(3,))
    mapped[:] = [1, 2, 3]
    savegame.save(tmp_path / "ok", {"x": mapped})
    back = savegame.load(tmp_path / "ok")["x"]
    assert type(back) is np.ndarray and back.tolist() == [1.0, 2.0, 3.0]
