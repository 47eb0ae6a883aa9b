"""The writer lock of a checkpoint root, with real processes: LockedError names the holder, a
SIGKILLed holder's lock is free at once (and its record reported as stale), forked children do not
keep it alive, and the fallback without flock breaks only provably stale records."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from savegame.errors import LockedError, StorageError
from savegame.run.lock import HELD_FILE, LOCK_FILE, LockHolder, WriterLock, read_lock_holder

WORKER = str(Path(__file__).parent / "crash" / "worker.py")


class Holder:
    """A subprocess holding the writer lock of a root (``worker.py hold-lock``)."""

    def __init__(self, root: Path, *, fork: bool = False, command: str = "hold-lock") -> None:
        args = [sys.executable, WORKER, command, str(root)] + (["fork"] if fork else [])
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("locked"), line
        self.pid = self.proc.pid

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    started: list[Holder] = []
    yield started
    for h in started:
        h.kill_group()


def test_second_process_gets_locked_error_naming_the_holder(tmp_path: Path, holders: list[Holder]) -> None:
    holder = Holder(tmp_path)
    holders.append(holder)
    with pytest.raises(LockedError) as info:
        WriterLock(tmp_path).acquire()
    message = str(info.value)
    assert f"pid {holder.pid}" in message and socket.gethostname() in message and "worker.py" in message
    assert read_lock_holder(tmp_path) == LockHolder.from_json((tmp_path / LOCK_FILE).read_bytes())
    recorded = read_lock_holder(tmp_path)
    assert recorded is not None and recorded.pid == holder.pid and recorded.is_alive()


def test_lock_of_a_sigkilled_holder_is_free_and_reported_stale(tmp_path: Path, holders: list[Holder]) -> None:
    holder = Holder(tmp_path)
    holders.append(holder)
    holder.kill()  # SIGKILL: no chance to release
    lock = WriterLock(tmp_path).acquire()
    try:
        assert lock.held and lock.mode == "flock"
        assert lock.previous is not None and lock.previous.pid == holder.pid
        assert lock.previous.is_alive() is False
        me = read_lock_holder(tmp_path)
        assert me is not None and me.pid == os.getpid()
    finally:
        lock.release()
    assert (tmp_path / LOCK_FILE).read_bytes() == b"", "a clean release empties the record"
    assert WriterLock(tmp_path).acquire().previous is None  # nothing stale after a clean release


FORKING_HOLDER = """\
import os, sys, time
from savegame.errors import LockedError
from savegame.run.lock import WriterLock

root = sys.argv[1]
lock = WriterLock(root).acquire()
inherited = lock._fd
parent = os.getpid()
print("parent: locked", flush=True)
if os.fork() == 0:  # a DataLoader-style worker
    def say(line):
        os.write(1, (line + "\\n").encode())  # one write: lines never interleave with the parent's
    try:
        os.fstat(inherited)
        say("child: inherited descriptor still open")
    except OSError:
        say("child: inherited descriptor closed")
    say(f"child: lock.held={lock.held} mode={lock.mode}")
    try:
        WriterLock(root).acquire()
        say("child: took the lock while the parent holds it")
    except LockedError as exc:
        say(f"child: LockedError names parent={f'pid {parent} ' in str(exc)}")
    say("child: ready")
    deadline = time.monotonic() + 30
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        own = WriterLock(root, timeout=5).acquire()
    except LockedError:
        say("child: still locked after the parent died")
        os._exit(1)
    say(f"child: acquired after the parent died, previous={own.previous.pid if own.previous else None}")
    own.release()
    say("child: exit 0")
    os._exit(0)
time.sleep(60)
"""


def test_forked_children_do_not_keep_the_lock(tmp_path: Path) -> None:
    """A DataLoader-style child forked by the holder: its copy of the lock is closed at fork, so it is
    locked out while the holder runs, survives the holder's SIGKILL, and can then take the lock itself
    (it could not if its inherited descriptor still shared the flock)."""
    proc = subprocess.Popen([sys.executable, "-c", FORKING_HOLDER, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    assert proc.stdout is not None
    try:
        lines: list[str] = []
        while "child: ready" not in lines:
            line = proc.stdout.readline()
            assert line, f"the holder or its child ended early: {lines}"
            lines.append(line.strip())
        proc.kill()  # SIGKILL the holder: the forked child keeps running, reparented
        proc.wait()
        rest = proc.stdout.read()  # until the child exits and closes the pipe
        lines += [line.strip() for line in rest.splitlines()]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    child = [line for line in lines if line.startswith("child:")]
    assert child == [
        "child: inherited descriptor closed",
        "child: lock.held=False mode=None",
        "child: LockedError names parent=True",
        "child: ready",
        f"child: acquired after the parent died, previous={proc.pid}",
        "child: exit 0",
    ], lines
    assert lines[0] == "parent: locked"
    lock = WriterLock(tmp_path, timeout=5).acquire()
    assert lock.previous is None  # the child released cleanly
    lock.release()


def test_waiting_for_a_holder_that_releases(tmp_path: Path) -> None:
    code = (
        "import sys, time; from savegame.run.lock import WriterLock\n"
        "lock = WriterLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(0.7); lock.release()\n"
        "print('released', flush=True); time.sleep(5)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("locked")
        start = time.monotonic()
        with pytest.raises(LockedError):
            WriterLock(tmp_path, timeout=0.2, poll_seconds=0.05).acquire()
        with WriterLock(tmp_path, timeout=10, poll_seconds=0.05) as lock:
            assert lock.held and lock.previous is None
        assert time.monotonic() - start < 10
    finally:
        proc.kill()
        proc.wait()


def test_same_process_twice_is_refused_and_release_is_idempotent(tmp_path: Path) -> None:
    with WriterLock(tmp_path) as first:
        with pytest.raises(LockedError, match=r"\(this process\)"):
            WriterLock(tmp_path).acquire()
        with pytest.raises(LockedError, match="already held"):
            first.acquire()
    first.release()
    again = WriterLock(tmp_path).acquire()
    again.release()
    assert not again.held


def test_the_lock_file_is_not_a_checkpoint_and_survives_cleanup(tmp_path: Path) -> None:
    import numpy as np

    import savegame
    from savegame.storage.local import LocalStorage

    with WriterLock(tmp_path):
        savegame.save(tmp_path / "a", {"x": np.arange(3)})
        storage = LocalStorage(tmp_path)
        assert storage.committed() == ["a"]
        storage.cleanup()
        assert (tmp_path / LOCK_FILE).exists()
        with pytest.raises(LockedError):
            WriterLock(tmp_path).acquire()


def test_a_symlinked_lock_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("do not touch")
    root = tmp_path / "root"
    root.mkdir()
    (root / LOCK_FILE).symlink_to(target)
    with pytest.raises(StorageError):
        WriterLock(root).acquire()
    assert target.read_text() == "do not touch"


# ---------------------------------------------------------------------------------------------------
# Without flock (Lustre without -o flock, some FUSE filesystems)


@pytest.fixture
def no_flock(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(fd: int, operation: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr("savegame.run.lock._flock", refuse)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.usefixtures("no_flock")
def test_fallback_excludes_and_releases(tmp_path: Path) -> None:
    lock = WriterLock(tmp_path).acquire()
    assert lock.mode == "link" and (tmp_path / HELD_FILE).exists()
    with pytest.raises(LockedError, match=r"\(this process\)"):
        WriterLock(tmp_path).acquire()
    lock.release()
    assert not any(p.name.startswith(HELD_FILE) for p in tmp_path.iterdir()), "no record or temp file is left"


@pytest.mark.usefixtures("no_flock")
def test_fallback_breaks_a_stale_record_of_a_dead_local_process(tmp_path: Path) -> None:
    dead = LockHolder(pid=_dead_pid(), host=socket.gethostname(), program="train.py", since="2026-01-01T00:00:00Z")
    (tmp_path / HELD_FILE).write_bytes(dead.to_json())
    lock = WriterLock(tmp_path).acquire()
    assert lock.previous == dead
    holder = read_lock_holder(tmp_path)
    assert holder is not None and holder.pid == os.getpid()
    lock.release()


@pytest.mark.usefixtures("no_flock")
def test_fallback_never_breaks_a_record_of_another_host(tmp_path: Path) -> None:
    other = LockHolder(pid=_dead_pid(), host="some-other-node", program="train.py", since="2026-01-01T00:00:00Z")
    (tmp_path / HELD_FILE).write_bytes(other.to_json())
    with pytest.raises(LockedError, match="some-other-node"):
        WriterLock(tmp_path).acquire()
    assert json.loads((tmp_path / HELD_FILE).read_text())["host"] == "some-other-node"


def test_a_checkpointer_in_another_process_locks_the_directory(tmp_path: Path, holders: list[Holder]) -> None:
    """The Checkpointer holds the lock for its lifetime: a second writer *process* gets LockedError naming
    the holder; after the holder dies (SIGKILL) a new Checkpointer starts at once. Checkpointers of one
    process share the lock (a restart in the same process is not a rival writer)."""
    import savegame

    holder = Holder(tmp_path, command="hold-checkpointer")
    holders.append(holder)
    with pytest.raises(LockedError, match=f"pid {holder.pid}"):
        savegame.Checkpointer(tmp_path)
    reader = savegame.Checkpointer(tmp_path, lock=False)  # read-only use needs no lock
    assert reader.list() == []
    holder.kill()
    first = savegame.Checkpointer(tmp_path)
    second = savegame.Checkpointer(tmp_path)  # same process: shares the lock
    first.close()
    assert read_lock_holder(tmp_path) is not None  # still held by `second`
    second.close()
    assert read_lock_holder(tmp_path) is None  # released with the last share
