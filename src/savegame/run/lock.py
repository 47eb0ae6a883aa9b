"""The writer lock of a checkpoint root: one writing process per directory.

Two trainers writing into the same directory (a job started twice, a requeued job whose first instance
is still draining, a copy-pasted launch script) would each apply their own retention to the other's
checkpoints and interleave two unrelated histories under one "latest". A :class:`WriterLock` makes the
second writer fail at once with :class:`~savegame.errors.LockedError` naming the holder. The
Checkpointer holds one for its lifetime; readers never need it (the commit protocol already makes
every checkpoint appear all at once).

How it works:

* ``ROOT/.lock`` is opened and locked with ``flock(LOCK_EX | LOCK_NB)``. The kernel releases a flock
  when the last descriptor of its open file goes away, so a holder that crashes (SIGKILL, OOM killer,
  segfault) never leaves a lock behind: there is nothing to time out and no pid to guess.
* The file also holds a line of JSON naming the holder (pid, host, program, start time), written after
  the flock was taken and emptied on a clean release. It is only *information*: the flock decides.
  When we take the lock and the file still names another holder, that holder ended without releasing
  (it crashed): this *stale* record is kept in :attr:`WriterLock.previous` and logged.
* The lock file is never deleted: deleting it would let a third process lock a fresh inode while a
  second one still holds the old one.
* A process forked from the holder (``DataLoader`` workers) inherits the descriptor, and with it a share
  of the flock. The copy is closed in forked children (``os.register_at_fork``), so the lock lives
  exactly as long as the process that took it.
* Filesystems without ``flock`` (Lustre mounted without ``-o flock`` answers ENOSYS, some FUSE
  filesystems) fall back to an exclusively created ``ROOT/.lock.held`` (``link(2)``, atomic on NFS
  too). A crashed holder cannot remove it, so a record naming a dead process of *this* host is
  detected as stale and removed; records of other hosts are reported, never broken.
* Platforms without :mod:`fcntl` (Windows) use that same fallback for every lock (``mode == "link"``),
  so ``import savegame`` and the Checkpointer work there. All writers of one directory must then be on
  such a platform or such a filesystem: a ``flock`` holder and a ``link`` holder do not see each other.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from savegame._util.logs import get_logger
from savegame._util.processes import pid_alive
from savegame._util.safetext import escape_controls
from savegame.errors import LockedError, StorageError

try:
    import fcntl
except ImportError:  # Windows: no flock; every lock is an exclusive lock record (see the module docstring)
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "LockHolder", "ProcessShare", "WriterLock", "read_lock_holder"]

log = get_logger("savegame.run.lock")

LOCK_FILE = ".lock"
"""Name of the lock file inside the checkpoint root (hidden: never listed as a checkpoint)."""

HELD_FILE = ".lock.held"
"""Name of the lock record of the fallback used where ``flock`` is not supported."""

_MAX_RECORD_BYTES = 4096
_NO_FLOCK_ERRNOS = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL})


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) a writer lock, as recorded in the lock file."""

    pid: int
    host: str
    program: str
    since: str
    token: str = ""

    def is_alive(self) -> bool | None:
        """Whether the holder process still runs: None when it is on another host (cannot tell)."""
        if self.host != socket.gethostname():
            return None
        return pid_alive(self.pid)

    def describe(self) -> str:
        """``pid 4242 on host node17 (train.py, since 2026-11-22T08:01:02Z)``."""
        me = " (this process)" if self.pid == os.getpid() and self.host == socket.gethostname() else ""
        return f"pid {self.pid}{me} on host {self.host} ({self.program}, since {self.since})"

    def to_json(self) -> bytes:
        record = {"pid": self.pid, "host": self.host, "program": self.program, "since": self.since,
                  "token": self.token}  # fmt: skip
        return json.dumps(record, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> LockHolder | None:
        """Parse a record; None for an empty file (released cleanly) or one that is not a record."""
        try:
            record = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None
        if not isinstance(record, dict):
            return None
        pid, host = record.get("pid"), record.get("host")
        if type(pid) is not int or not isinstance(host, str):
            return None
        program, since, token = record.get("program", "?"), record.get("since", "?"), record.get("token", "")
        # Anyone can write the file: what is shown in messages and logs has its control characters escaped.
        return cls(pid=pid, host=escape_controls(host[:255]), program=escape_controls(str(program)[:200]),
                   since=escape_controls(str(since)[:40]), token=str(token)[:64])  # fmt: skip


def _program() -> str:
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else sys.executable
    return os.path.basename(argv0) or "python"


def _flock(fd: int, operation: int) -> None:
    """``fcntl.flock`` (a module-level function so tests can simulate filesystems without it)."""
    if fcntl is None:
        raise OSError(errno.ENOSYS, "flock is not available on this platform")
    fcntl.flock(fd, operation)


def _read_record(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return b""
    try:
        return os.read(fd, _MAX_RECORD_BYTES)
    except OSError:
        return b""
    finally:
        os.close(fd)


def read_lock_holder(root: str | os.PathLike[str]) -> LockHolder | None:
    """The holder recorded in ``root``'s lock file(s), or None. Information only: it may be stale."""
    base = os.path.abspath(os.fspath(root))
    for name in (HELD_FILE, LOCK_FILE):
        holder = LockHolder.from_json(_read_record(os.path.join(base, name)))
        if holder is not None:
            return holder
    return None


# Locks held by this process. Strong references: a held lock whose object the caller dropped stays held
# until released or the process ends (never silently released by the garbage collector), and forked
# children still close their copies of its descriptor.
_held: set[WriterLock] = set()


def _close_in_child() -> None:
    for lock in list(_held):
        lock._forget_after_fork()
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class WriterLock:
    """Exclusive writer lock of the checkpoint root ``root`` (see the module docstring).

    ``timeout``: seconds to keep trying while another process holds the lock (0: fail at once).
    ``poll_seconds``: interval between tries.

    Use as a context manager, or call :meth:`acquire` and later :meth:`release` (the Checkpointer holds
    it from construction to ``close``). :meth:`acquire` raises :class:`LockedError` naming the holder.
    Not re-entrant: a second lock on the same root in the same process fails too (two Checkpointers on
    one directory are the same mistake in one process).
    """

    def __init__(self, root: str | os.PathLike[str], *, timeout: float = 0.0, poll_seconds: float = 0.1) -> None:
        if not timeout >= 0 or not poll_seconds > 0:
            from savegame.errors import ConfigError

            raise ConfigError(f"WriterLock: timeout must be >= 0 and poll_seconds > 0, got {timeout}, {poll_seconds}")
        self.root = os.path.abspath(os.fspath(root))
        self.path = os.path.join(self.root, LOCK_FILE)
        self.timeout = float(timeout)
        self.poll_seconds = float(poll_seconds)
        self.previous: LockHolder | None = None
        """A stale record found when the lock was taken: a holder that ended without releasing."""
        self.mode: str | None = None
        """``"flock"`` or ``"link"`` (the fallback) while held, None otherwise."""
        self._fd: int | None = None
        self._token = ""
        self._guard = threading.Lock()

    # -- state ---------------------------------------------------------------------------------------
    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self.mode is not None

    def holder(self) -> LockHolder | None:
        """The holder recorded in the lock file (ourselves while held; may be stale otherwise)."""
        return read_lock_holder(self.root)

    # -- acquire / release ---------------------------------------------------------------------------
    def acquire(self) -> WriterLock:
        """Take the lock (waiting up to ``timeout``); return ``self``. Raises :class:`LockedError`."""
        with self._guard:
            if self.held:
                raise LockedError(f"{self.root}: this WriterLock is already held")
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise StorageError(exc.errno, f"cannot create checkpoint root {self.root}: {exc.strerror}") from exc
            deadline = time.monotonic() + self.timeout
            while True:
                busy = self._try_acquire()
                if busy is None:
                    _held.add(self)
                    return self
                if time.monotonic() >= deadline:
                    raise LockedError(self._locked_message(busy))
                time.sleep(max(0.0, min(self.poll_seconds, deadline - time.monotonic())))

    def _try_acquire(self) -> LockHolder | str | None:
        """One attempt: None on success, else the holder (or a description) that blocks us."""
        self._token = uuid.uuid4().hex
        me = LockHolder(pid=os.getpid(), host=socket.gethostname(), program=_program(),
                        since=_utc_now(), token=self._token)  # fmt: skip
        if fcntl is None:
            return self._try_link(me)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
                         | getattr(os, "O_NOFOLLOW", 0), 0o644)  # fmt: skip
        except OSError as exc:
            raise StorageError(exc.errno, f"cannot open lock file {self.path}: {exc.strerror}") from exc
        try:
            _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return LockHolder.from_json(_read_record(self.path)) or "a process that is just starting"
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _NO_FLOCK_ERRNOS:
                raise StorageError(exc.errno, f"cannot lock {self.path}: {exc.strerror}") from exc
            log.info("flock is not supported on %s (%s): using an exclusive lock record", self.root, exc)
            return self._try_link(me)
        stale = LockHolder.from_json(_read_record(self.path))
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, me.to_json(), 0)
        except OSError as exc:
            _flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise StorageError(exc.errno, f"cannot write lock file {self.path}: {exc.strerror}") from exc
        self._fd, self.mode = fd, "flock"
        self._note_stale(stale)
        return None

    def _try_link(self, me: LockHolder) -> LockHolder | str | None:
        """Fallback without flock: create ``.lock.held`` exclusively (``link``), break stale records."""
        held = os.path.join(self.root, HELD_FILE)
        for _ in range(3):
            tmp = os.path.join(self.root, f"{HELD_FILE}.tmp-{me.token}")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
                try:
                    os.write(fd, me.to_json())
                    os.fsync(fd)
                finally:
                    os.close(fd)
                try:
                    os.link(tmp, held)
                    self.mode = "link"
                    return None
                except FileExistsError:
                    pass
            except OSError as exc:
                raise StorageError(exc.errno, f"cannot create lock record {held}: {exc.strerror}") from exc
            finally:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            holder = LockHolder.from_json(_read_record(held))
            if holder is None or holder.is_alive() is not False:
                return holder or "an unreadable lock record (remove .lock.held if no writer runs)"
            # The holder was on this host and is dead: move its record away (only one process wins).
            grave = os.path.join(self.root, f"{HELD_FILE}.stale-{me.token}")
            try:
                os.rename(held, grave)
            except FileNotFoundError:
                continue  # someone else broke it first: try again
            moved = LockHolder.from_json(_read_record(grave))
            os.unlink(grave)
            if moved is not None and moved != holder:
                log.warning("%s: a lock record changed while breaking a stale one; retrying", self.root)
            self._note_stale(holder)
        return "a lock record that keeps reappearing"

    def _note_stale(self, stale: LockHolder | None) -> None:
        if stale is None or (stale.pid == os.getpid() and stale.host == socket.gethostname()):
            self.previous = None
            return
        self.previous = stale
        log.warning(
            "savegame: took over the writer lock of %s: the previous writer, %s, ended without releasing "
            "it (crashed or killed); its unfinished saves are cleaned up as usual",
            self.root,
            stale.describe(),
        )

    def _locked_message(self, busy: LockHolder | str) -> str:
        if isinstance(busy, str):
            who = busy
        else:
            who = busy.describe()
            if busy.is_alive() is False:
                who += (
                    "; that process has exited, but a process it started (e.g. a DataLoader worker) still "
                    "holds the lock"
                )
        return (
            f"{self.root} is locked by another writer: {who}. Only one process may write a checkpoint "
            "directory at a time (a Checkpointer holds the lock until it is closed); stop the other "
            "writer or use another directory"
        )

    def release(self) -> None:
        """Release the lock (clearing the record); a no-op when not held."""
        with self._guard:
            _held.discard(self)
            mode, self.mode = self.mode, None
            if mode == "flock" and self._fd is not None:
                fd, self._fd = self._fd, None
                try:
                    os.ftruncate(fd, 0)
                except OSError:
                    pass
                try:
                    _flock(fd, fcntl.LOCK_UN)
                finally:
                    os.close(fd)
            elif mode == "link":
                held = os.path.join(self.root, HELD_FILE)
                record = LockHolder.from_json(_read_record(held))
                if record is not None and record.token == self._token:
                    try:
                        os.unlink(held)
                    except FileNotFoundError:
                        pass

    def _forget_after_fork(self) -> None:
        """In a forked child: drop our copy of the descriptor without unlocking the parent's lock."""
        fd, self._fd = self._fd, None
        self.mode = None
        self._guard = threading.Lock()
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"WriterLock({self.root!r}, held={self.held})"


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ProcessShare:
    """This process's share of the writer lock of ``root``: the first share takes the
    :class:`WriterLock`, the last one released gives it back.

    The lock keeps *other processes* out. Within one process, a second Checkpointer on the same
    directory is a restart (a notebook cell run again, a test resuming) rather than a rival writer, and
    the first one is often still referenced when the second is built; so they share the lock instead
    of failing. ``release`` is idempotent.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.realpath(os.fspath(root))
        self._released = False
        with _shares_guard:
            entry = _shares.get(self.root)
            if entry is None:
                entry = [WriterLock(self.root).acquire(), 0]
                _shares[self.root] = entry
            entry[1] += 1

    @property
    def lock(self) -> WriterLock:
        """The process's lock on ``root``."""
        lock: WriterLock = _shares[self.root][0]
        return lock

    def release(self) -> None:
        """Give this share back (the lock is released with the last share)."""
        with _shares_guard:
            if self._released:
                return
            self._released = True
            entry = _shares.get(self.root)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del _shares[self.root]
                entry[0].release()

    def __repr__(self) -> str:
        return f"ProcessShare({self.root!r}, released={self._released})"


_shares: dict[str, list[Any]] = {}
# Re-entrant: a garbage collection inside the guarded block (taking a lock allocates) may finalize an
# unreachable Checkpointer whose __del__ releases its share in the same thread; with a plain Lock that
# deadlocked. The nested release only ever touches another root or an already released share.
_shares_guard = threading.RLock()


def process_holds(root: str | os.PathLike[str]) -> bool:
    """Whether this process holds the writer lock of ``root`` through a :class:`ProcessShare`.

    A Checkpointer made with ``lock=False`` inside code that holds the lock (the Keras callbacks hold it
    for the whole of ``fit``) acts for the owner: it may quarantine damaged checkpoints."""
    with _shares_guard:
        return os.path.realpath(os.fspath(root)) in _shares


def _forget_shares_in_child() -> None:
    _shares.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_shares_in_child)
