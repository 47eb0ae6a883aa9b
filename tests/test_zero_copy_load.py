"""Zero-copy plain loads (issue 19, item 1): ``savegame.load(path)`` returns views of a private
(copy-on-write) mapping of the committed tensor files, hashed before it returns; ``copy=True`` returns
owned memory.

Whether a tensor is a view of the file is read from ``/proc/self/maps`` (the address ranges this process
maps from each file), so those tests run on Linux only.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import savegame
from savegame.errors import ConfigError, HashMismatchError
from savegame.format.tensorfile import TensorFileReader

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")

ROWS, COLS = 256, 512  # 512 KiB of float32 per tensor: files above the "read small files whole" threshold


def _state() -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    return {"model": {"w1": torch.randn(ROWS, COLS), "w2": torch.randn(ROWS, COLS), "b": torch.randn(COLS)}}


def _data_file(path: Path, item: str = "model") -> Path:
    manifest = savegame.read_manifest(path)
    file = manifest.items[item].file
    assert file is not None
    return path / file


def _mapped_ranges(file: Path) -> list[tuple[int, int]]:
    """The address ranges this process maps from ``file`` (also after it was deleted)."""
    ranges = []
    name = os.fspath(file)
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip().removesuffix(" (deleted)") == name:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((lo, hi))
    return ranges


def _inside(address: int, nbytes: int, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= address and address + nbytes <= hi for lo, hi in ranges)


def _file_digest(file: Path) -> bytes:
    return file.read_bytes()


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    state = _state()
    path = tmp_path / "ckpt"
    savegame.save(path, state)
    return path, state


@linux_only
def test_plain_load_returns_views_of_the_file_mapping(saved: tuple[Path, dict[str, dict[str, torch.Tensor]]]) -> None:
    path, state = saved
    loaded = savegame.load(path)
    ranges = _mapped_ranges(_data_file(path))
    assert ranges, "the tensor file is not mapped"
    for key, expected in state["model"].items():
        got = loaded["model"][key]
        assert torch.equal(got, expected)
        assert _inside(got.data_ptr(), got.nbytes, ranges), f"{key} is not a view of the file mapping"
        assert got.data_ptr() % 64 == 0  # aligned as torch's own allocations are
        assert not got.untyped_storage().resizable()  # borrowed memory, not a torch allocation


@linux_only
def test_copy_true_gives_owned_writable_memory(saved: tuple[Path, dict[str, dict[str, torch.Tensor]]]) -> None:
    path, state = saved
    views = savegame.load(path)  # keeps a mapping alive, so there is a range to be outside of
    ranges = _mapped_ranges(_data_file(path))
    assert ranges
    owned = savegame.load(path, copy=True)
    for key, expected in state["model"].items():
        got = owned["model"][key]
        assert torch.equal(got, expected)
        assert not _inside(got.data_ptr(), got.nbytes, ranges), f"{key} still points into the file"
        assert got.data_ptr() % 64 == 0
        got.add_(1.0)  # writable, and independent of the views
        assert torch.equal(views["model"][key], expected)


def test_copy_must_be_a_bool(saved: tuple[Path, dict[str, dict[str, torch.Tensor]]]) -> None:
    with pytest.raises(ConfigError, match="copy must be True or False"):
        savegame.load(saved[0], copy="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("option", ["verify", "strict"])
@pytest.mark.parametrize("value", [None, 0, "", "yes"])
def test_verify_and_strict_must_be_bools(
    saved: tuple[Path, dict[str, dict[str, torch.Tensor]]], option: str, value: object
) -> None:
    """``verify=None`` or ``""`` silently skipped every hash check (and returned a tampered file's bytes)."""
    with pytest.raises(ConfigError, match=f"{option} must be True or False"):
        savegame.load(saved[0], **{option: value})  # type: ignore[arg-type]


def test_a_map_location_callable_never_sees_unverified_bytes(tmp_path: Path) -> None:
    """A file over the size hashed on a worker while it is decoded: a ``map_location`` callable (user code)
    was handed the tampered tensors before the load raised; it now runs only on verified bytes."""
    path = tmp_path / "c"
    savegame.save(path, {"model": {"w": torch.zeros(1 << 19)}})  # 2 MiB: its hash is deferred by default
    file = _data_file(path)
    data = bytearray(file.read_bytes())
    data[-4:] = np.float32(123.0).tobytes()
    file.write_bytes(bytes(data))
    seen: list[float] = []

    def place(tensor: torch.Tensor, device: str) -> torch.Tensor:
        seen.append(float(tensor.max()))
        return tensor

    for target in (None, {"model": {"w": torch.zeros(1 << 19)}}):
        with pytest.raises(HashMismatchError):
            savegame.load(path, target, map_location=place)
    assert seen == []


def test_a_write_to_a_loaded_tensor_never_reaches_the_file(
    saved: tuple[Path, dict[str, dict[str, torch.Tensor]]],
) -> None:
    path, state = saved
    file = _data_file(path)
    before = _file_digest(file)
    loaded = savegame.load(path)
    loaded["model"]["w1"].fill_(7.0)  # every page of it
    loaded["model"]["b"][3] = -1.0
    assert torch.equal(loaded["model"]["w1"], torch.full((ROWS, COLS), 7.0))
    assert _file_digest(file) == before
    savegame.verify(path)
    again = savegame.load(path)  # a second mapping sees the file, not the first one's private pages
    for key, expected in state["model"].items():
        assert torch.equal(again["model"][key], expected)


def test_deleting_the_checkpoint_keeps_loaded_tensors_readable(
    saved: tuple[Path, dict[str, dict[str, torch.Tensor]]],
) -> None:
    path, state = saved
    loaded = savegame.load(path)
    shutil.rmtree(path)  # what retention does to an old checkpoint
    gc.collect()
    assert not path.exists()
    for key, expected in state["model"].items():
        assert torch.equal(loaded["model"][key], expected)
    loaded["model"]["w2"].mul_(2.0)
    assert torch.equal(loaded["model"]["w2"], state["model"]["w2"] * 2.0)


@pytest.mark.parametrize("rows", [ROWS * 4, 2], ids=["large-file-hashed-on-workers", "small-file-read-whole"])
def test_a_corrupted_byte_raises_before_anything_is_returned(tmp_path: Path, rows: int) -> None:
    path = tmp_path / "ckpt"
    savegame.save(path, {"model": {"w": torch.randn(rows, COLS)}})
    file = _data_file(path)
    reader = TensorFileReader.from_buffer(file.read_bytes(), where=str(file))
    offset = reader.data_start + (reader.size - reader.data_start) // 2  # inside the tensor data
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(HashMismatchError):
        savegame.load(path)
    with pytest.raises(HashMismatchError):
        savegame.load(path, copy=True)
    unchecked = savegame.load(path, verify=False)  # opting out of the check returns the damaged bytes
    assert unchecked["model"]["w"].shape == (rows, COLS)


@linux_only
def test_misaligned_tensors_are_copied_and_correct(tmp_path: Path) -> None:
    # sizes that are not multiples of 64 bytes are stored after the others, at offsets that are only
    # aligned to their element size (the first of them starts 64-byte aligned): the misaligned ones
    # come back in fresh memory, the rest as views
    big = torch.randn(ROWS, COLS)
    odd = {
        "f64": torch.arange(3, dtype=torch.float64),
        "f32": torch.arange(5, dtype=torch.float32),
        "f16": torch.arange(7, dtype=torch.float16),
        "bf16": torch.arange(9, dtype=torch.bfloat16),
        "i8": torch.arange(11, dtype=torch.int8),
        "bool": torch.tensor([True, False, True]),
    }
    path = tmp_path / "ckpt"
    savegame.save(path, {"model": {"big": big, **odd}})
    loaded = savegame.load(path)["model"]
    ranges = _mapped_ranges(_data_file(path))
    assert _inside(loaded["big"].data_ptr(), loaded["big"].nbytes, ranges)
    assert torch.equal(loaded["big"], big)
    copied = 0
    for key, expected in odd.items():
        got = loaded[key]
        assert got.dtype == expected.dtype and torch.equal(got, expected), key
        assert got.data_ptr() % 64 == 0, f"{key} is a misaligned view of the file"
        copied += not _inside(got.data_ptr(), got.nbytes, ranges)
        got.zero_()  # writable, and its neighbours do not change
    assert copied >= len(odd) - 1
    for key in odd:
        assert not loaded[key].any(), key
    assert torch.equal(loaded["big"], big)


@linux_only
def test_numpy_arrays_are_views_of_the_mapping_too(tmp_path: Path) -> None:
    arrays = {"a": np.arange(200_000, dtype=np.float64), "b": np.linspace(0, 1, 70_000, dtype=np.float32),
              "odd": np.arange(3, dtype=np.int16), "odder": np.arange(5, dtype=np.int8)}
    path = tmp_path / "ckpt"
    savegame.save(path, {"data": arrays})
    file = _data_file(path, "data")
    before = _file_digest(file)
    loaded = savegame.load(path)["data"]
    ranges = _mapped_ranges(file)
    for key, expected in arrays.items():
        got = loaded[key]
        assert isinstance(got, np.ndarray) and got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
        assert got.flags.writeable
        # "odd" is the first size that is not a multiple of 64 (so still aligned); "odder" follows it
        assert _inside(got.ctypes.data, got.nbytes, ranges) == (key != "odder"), key
        assert got.ctypes.data % got.itemsize == 0, key
        got[...] = 0
    assert _file_digest(file) == before
    savegame.verify(path)
    owned = savegame.load(path, copy=True)["data"]
    for key, expected in arrays.items():
        np.testing.assert_array_equal(owned[key], expected)
        assert not _inside(owned[key].ctypes.data, owned[key].nbytes, ranges), key


def test_map_location_still_moves_the_tensors(saved: tuple[Path, dict[str, dict[str, torch.Tensor]]]) -> None:
    path, state = saved
    seen: list[str] = []

    def place(tensor: torch.Tensor, saved_device: str) -> torch.Tensor:
        seen.append(saved_device)
        return tensor.clone()

    loaded = savegame.load(path, map_location=place)
    assert seen and set(seen) == {"cpu"}
    for key, expected in state["model"].items():
        assert torch.equal(loaded["model"][key], expected)


def test_remote_plain_load_returns_private_memory() -> None:
    pytest.importorskip("fsspec")
    state = _state()
    url = "memory://savegame-zero-copy/ckpt"
    savegame.save(url, state)
    try:
        first = savegame.load(url)
        first["model"]["w1"].fill_(3.0)
        for copy in (False, True):
            again = savegame.load(url, copy=copy)
            for key, expected in state["model"].items():
                assert torch.equal(again["model"][key], expected)
        savegame.verify(url)
    finally:
        import fsspec

        fsspec.filesystem("memory").rm("/savegame-zero-copy", recursive=True)


@linux_only
def test_copy_true_into_an_optimizer_keeps_no_view_of_the_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(COLS, ROWS)  # 512 KiB of weight: the optimizer's file is mapped
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(4, COLS)).sum().backward()
    opt.step()
    path = tmp_path / "ckpt"
    savegame.save(path, {"model": model, "optimizer": opt})
    file = _data_file(path, "optimizer")
    for copy in (False, True):
        fresh = torch.nn.Linear(COLS, ROWS)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.01)
        savegame.load(path, {"model": fresh, "optimizer": fresh_opt}, copy=copy)
        moments = [s[k] for s in fresh_opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
        ranges = _mapped_ranges(file)
        in_file = [_inside(t.data_ptr(), t.nbytes, ranges) for t in moments]
        assert any(in_file) if not copy else not any(in_file), copy
        saved = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
        assert len(moments) == len(saved) and all(torch.equal(a, b) for a, b in zip(moments, saved))


_MANY_LOADS = """
import resource, sys
import savegame
from savegame.errors import StorageError

path = sys.argv[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
kept = [savegame.load(path, copy=True) for _ in range(200)]  # owned memory: no descriptor per load
try:
    kept += [savegame.load(path) for _ in range(200)]
except StorageError as exc:
    assert "copy=True" in str(exc) and "ulimit -n" in str(exc), exc
    print("refused", exc)
else:
    print("loaded")
"""


def test_loads_past_the_descriptor_limit_give_a_storage_error_or_none(
    saved: tuple[Path, dict[str, dict[str, torch.Tensor]]], tmp_path: Path
) -> None:
    """A mapped file may hold a descriptor while its tensors live (Python < 3.13's mmap duplicates it): a
    program keeping the tensors of many loads alive (a model soup over a run) reaches the process's limit.
    Where it does, the load raises a StorageError saying what to do, never a bare OSError; ``copy=True``
    loads hold none."""
    import subprocess

    path, _ = saved
    script = tmp_path / "many_loads.py"
    script.write_text(_MANY_LOADS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    expected = "loaded" if sys.version_info >= (3, 13) else "refused"
    assert done.stdout.startswith(expected), done.stdout
