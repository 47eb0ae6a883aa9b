"""Direct I/O for large data files (savegame.storage.local.direct): the bytes on disk are exactly the
bytes of a buffered write (no padding left, nothing lost at buffer edges), the file is fsynced after its
last direct write, and every refusal (no O_DIRECT, a filesystem that rejects it, a device that rejects
our alignment, a short write) falls back to buffered writes without an error. The thresholds are made
small so that small states cross every edge."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import savegame
from savegame.errors import StorageError
from savegame.storage.local import FileOps, LocalStorage, direct
from savegame.storage.local import ops as local_ops

STAGE = 16 << 10


def _fs_type(path: Path) -> str | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        return direct.filesystem_type(fd)
    finally:
        os.close(fd)


@pytest.fixture
def small_direct(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Files go direct after 40 KiB, through 16 KiB staging buffers, also where the tests' temporary
    directory is on a filesystem savegame would leave buffered (tmpfs takes O_DIRECT since Linux 6.6)."""
    monkeypatch.setattr(direct, "DIRECT_FROM_BYTES", 40 << 10)
    monkeypatch.setattr(direct, "STAGE_BYTES", STAGE)
    monkeypatch.setattr(direct, "FILESYSTEMS", direct.FILESYSTEMS | {_fs_type(tmp_path)})
    yield


class SpyOps(FileOps):
    """Real calls, recorded per file: ``("write", n, direct)``, ``("truncate", size)``, ``("fsync",)``..."""

    def __init__(self) -> None:
        self.paths: dict[int, str] = {}
        self.direct_fds: set[int] = set()
        self.calls: dict[str, list[tuple[Any, ...]]] = {}

    def _log(self, fd: int, *call: Any) -> None:
        self.calls.setdefault(os.path.basename(self.paths[fd]), []).append(call)

    def open_new(self, path: str) -> int:
        fd = super().open_new(path)
        self.paths[fd] = path
        self.direct_fds.discard(fd)
        return fd

    def set_direct(self, fd: int, on: bool) -> bool:
        done = super().set_direct(fd, on)
        self._log(fd, "set_direct", on, done)
        if done and on:
            self.direct_fds.add(fd)
        elif done:
            self.direct_fds.discard(fd)
        return done

    def write(self, fd: int, data: memoryview) -> int:
        n = super().write(fd, data)
        self._log(fd, "write", n, fd in self.direct_fds)
        return n

    def truncate(self, fd: int, size: int) -> None:
        super().truncate(fd, size)
        self._log(fd, "truncate", size)

    def fsync(self, fd: int) -> None:
        super().fsync(fd)
        self._log(fd, "fsync")


def _state(n: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {"model": {"w": rng.standard_normal(n).astype(np.float32), "b": rng.standard_normal(n // 7 + 3),
                      "odd": np.arange(n % 1000 + 1, dtype=np.int16)}}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(np.array_equal(np.asarray(a["model"][k]), b["model"][k]) for k in b["model"])


def _use(monkeypatch: pytest.MonkeyPatch, ops: FileOps) -> None:
    monkeypatch.setattr(local_ops, "DEFAULT_OPS", ops)


@pytest.mark.parametrize("n", [9_000, 10_240, 12_287, 40_000, 100_003])
def test_a_direct_write_leaves_exactly_the_bytes_of_a_buffered_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_direct: None, n: int
) -> None:
    state = _state(n)
    _use(monkeypatch, FileOps())
    monkeypatch.setattr(FileOps, "direct_io", False)
    savegame.save(tmp_path / "buffered", state)
    monkeypatch.setattr(FileOps, "direct_io", True)
    spy = SpyOps()
    _use(monkeypatch, spy)
    savegame.save(tmp_path / "direct", state)
    calls = spy.calls["model.safetensors"]
    assert ("set_direct", True, True) in calls, calls  # the filesystem here (ext4) takes O_DIRECT
    assert any(c[0] == "write" and c[2] for c in calls)
    assert (tmp_path / "direct" / "model.safetensors").read_bytes() == (
        tmp_path / "buffered" / "model.safetensors"
    ).read_bytes()
    savegame.verify(tmp_path / "direct")
    assert _same(savegame.load(tmp_path / "direct"), state)
    assert calls[-1] == ("fsync",)  # durable after the last direct write and the truncate


def test_the_padded_last_block_is_truncated_and_the_file_fsynced_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_direct: None
) -> None:
    spy = SpyOps()
    _use(monkeypatch, spy)
    monkeypatch.setattr(FileOps, "direct_io", True)
    savegame.save(tmp_path / "c", _state(30_001))
    calls = spy.calls["model.safetensors"]
    size = (tmp_path / "c" / "model.safetensors").stat().st_size
    assert size % direct.BLOCK  # the state was chosen so that the last block is partial
    truncates = [c for c in calls if c[0] == "truncate"]
    assert truncates == [("truncate", size)]
    assert calls.index(truncates[0]) < calls.index(("fsync",))
    written = sum(c[1] for c in calls if c[0] == "write")
    assert written == -(-size // direct.BLOCK) * direct.BLOCK  # the padding went out, then was cut off


def test_background_saves_write_direct_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_direct: None) -> None:
    spy = SpyOps()
    _use(monkeypatch, spy)
    monkeypatch.setattr(FileOps, "direct_io", True)
    states = [_state(50_000, seed) for seed in range(3)]
    with savegame.Checkpointer(tmp_path, background=True, keep_last=5) as ckpt:
        for step, state in enumerate(states):
            ckpt.save(state, step=step)
    assert any(c[0] == "write" and c[2] for c in spy.calls["model.safetensors"])
    names = LocalStorage(tmp_path).committed()
    assert len(names) == 3
    for name, state in zip(sorted(names), states):
        savegame.verify(tmp_path / name)
        assert _same(savegame.load(tmp_path / name), state)


class RefusingFilesystem(SpyOps):
    """A filesystem that does not take O_DIRECT at all (fcntl fails, as tmpfs on older kernels)."""

    def set_direct(self, fd: int, on: bool) -> bool:
        self._log(fd, "set_direct", on, False)
        return False


class LargeBlockDevice(SpyOps):
    """A device whose direct writes need more alignment than 4 KiB: every direct write is EINVAL."""

    def write(self, fd: int, data: memoryview) -> int:
        if fd in self.direct_fds:
            self._log(fd, "refused", len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return super().write(fd, data)


class ShortWrites(SpyOps):
    """Every write writes at most half its buffer rounded to 1000 bytes (a nearly full disk): the second
    one leaves the position unaligned."""

    def write(self, fd: int, data: memoryview) -> int:
        if len(data) > 1000:
            data = data[: max(1000, len(data) // 2 // 1000 * 1000)]
        return super().write(fd, data)


@pytest.mark.parametrize("ops_class", [RefusingFilesystem, LargeBlockDevice, ShortWrites])
def test_every_refusal_falls_back_to_buffered_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_direct: None, ops_class: type[SpyOps]
) -> None:
    ops = ops_class()
    _use(monkeypatch, ops)
    monkeypatch.setattr(FileOps, "direct_io", True)
    state = _state(60_001)
    savegame.save(tmp_path / "c", state)
    savegame.verify(tmp_path / "c")
    assert _same(savegame.load(tmp_path / "c"), state)
    calls = ops.calls["model.safetensors"]
    if ops_class is LargeBlockDevice:
        assert any(c[0] == "refused" for c in calls)
    if ops_class is not RefusingFilesystem:  # it went direct, then back to buffered
        assert ("set_direct", True, True) in calls and ("set_direct", False, True) in calls
    assert calls[-1] == ("fsync",)


class FaultInDirectFile(SpyOps):
    """Real calls, except that the ``nth`` call of ``kind`` on a file that went direct fails with ``err``."""

    def __init__(self, kind: str, nth: int, err: int) -> None:
        super().__init__()
        self.kind, self.nth, self.err = kind, nth, err
        self.count = 0
        self.was_direct: set[int] = set()

    def _maybe(self, fd: int, what: str) -> None:
        if what == self.kind and fd in self.was_direct:
            self.count += 1
            if self.count == self.nth:
                raise OSError(self.err, os.strerror(self.err) + " (injected)")

    def set_direct(self, fd: int, on: bool) -> bool:
        self.was_direct.add(fd)
        return super().set_direct(fd, on)

    def write(self, fd: int, data: memoryview) -> int:
        self._maybe(fd, "write")
        return super().write(fd, data)

    def truncate(self, fd: int, size: int) -> None:
        self._maybe(fd, "truncate")
        super().truncate(fd, size)

    def fsync(self, fd: int) -> None:
        self._maybe(fd, "fsync")
        super().fsync(fd)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("kind", ["write", "truncate", "fsync"])
def test_a_fault_in_a_direct_file_fails_the_save_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_direct: None, kind: str, err: int
) -> None:
    """A fault at each call of a direct file (the writes run on a worker thread) is the save's
    StorageError; nothing is published, no staging is left, and the next save works (staging buffers
    given back)."""
    monkeypatch.setattr(FileOps, "direct_io", True)
    savegame.save(tmp_path / "a", _state(50_000, 1))
    failed = 0
    for nth in range(1, 60):
        ops = FaultInDirectFile(kind, nth, err)
        _use(monkeypatch, ops)
        try:
            savegame.save(tmp_path / "b", _state(50_001, 2))
        except StorageError as exc:
            assert exc.errno == err
            assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
            failed += 1
            continue
        break
    else:
        raise AssertionError("the save never succeeded")
    assert failed >= 1 and failed == ops.count  # a fault at every call of that kind, each one reported
    _use(monkeypatch, FileOps())
    savegame.verify(tmp_path / "b")
    assert _same(savegame.load(tmp_path / "b"), _state(50_001, 2))
    assert _same(savegame.load(tmp_path / "a"), _state(50_000, 1))


def test_a_filesystem_not_listed_stays_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_direct: None
) -> None:
    """Network and FUSE filesystems (anything not in direct.FILESYSTEMS) never see O_DIRECT."""
    monkeypatch.setattr(direct, "FILESYSTEMS", frozenset())
    monkeypatch.setattr(FileOps, "direct_io", True)
    spy = SpyOps()
    _use(monkeypatch, spy)
    state = _state(60_001)
    savegame.save(tmp_path / "c", state)
    assert not any(c[0] == "set_direct" for c in spy.calls["model.safetensors"])
    assert _same(savegame.load(tmp_path / "c"), state)


def test_the_filesystem_type_comes_from_mountinfo(tmp_path: Path) -> None:
    fd = os.open("/proc/self/status", os.O_RDONLY)
    try:
        assert direct.filesystem_type(fd) == "proc"
    finally:
        os.close(fd)
    kind = _fs_type(tmp_path)
    assert isinstance(kind, str) and kind and kind.isprintable()
    assert direct._mount_type("4095:1048575") is None  # no such device


def test_the_environment_variable_turns_direct_io_off() -> None:
    code = "from savegame.storage.local import direct, ops; print(direct.ENABLED, ops.DEFAULT_OPS.direct_io)"
    for value, expected in (("0", "False False"), ("off", "False False"), ("1", "True True")):
        src = str(Path(savegame.__file__).parents[1])
        env = {**os.environ, "SAVEGAME_DIRECT_IO": value,
               "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == expected.split(), (value, out.stdout, out.stderr)
