"""Background save errors are reported once, where the caller looks; retention waits for the commit;
``progress=`` says what it is.

* An error ``h.result()`` delivered is not raised again by the next, unrelated background save (which is
  written); one nobody collected is raised by the next call, once (both for ``savegame.save`` and for a
  Checkpointer).
* A Checkpointer's retention for a background save runs only once that save is committed: while its
  commit is blocked, and after it failed, the older checkpoints are all still there.
* ``save(..., progress=True)`` raises a :class:`ConfigError` that says ``progress`` is the run position
  and how to get a progress bar.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import savegame
import savegame.storage.local.ops as local_ops
from savegame import BackgroundSaveError, Checkpointer, ConfigError
from savegame.storage.local import FileOps


class FullDisk(FileOps):
    def write(self, fd: int, data: memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def _wait_done(handle: savegame.engine.background.PendingSave) -> None:
    deadline = time.monotonic() + 30
    while not handle.done():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_handled_error_of_a_functional_background_save_does_not_poison_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_ops, "DEFAULT_OPS", FullDisk())
    failed = savegame.save(tmp_path / "a", {"x": np.ones(10)}, background=True)
    with pytest.raises(BackgroundSaveError, match="No space left"):
        failed.result()
    monkeypatch.setattr(local_ops, "DEFAULT_OPS", FileOps())
    ok = savegame.save(tmp_path / "b", {"x": np.arange(5)}, background=True)  # unrelated: must not raise
    ok.result()
    savegame.engine.background.default_writer().wait()  # nothing left to report
    assert np.array_equal(savegame.load(tmp_path / "b")["x"], np.arange(5))
    assert sorted(os.listdir(tmp_path)) == ["b"]


def test_uncollected_error_of_a_functional_background_save_is_raised_by_the_next_call_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_ops, "DEFAULT_OPS", FullDisk())
    failed = savegame.save(tmp_path / "a", {"x": np.ones(10)}, background=True)
    _wait_done(failed)  # failed, but nobody asked
    monkeypatch.setattr(local_ops, "DEFAULT_OPS", FileOps())
    with pytest.raises(BackgroundSaveError, match="No space left"):
        savegame.save(tmp_path / "b", {"x": np.arange(5)}, background=True)
    assert not (tmp_path / "b").exists()  # that call raised before its snapshot: nothing written
    savegame.save(tmp_path / "b", {"x": np.arange(5)}, background=True).result()  # reported once only
    assert sorted(os.listdir(tmp_path)) == ["b"]


class FailPublish(FileOps):
    def rename(self, src: str, dst: str) -> None:
        if os.path.basename(src).startswith(".staging-"):
            raise OSError(errno.EIO, "Input/output error", dst)
        super().rename(src, dst)


def _state() -> dict[str, object]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}


def test_checkpointer_error_delivered_by_the_handle_is_not_raised_by_the_next_step(tmp_path: Path) -> None:
    state = _state()
    ckpt = Checkpointer(tmp_path, background=True)
    ckpt.save(state, epoch=1)
    ckpt.wait()
    ckpt.storage.ops = FailPublish()  # type: ignore[attr-defined]
    result = ckpt.save(state, epoch=2)
    assert result.pending is not None
    with pytest.raises(BackgroundSaveError, match="Input/output error"):
        result.pending.result()  # the caller handled it
    ckpt.storage.ops = FileOps()  # type: ignore[attr-defined]
    third = ckpt.save(state, epoch=3)  # unrelated: does not raise the old error, and is written
    ckpt.close()
    assert third.name in [r.name for r in ckpt.list()]
    assert sorted(r.name for r in ckpt.list()) == ["epoch=001", "epoch=003"]
    assert savegame.storage.LocalStorage(tmp_path).committed() == ["epoch=001", "epoch=003"]


class GatedCommit(FileOps):
    """Holds the rename that publishes a checkpoint until ``release`` is set; then fails it if ``fail``."""

    def __init__(self, *, fail: bool) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()
        self.fail = fail

    def _gate(self, src: str, dst: str) -> None:
        if os.path.basename(src).startswith(".staging-"):
            self.reached.set()
            assert self.release.wait(30)
            if self.fail:
                raise OSError(errno.EIO, "Input/output error", dst)

    def rename(self, src: str, dst: str) -> None:
        self._gate(src, dst)
        super().rename(src, dst)

    def exchange(self, a: str, b: str) -> bool:
        self._gate(a, b)
        return super().exchange(a, b)


@pytest.mark.parametrize("fail", [True, False], ids=["commit-fails", "commit-succeeds"])
def test_retention_of_a_background_save_waits_for_its_commit(tmp_path: Path, fail: bool) -> None:
    state = _state()
    ckpt = Checkpointer(tmp_path, background=True, keep_last=2)
    for epoch in (1, 2):
        ckpt.save(state, epoch=epoch)
        ckpt.wait()
    storage = savegame.storage.LocalStorage(tmp_path)
    assert storage.committed() == ["epoch=001", "epoch=002"]
    gate = GatedCommit(fail=fail)
    ckpt.storage.ops = gate  # type: ignore[attr-defined]
    ckpt.save(state, epoch=3)
    assert gate.reached.wait(30)  # epoch 3 is written and waits to be published
    time.sleep(0.2)
    assert storage.committed() == ["epoch=001", "epoch=002"]  # nothing deleted for a save not committed
    gate.release.set()
    if fail:
        with pytest.raises(BackgroundSaveError):
            ckpt.wait()
        assert storage.committed() == ["epoch=001", "epoch=002"]  # the failed save cost nothing
    else:
        assert ckpt.wait() == ["epoch=001"]  # retention ran after the commit
        assert storage.committed() == ["epoch=002", "epoch=003"]
    ckpt.close()


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("value", [True, 0.5, "bar", [1, 2]])
def test_progress_that_is_not_a_mapping_says_what_progress_is(
    tmp_path: Path, background: bool, value: object
) -> None:
    with pytest.raises(ConfigError) as info:
        savegame.save(tmp_path / "c", {"x": np.ones(3)}, progress=value, background=background)  # type: ignore[arg-type]
    message = str(info.value)
    assert "progress=" in message and "where the run is" in message and "'epoch'" in message
    assert type(value).__name__ in message
    assert "SAVEGAME_PROGRESS=1" in message  # how to get a progress bar
    assert not (tmp_path / "c").exists()
    with pytest.raises(ConfigError, match="metadata= must be a mapping"):
        savegame.save(tmp_path / "c", {"x": np.ones(3)}, metadata=True, background=background)  # type: ignore[arg-type]
    savegame.save(tmp_path / "c", {"x": np.ones(3)}, progress={"epoch": 1}, background=background)
    savegame.engine.background.default_writer().wait()
    assert savegame.read_manifest(tmp_path / "c").progress == {"epoch": 1}
