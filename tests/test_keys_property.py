"""Whatever ``save`` accepts, ``load`` reads back exactly, and ``export`` writes files the target
format's own reader opens with every tensor present, or refuses with a CheckpointError naming the key.

States are generated with hostile-but-legal keys: dots, ``__metadata__`` (reserved in safetensors
headers), keys longer than the tensor file's 4,096-character name limit, unicode, lone surrogates, the
empty string, numeric strings, control characters, ``"$"`` (the skeleton's tag key), and keys that
collide once joined with ``.`` (``{"a.b": x, "a": {"b": y}}``).
"""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file as load_safetensors

import savegame
from savegame import Checkpointer, CheckpointError, InvalidNameError
from savegame.export import export_checkpoint

HOSTILE_KEYS = [
    "__metadata__", "a.b", "a", "b", ".", "..", "", "0", "1", "-1", "1e3", "$", "#2", "a#2", "k" * 5000,
    "k" * 5000 + "x", "\udc80", "a\ud800b", "\x00", "\x1b[2J", "\n", "é", "日本", "🙂", "/abs", "../../../tmp/evil",
    "a/b", "C:x", "back\\slash", " ", "__metadata__#2",
]  # fmt: skip

keys = st.one_of(st.sampled_from(HOSTILE_KEYS), st.text(max_size=6))
DTYPES = ["float32", "float64", "float16", "int64", "int32", "int8", "uint8", "bool", "complex64"]


@st.composite
def numpy_arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    raw = draw(st.binary(min_size=dtype.itemsize * math.prod(shape), max_size=dtype.itemsize * math.prod(shape)))
    arr = np.frombuffer(raw, dtype=np.uint8).view(dtype) if dtype != np.bool_ else np.frombuffer(raw, np.uint8) % 2
    return np.array(arr.astype(dtype, copy=False).reshape(shape))


@st.composite
def torch_tensors(draw: st.DrawFn) -> torch.Tensor:
    arr = draw(numpy_arrays())
    return torch.from_numpy(arr.copy())


plain = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(), st.text(max_size=5),
    st.binary(max_size=5),
)
leaves = st.one_of(plain, numpy_arrays(), torch_tensors())
nested = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=2).map(tuple),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=12,
)
arrays = st.one_of(numpy_arrays(), torch_tensors())


@st.composite
def models(draw: st.DrawFn) -> dict[str, Any]:
    """An item with arrays under hostile keys; often with names that collide once joined with dots
    (``{"a.b": x, "a": {"b": y}}``, ``{"0": x, "l": [y]}`` vs ``"l.0"``...)."""
    model: dict[str, Any] = draw(st.dictionaries(keys, nested, max_size=4))
    model.update(draw(st.dictionaries(keys, arrays, min_size=1, max_size=3)))
    if draw(st.booleans()):
        outer, inner = draw(st.sampled_from([("a", "b"), ("", ""), ("__metadata__", "x"), ("k" * 5000, "\udc80")]))
        model[f"{outer}.{inner}"] = draw(arrays)
        model[outer] = {inner: draw(arrays)} if draw(st.booleans()) else [draw(arrays)]
        if isinstance(model[outer], list):
            model[f"{outer}.0"] = draw(arrays)
    return model


states = st.fixed_dictionaries(
    {"model": models()},
    optional={"__metadata__": nested, "a.b": nested, "1": nested},
)


def assert_exact(got: Any, want: Any, where: str = "") -> None:
    """Same types, keys (in order), values, dtypes and bits."""
    assert type(got) is type(want), f"{where}: {type(got)} != {type(want)}"
    if isinstance(want, dict):
        assert list(got) == list(want), f"{where}: keys {list(got)[:5]} != {list(want)[:5]}"
        for k in want:
            assert_exact(got[k], want[k], f"{where}.{k[:20]!a}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_exact(g, w, f"{where}.{i}")
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert got.tobytes() == want.tobytes(), where
    elif isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert got.numpy().tobytes() == want.numpy().tobytes(), where
    elif isinstance(want, float):
        assert struct.pack(">d", got) == struct.pack(">d", want), where
    else:
        assert got == want, where


def flat_arrays(node: Any, path: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """``(export name, array)`` of every array, as export names them (the dotted state path)."""
    if isinstance(node, (np.ndarray, torch.Tensor)):
        return [(".".join(path), node)]
    if isinstance(node, dict):
        return [pair for k, v in node.items() for pair in flat_arrays(v, (*path, str(k)))]
    if isinstance(node, (list, tuple)):
        return [pair for i, v in enumerate(node) for pair in flat_arrays(v, (*path, str(i)))]
    return []


def names_key(message: str, name: str) -> bool:
    """Whether an error message names ``name`` (its start, as messages show it: repr or ascii)."""
    head = name[:40]
    return any(form in message for form in (repr(head)[1:-1], ascii(head)[1:-1], head))


def check_export(checkpoint: Path, destination: Path, model: dict[str, Any]) -> None:
    arrays = flat_arrays(model)
    try:
        export_checkpoint(checkpoint, destination)
    except CheckpointError as exc:
        message = str(exc)
        kind = "collision" if "two tensors" in message else "name"
        event(f"{destination.suffix}: refused ({type(exc).__name__}, {kind})")
        if not arrays:
            assert "holds no tensors" in message
            return
        assert isinstance(exc, InvalidNameError), message
        assert any(names_key(message, name) for name, _ in arrays), message
        names = [name for name, _ in arrays]
        if len(set(names)) == len(names):  # no collision: only a name the format cannot hold is refused
            assert "cannot be a" in message, message
        assert not destination.exists()
        return
    event(f"{destination.suffix}: exported {'some' if arrays else 'no'} tensors")
    names = [name for name, _ in arrays]
    assert len(set(names)) == len(names), f"{destination.suffix}: colliding names {names} were exported"
    if destination.suffix == ".safetensors":
        loaded: dict[str, Any] = load_safetensors(str(destination))
    elif destination.suffix == ".pt":
        loaded = {k: v.numpy() for k, v in torch.load(destination, weights_only=True).items()}
    else:
        with np.load(destination, allow_pickle=False) as npz:
            loaded = {k: npz[k] for k in npz.files}
        with zipfile.ZipFile(destination) as zf:
            for member in zf.namelist():
                assert not member.startswith("/") and ".." not in member.split("/")
    assert sorted(loaded) == sorted(names)
    for name, want in arrays:
        want_np = want.numpy() if isinstance(want, torch.Tensor) else want
        assert loaded[name].dtype == want_np.dtype and loaded[name].shape == want_np.shape, name
        assert loaded[name].tobytes() == want_np.tobytes(), name


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(state=states)
def test_hostile_keys_round_trip_or_are_refused(
    tmp_path_factory: pytest.TempPathFactory, state: dict[str, Any]
) -> None:
    root = tmp_path_factory.mktemp("keys")
    path = root / "ckpt"
    savegame.save(path, state)  # every generated state is legal: no refusal expected
    assert_exact(savegame.load(path), state)
    savegame.verify(path)
    for suffix in (".safetensors", ".pt", ".npz"):
        check_export(path, root / f"out{suffix}", state["model"])


@pytest.mark.parametrize("key", ["__metadata__", "k" * 5000, "\udc80", "a\ud800b"])
def test_key_that_broke_every_load_round_trips(tmp_path: Path, key: str) -> None:
    state = {"model": {key: np.arange(3.0), "other": np.ones(2)}}
    savegame.save(tmp_path / "c", state)
    assert_exact(savegame.load(tmp_path / "c"), state)


class _WithMetadataBuffer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.register_buffer("__metadata__", torch.zeros(2))


def test_checkpointer_restores_a_module_with_a_metadata_buffer(tmp_path: Path) -> None:
    """It used to write checkpoints every load refused, and restore() quarantined them all and returned
    None: training silently started over."""
    model = _WithMetadataBuffer()
    with torch.no_grad():
        model.get_buffer("__metadata__").fill_(7.0)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save({"model": model, "long": {"x" * 5000: np.arange(4)}}, epoch=1)
    fresh = _WithMetadataBuffer()
    state: dict[str, Any] = {"model": fresh}
    restored = Checkpointer(tmp_path).restore(state)
    assert restored is not None and restored.epoch == 1
    assert torch.equal(fresh.get_buffer("__metadata__"), torch.full((2,), 7.0))
    assert torch.equal(fresh.lin.weight, model.lin.weight)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".quarantine")]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".npz"])
def test_export_refuses_names_that_collide_once_joined(tmp_path: Path, suffix: str) -> None:
    savegame.save(tmp_path / "c", {"model": {"a.b": torch.ones(2), "a": {"b": torch.zeros(2)}}})
    out = tmp_path / f"w{suffix}"
    result = subprocess.run(
        [sys.executable, "-m", "savegame.cli", "export", str(tmp_path / "c"), "--to", str(out)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(savegame.__file__).parents[1])},
    )  # fmt: skip
    assert result.returncode != 0, result.stdout
    assert "'a.b'" in result.stderr and "['a', 'b']" in result.stderr and "rename" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("key", ["../../../tmp/evil", "/abs", "a/./b", "a//b", "back\\slash", "C:evil"])
def test_npz_member_names_never_leave_the_folder(tmp_path: Path, key: str) -> None:
    savegame.save(tmp_path / "c", {"model": {key: np.ones(2), "ok/fine": np.zeros(1)}})
    with pytest.raises(InvalidNameError, match="npz member name") as info:
        export_checkpoint(tmp_path / "c", tmp_path / "w.npz")
    assert ascii(key)[1:-1] in str(info.value) or key in str(info.value)
    assert not (tmp_path / "w.npz").exists()
    only_safe = tmp_path / "safe"
    savegame.save(only_safe, {"model": {"ok/fine": np.zeros(1)}})
    export_checkpoint(only_safe, tmp_path / "fine.npz")
    with np.load(tmp_path / "fine.npz", allow_pickle=False) as npz:
        assert npz.files == ["ok/fine"]
