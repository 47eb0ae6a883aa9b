"""Background saves: snapshot then persist, one in flight, errors surfaced, buffers reused."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import savegame
from savegame.engine.background import BackgroundWriter, PendingSave
from savegame.engine.writer import save_in_background
from savegame.errors import BackgroundSaveError
from savegame.storage.local import FileOps, LocalStorage


class GatedOps(FileOps):
    """Blocks every data write until ``gate`` is set (a slow disk under our control)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.writes = 0

    def write(self, fd: int, data: memoryview) -> int:
        self.writes += 1
        self.gate.wait(10)
        return super().write(fd, data)


class FullDisk(FileOps):
    def write(self, fd: int, data: memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def model_state() -> dict[str, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt, "epoch": 1}


def test_background_save_returns_after_snapshot_and_ignores_later_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic: the writer thread cannot write a byte until the live tensors and arrays were
    changed (``GatedOps``), and the snapshot's host copies run late on their worker (so a save that
    returned before its copies finished would copy changed values): only a snapshot taken in full
    before ``save`` returns, in memory of its own, is written as it was at the call."""
    from savegame._util import copyqueue

    copy_batch = copyqueue._run

    def late_copies(batch: list[tuple[object, object]]) -> None:
        time.sleep(0.2)
        copy_batch(batch)

    monkeypatch.setattr(copyqueue, "_run", late_copies)
    state = model_state()
    model = state["model"]
    assert isinstance(model, nn.Module)
    arrays = {
        "f": np.arange(1000, dtype=np.float32), "i": np.arange(24, dtype=np.int64).reshape(2, 3, 4),
        "u8": np.frombuffer(bytes(range(200)), dtype=np.uint8).copy(),
    }  # fmt: skip
    assert all(a.flags.c_contiguous for a in arrays.values())
    state["arrays"] = arrays
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_arrays = {k: v.copy() for k, v in arrays.items()}
    ops = GatedOps()
    writer = BackgroundWriter()
    pending = save_in_background(writer, LocalStorage(tmp_path, ops=ops), "c", state,
                                 metadata=None, progress=None, overwrite=False)
    assert isinstance(pending, PendingSave)
    assert not pending.done()
    assert not (tmp_path / "c").exists()  # "latest" does not advance before the commit
    with torch.no_grad():
        for p in model.parameters():
            p.add_(100.0)  # training goes on while the write is in flight
    for a in arrays.values():
        a += 7  # in place: the same memory
    time.sleep(0.3)  # the copy worker's late batches would have run by now
    assert not pending.done() and ops.writes <= 1  # the writer is still held before its first write
    ops.gate.set()
    manifest = pending.result(timeout=30)
    assert isinstance(manifest, savegame.Manifest)
    loaded = savegame.load(tmp_path / "c")
    for k, v in expected.items():
        assert torch.equal(loaded["model"][k], v), k
    for k, v in expected_arrays.items():
        assert np.array_equal(loaded["arrays"][k], v) and loaded["arrays"][k].dtype == v.dtype, k
    writer.close()


def test_public_background_flag(tmp_path: Path) -> None:
    state = model_state()
    pending = savegame.save(tmp_path / "c", state, background=True, metadata={"a": 1})
    manifest = pending.result()
    assert manifest.metadata == {"a": 1}
    assert pending.blocking_seconds >= 0
    savegame.verify(tmp_path / "c")


def test_at_most_one_save_in_flight(tmp_path: Path) -> None:
    ops = GatedOps()
    writer = BackgroundWriter()
    storage = LocalStorage(tmp_path, ops=ops)
    first = save_in_background(writer, storage, "a", {"x": np.ones(1000)}, metadata=None, progress=None,
                               overwrite=False)
    returned = threading.Event()

    def second() -> None:
        save_in_background(writer, storage, "b", {"x": np.ones(1000)}, metadata=None, progress=None,
                           overwrite=False)
        returned.set()

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.3)
    assert not returned.is_set()  # waits for the first save to finish before taking its snapshot
    assert not first.done()
    ops.gate.set()
    t.join(10)
    assert returned.is_set()
    writer.close()
    assert LocalStorage(tmp_path).committed() == ["a", "b"]


def test_background_error_delivered_by_result_is_not_raised_again(tmp_path: Path) -> None:
    """An error the caller already got from ``result()`` does not poison the next, unrelated save."""
    writer = BackgroundWriter()
    pending = save_in_background(writer, LocalStorage(tmp_path, ops=FullDisk()), "c", {"x": np.ones(10)},
                                 metadata=None, progress=None, overwrite=False)
    with pytest.raises(BackgroundSaveError, match="No space left"):
        pending.result(timeout=10)
    with pytest.raises(BackgroundSaveError, match="No space left"):
        pending.result(timeout=10)  # the handle keeps saying what happened
    nxt = save_in_background(writer, LocalStorage(tmp_path), "d", {"x": np.ones(10)}, metadata=None,
                             progress=None, overwrite=False)
    assert isinstance(nxt.result(timeout=10), savegame.Manifest)
    writer.close()  # nothing left to report
    assert LocalStorage(tmp_path).committed() == ["d"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # the failed save's staging was removed
    with pytest.raises(BackgroundSaveError, match="closed"):
        save_in_background(writer, LocalStorage(tmp_path), "e", {"x": np.ones(10)}, metadata=None,
                           progress=None, overwrite=False)


def test_background_error_nobody_collected_is_raised_by_the_next_call_once(tmp_path: Path) -> None:
    writer = BackgroundWriter()
    pending = save_in_background(writer, LocalStorage(tmp_path, ops=FullDisk()), "c", {"x": np.ones(10)},
                                 metadata=None, progress=None, overwrite=False)
    while not pending.done():
        time.sleep(0.01)
    # Never collected through the handle: the next save raises it before taking a snapshot (and is not
    # written), exactly once.
    with pytest.raises(BackgroundSaveError, match="No space left"):
        save_in_background(writer, LocalStorage(tmp_path), "d", {"x": np.ones(10)}, metadata=None,
                           progress=None, overwrite=False)
    writer.wait()  # reported once only
    assert LocalStorage(tmp_path).committed() == []
    assert list(tmp_path.iterdir()) == []  # staging removed
    writer.close()


def test_close_raises_unreported_error(tmp_path: Path) -> None:
    writer = BackgroundWriter()
    save_in_background(writer, LocalStorage(tmp_path, ops=FullDisk()), "c", {"x": np.ones(10)},
                       metadata=None, progress=None, overwrite=False)
    with pytest.raises(BackgroundSaveError):
        writer.close()


def test_snapshot_buffers_are_reused(tmp_path: Path) -> None:
    writer = BackgroundWriter()
    storage = LocalStorage(tmp_path)
    state = {"x": {"a": torch.ones(1000), "b": np.zeros(500)}}
    save_in_background(writer, storage, "a", state, metadata=None, progress=None, overwrite=False).result()
    free_before = sorted(id(b) for v in writer.pool._free.values() for b in v)
    assert len(free_before) == 2
    save_in_background(writer, storage, "b", state, metadata=None, progress=None, overwrite=False).result()
    free_after = sorted(id(b) for v in writer.pool._free.values() for b in v)
    assert free_before == free_after
    for name in ("a", "b"):
        loaded = savegame.load(tmp_path / name)["x"]
        assert torch.equal(loaded["a"], torch.ones(1000)) and np.array_equal(loaded["b"], np.zeros(500))
    writer.close()


def test_snapshot_of_non_contiguous_and_numpy_views(tmp_path: Path) -> None:
    base = torch.arange(20.0).reshape(4, 5)
    arr = np.arange(30).reshape(5, 6)[:, ::2]
    pending = savegame.save(tmp_path / "c", {"x": {"t": base.t(), "a": arr}}, background=True)
    base.zero_()
    arr[...] = 0
    pending.result()
    got = savegame.load(tmp_path / "c")["x"]
    assert torch.equal(got["t"], torch.arange(20.0).reshape(4, 5).t())
    assert np.array_equal(got["a"], np.arange(30).reshape(5, 6)[:, ::2])


def test_snapshot_copies_on_the_worker_are_complete_when_save_returns(tmp_path: Path) -> None:
    """Tensors are copied in batches on a worker thread while the state is walked (copyqueue.py): many
    tensors and more than one batch of bytes, changed the moment the call returns, are written as they
    were at the call."""
    torch.manual_seed(1)
    tensors = {f"t{i}": torch.randn(256, 97 + i % 5) for i in range(300)}  # ~30 MB, ~4 batches of 8 MiB
    expected = {k: v.clone() for k, v in tensors.items()}
    pending = savegame.save(tmp_path / "c", {"x": tensors}, background=True)
    for v in tensors.values():
        v.mul_(-3.0).add_(7.0)
    pending.result(timeout=60)
    loaded = savegame.load(tmp_path / "c")["x"]
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_snapshot_that_fails_midway_waits_for_its_copies(tmp_path: Path) -> None:
    from savegame.engine.writer import encode_state
    from savegame.errors import UnsupportedTypeError

    class Pool:
        def __init__(self) -> None:
            self.taken: list[np.ndarray] = []

        def take(self, nbytes: int, pinned: bool) -> np.ndarray:
            buf = np.zeros(nbytes, dtype=np.uint8)
            self.taken.append(buf)
            return buf

    pool = Pool()
    big = [torch.full((1 << 20,), float(i)) for i in range(20)]  # 80 MB queued before the bad value
    with pytest.raises(UnsupportedTypeError, match="bad"):
        encode_state({"x": {"big": big, "bad": object()}}, copy=True, allocate=pool.take)
    # encode_state returned only after every queued copy ran: each buffer holds its tensor's bytes
    assert len(pool.taken) == 20
    for i, buf in enumerate(pool.taken):
        assert np.array_equal(buf.view(np.float32), np.full(1 << 20, float(i), np.float32))


def _ends(action: object, seconds: float = 60) -> None:
    """Run ``action`` on a thread; fail (instead of hanging the suite) if it does not return."""
    t = threading.Thread(target=action, daemon=True)  # type: ignore[arg-type]
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the wait for the background save never returned"


def test_ctrl_c_landing_in_the_writer_thread_start_does_not_wedge_the_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt raised as ``Thread.start()`` returns (the thread runs): the persist job used to
    wait forever for the go-ahead that the interrupted call never gave, so ``wait()`` (and the wait at
    interpreter exit) hung. The save must go on and commit."""
    import savegame.engine.background as background

    class Interrupted(threading.Thread):
        def start(self) -> None:
            super().start()
            if self.name == "interrupted-writer":  # (the pools' threads start as usual)
                raise KeyboardInterrupt

    monkeypatch.setattr(background.threading, "Thread", Interrupted)
    writer = BackgroundWriter(name="interrupted-writer")
    with pytest.raises(KeyboardInterrupt):
        save_in_background(writer, LocalStorage(tmp_path), "a", {"x": np.ones(1000)}, metadata=None,
                           progress=None, overwrite=False)  # fmt: skip
    monkeypatch.undo()
    _ends(writer.wait)
    writer.close()
    assert LocalStorage(tmp_path).committed() == ["a"]


def test_a_writer_thread_that_cannot_start_is_a_background_save_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Thread.start()`` failing (a process allowed no more threads) raised a bare RuntimeError and left a
    save "in flight" that would never finish: the next save, ``wait()`` and the exit hung."""
    import savegame.engine.background as background

    class NoThreads(threading.Thread):
        def start(self) -> None:
            if self.name == "threadless-writer":  # (the pools' threads start as usual)
                raise RuntimeError("can't start new thread")
            super().start()

    monkeypatch.setattr(background.threading, "Thread", NoThreads)
    writer = BackgroundWriter(name="threadless-writer")
    with pytest.raises(BackgroundSaveError, match=r"could not start the background writer.*can't start new thread"):
        save_in_background(writer, LocalStorage(tmp_path), "a", {"x": np.ones(1000)}, metadata=None,
                           progress=None, overwrite=False)  # fmt: skip
    monkeypatch.undo()
    _ends(writer.wait)
    pending = save_in_background(writer, LocalStorage(tmp_path), "b", {"x": np.ones(1000)}, metadata=None,
                                 progress=None, overwrite=False)  # fmt: skip
    assert isinstance(pending.result(timeout=60), savegame.Manifest)
    writer.close()
    assert LocalStorage(tmp_path).committed() == ["b"]
