"""The local commit protocol: staging is invisible, overwrite never loses the old one, leftovers are cleaned."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import savegame
from savegame.errors import CommitError, InvalidNameError, NotACheckpointError
from savegame.storage.local import FileOps, LocalStorage


def test_staging_leftover_is_invisible_and_cleaned(tmp_path: Path) -> None:
    savegame.save(tmp_path / "good", {"x": np.arange(3)})
    # A crashed writer (dead pid) left a complete-looking staging directory behind.
    staging = tmp_path / ".staging-somehost-999999999-abc"
    staging.mkdir()
    (staging / "manifest.json").write_text("{}")
    storage = LocalStorage(tmp_path)
    assert storage.committed() == ["good"]
    with pytest.raises(NotACheckpointError, match="staging"):
        savegame.load(staging)
    own_host = tmp_path / f".staging-{os.uname().nodename}-999999999-def"
    own_host.mkdir()
    removed = storage.cleanup()
    assert own_host.name in removed
    assert staging.exists()  # another host's staging dir is kept for a day (it may still be writing)
    assert not own_host.exists()


def test_crash_before_commit_leaves_nothing_visible(tmp_path: Path) -> None:
    """A writer killed after writing data files but before the manifest: nothing is listed or loadable."""
    code = textwrap.dedent(
        f"""
        import os, numpy as np
        import savegame.storage.local as local
        real = local.LocalTransaction.commit
        def die(self, manifest):
            for s in self._sinks:
                s.close()
            os._exit(9)
        local.LocalTransaction.commit = die
        import savegame
        savegame.save({str(tmp_path / 'ckpt')!r}, {{"x": np.ones(1000)}})
        """
    )
    savegame.save(tmp_path / "ckpt", {"x": np.zeros(10)})
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == 9
    assert LocalStorage(tmp_path).committed() == ["ckpt"]
    np.testing.assert_array_equal(savegame.load(tmp_path / "ckpt")["x"], np.zeros(10))  # the old one
    assert any(p.name.startswith(".staging-") for p in tmp_path.iterdir())
    LocalStorage(tmp_path).cleanup()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_overwrite_replaces_atomically_and_refuses_without_permission(tmp_path: Path) -> None:
    savegame.save(tmp_path / "c", {"x": np.zeros(3)})
    savegame.save(tmp_path / "c", {"x": np.ones(3)})
    np.testing.assert_array_equal(savegame.load(tmp_path / "c")["x"], np.ones(3))
    with pytest.raises(CommitError, match="exists"):
        savegame.save(tmp_path / "c", {"x": np.full(3, 2.0)}, overwrite=False)
    np.testing.assert_array_equal(savegame.load(tmp_path / "c")["x"], np.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


class NoExchange(FileOps):
    def exchange(self, a: str, b: str) -> bool:
        return False


class FailSecondRename(NoExchange):
    def __init__(self) -> None:
        self.renames = 0

    def rename(self, src: str, dst: str) -> None:
        self.renames += 1
        if self.renames == 2:
            raise OSError(errno.EIO, "injected")
        super().rename(src, dst)


def _overwrite_with(ops: FileOps, root: Path) -> None:
    from savegame.api import encode_state, write_items

    write_items(LocalStorage(root, ops=ops), "c", encode_state({"x": np.ones(3)}),
                metadata=None, progress=None, overwrite=True)


def test_overwrite_fallback_without_renameat2(tmp_path: Path) -> None:
    savegame.save(tmp_path / "c", {"x": np.zeros(3)})
    _overwrite_with(NoExchange(), tmp_path)
    np.testing.assert_array_equal(savegame.load(tmp_path / "c")["x"], np.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path: Path) -> None:
    savegame.save(tmp_path / "c", {"x": np.zeros(3)})
    with pytest.raises(CommitError, match="nothing was published"):
        _overwrite_with(FailSecondRename(), tmp_path)
    np.testing.assert_array_equal(savegame.load(tmp_path / "c")["x"], np.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_trash_left_mid_overwrite_is_restored(tmp_path: Path) -> None:
    """A crash between moving the old checkpoint aside and publishing the new one: cleanup puts it back."""
    savegame.save(tmp_path / "c", {"x": np.zeros(3)})
    os.rename(tmp_path / "c", tmp_path / ".trash-c-1234abcd")
    LocalStorage(tmp_path).cleanup()
    np.testing.assert_array_equal(savegame.load(tmp_path / "c")["x"], np.zeros(3))


def test_delete_and_quarantine(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    for n in ("a", "b"):
        savegame.save(tmp_path / n, {"x": np.zeros(1)})
    storage.delete("a")
    new = storage.quarantine("b")
    assert storage.committed() == []
    assert storage.quarantined() == [new]
    assert (tmp_path / new / "manifest.json").exists()


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "a\\b", "a\0b"])
def test_bad_checkpoint_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidNameError):
        LocalStorage(tmp_path).begin(name)


def test_failure_while_writing_removes_staging(tmp_path: Path) -> None:
    class FullDisk(FileOps):
        def write(self, fd: int, data: memoryview) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    from savegame.api import encode_state, write_items
    from savegame.errors import StorageError

    with pytest.raises(StorageError, match="No space left"):
        write_items(LocalStorage(tmp_path, ops=FullDisk()), "c", encode_state({"x": np.ones(3)}),
                    metadata=None, progress=None, overwrite=False)
    assert list(tmp_path.iterdir()) == []


class _SlowDataFsync(FileOps):
    """fsync of data files blocks until ``gate`` is set; records what was published meanwhile."""

    def __init__(self, root: Path) -> None:
        import threading

        self.gate = threading.Event()
        self.root = root
        self.fsyncs: list[int] = []
        self.fail_errno: int | None = None

    def fsync(self, fd: int) -> None:
        if not os.readlink(f"/proc/self/fd/{fd}").endswith("manifest.json"):
            self.fsyncs.append(fd)  # data files only
            self.gate.wait(20)
            if self.fail_errno is not None:
                raise OSError(self.fail_errno, "injected")
        super().fsync(fd)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_commit_waits_for_data_fsyncs_running_on_workers(tmp_path: Path) -> None:
    """The manifest is fsynced while the data files' fsyncs still run on the writer's workers; nothing is
    published until every one of them finished."""
    import threading

    from savegame.engine.writer import save_now

    ops = _SlowDataFsync(tmp_path)
    storage = LocalStorage(tmp_path, ops=ops)
    state = {"a": {"x": np.arange(1000.0)}, "b": {"y": np.ones(5)}}
    done = threading.Event()
    thread = threading.Thread(target=lambda: (save_now(storage, "c", state, metadata=None, progress=None,
                                                       overwrite=False), done.set()))
    thread.start()
    assert not done.wait(1.0)  # blocked on the data fsyncs
    assert not (tmp_path / "c").exists()
    ops.gate.set()
    thread.join(30)
    assert done.is_set() and (tmp_path / "c").is_dir()
    savegame.verify(tmp_path / "c")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_failed_data_fsync_on_a_worker_publishes_nothing_and_is_not_retried(tmp_path: Path) -> None:
    from savegame.engine.writer import save_now
    from savegame.errors import StorageError

    ops = _SlowDataFsync(tmp_path)
    ops.fail_errno = errno.EIO
    ops.gate.set()
    storage = LocalStorage(tmp_path, ops=ops)
    with pytest.raises(StorageError) as info:
        save_now(storage, "c", {"a": {"x": np.arange(10.0)}}, metadata=None, progress=None, overwrite=False)
    assert info.value.errno == errno.EIO
    assert len(ops.fsyncs) == 1  # the failed data fsync was not tried again by the commit
    assert not (tmp_path / "c").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # the staging directory is gone too
