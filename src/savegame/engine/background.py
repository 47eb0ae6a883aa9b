"""Snapshot-then-persist: block training only for a copy to host memory, write in a background thread.

The two phases (as in CheckFreq and ``torch.distributed.checkpoint.async_save``):

1. **snapshot** (caller's thread, blocking): capture and encode the state with ``copy=True``: every array is
   copied into host buffers owned by the save (on CUDA: pinned buffers filled with non-blocking copies,
   then one synchronize). When this returns, the live model may change freely: nothing it does can
   change what is written.
2. **persist** (one background thread): stream the buffers into the tensor files, commit with the
   manifest last. The checkpoint becomes visible ("latest" advances) only when the commit is done.

At most one save is in flight per :class:`BackgroundWriter`: a new save first waits for the previous
one, so host memory is bounded by one snapshot (a Checkpointer with ``if_busy="skip"`` does not even
ask while one is in flight: :mod:`savegame.run.saving`). Buffers of a finished save are reused by the next one
when sizes match (:class:`BufferPool`), so steady-state saving allocates nothing. An error in the
background is logged when it happens and raised (as :class:`BackgroundSaveError`) by the handle's
``result()``; an error nobody collected through the handle is raised by the writer's next
``submit``/``wait``/``close`` instead (once: an error ``result()`` delivered is not raised again).

**At interpreter exit** (the end of the script, an uncaught exception or ``KeyboardInterrupt``) a save
still in flight is finished before the process goes (its writer thread is a daemon, which the
interpreter would otherwise kill mid-write, losing the checkpoint and leaving its staging folder), with
a line on stderr saying so; a second Ctrl-C then aborts it cleanly (the staging folder is removed). A
failed save whose error nobody collected is reported on stderr. Nothing is lost silently.

**Priority.** A writer made with ``nice=N`` lowers the scheduling priority of each of its persist threads
by ``N`` (Linux, where ``setpriority`` applies to one thread; elsewhere nothing happens), so the write
competes less with the training thread for the CPUs. Threads of the process-wide I/O and hashing pools
that such a thread starts inherit its priority (Linux threads inherit the nice value of their creator).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from savegame._util.logs import get_logger
from savegame.errors import BackgroundSaveError

log = get_logger("savegame")


class BufferPool:
    """Reusable host buffers for snapshots, keyed by size (and pinned-ness).

    ``take`` hands out a buffer from the previous snapshot of the same size, or a new one; ``recycle``
    returns all buffers of a finished snapshot. Only one snapshot is in flight, so buffers are never
    shared between two live snapshots.
    """

    def __init__(self) -> None:
        self._free: dict[tuple[int, bool], list[Any]] = defaultdict(list)
        self._lock = threading.Lock()

    def take(self, nbytes: int, *, pinned: bool = False) -> Any:
        with self._lock:
            free = self._free.get((nbytes, pinned))
            if free:
                return free.pop()
        if pinned:
            from savegame.adapters.torch import pinned_bytes

            return pinned_bytes(nbytes)
        return np.empty(nbytes, dtype=np.uint8)

    def recycle(self, buffers: list[tuple[int, bool, Any]]) -> None:
        with self._lock:
            for nbytes, pinned, buf in buffers:
                self._free[(nbytes, pinned)].append(buf)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


@dataclass
class Snapshot:
    """Buffers taken for one save; given back to the pool when the save is done."""

    pool: BufferPool
    buffers: list[tuple[int, bool, Any]] = field(default_factory=list)
    needs_sync: bool = False

    def take(self, nbytes: int, pinned: bool = False) -> Any:
        buf = self.pool.take(nbytes, pinned=pinned)
        self.buffers.append((nbytes, pinned, buf))
        return buf

    def release(self) -> None:
        self.pool.recycle(self.buffers)
        self.buffers = []


Settle = Callable[[float | None], None]
"""What every wait for a background save calls first, on the waiting thread, with the wait's timeout (None:
no limit); it raises ``TimeoutError`` if it could not do its part within it (:class:`PendingSave`)."""


class PendingSave:
    """Handle of a background save: ``result()`` waits for the durable commit and returns its value."""

    def __init__(
        self, future: Future[Any], *, path: str, blocking_seconds: float,
        on_delivered: Callable[[BaseException], None] | None = None, settle: Settle | None = None,
        poll: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        self._future = future
        self._poll = poll
        """Called by :meth:`poll` (a lazy snapshot confirms copies that are done)."""
        self._settle = settle
        """Called before any wait for the save (a lazy snapshot confirms its copies on the waiting thread:
        :mod:`savegame.engine.lazy`)."""
        self.path = path
        self.blocking_seconds = blocking_seconds
        """How long the caller was blocked (the snapshot)."""
        self._on_delivered = on_delivered
        self._delivered_once = False
        self.finished_at: float | None = None
        """``time.perf_counter()`` when the persist job returned (the commit was durable), or None."""

    @property
    def delivered(self) -> bool:
        """Whether this save's error was delivered through :meth:`result` or :meth:`exception` already."""
        return self._delivered_once

    def done(self) -> bool:
        return self._future.done()

    def poll(self) -> bool:
        """:meth:`done`, after letting the save move on without waiting: a lazy snapshot whose copies are
        done is confirmed on the calling thread (the training thread; see :mod:`savegame.engine.lazy`).
        Unlike a wait, it does not hurry a paced write."""
        if self._poll is not None:
            self._poll()
        return self.done()

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the save to be committed; raise :class:`BackgroundSaveError` if it failed.

        The error is then delivered: the writer's next save does not raise it again. ``TimeoutError``
        (not done within ``timeout``) and an interrupt of the wait itself (``KeyboardInterrupt``) are
        raised as they are: the save goes on.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._settle is not None:
            self._settle(timeout)
        exc = self._future.exception(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if exc is None:
            return self._future.result()
        self._delivered(exc)
        if isinstance(exc, BackgroundSaveError):
            raise exc
        raise BackgroundSaveError(f"background save of {self.path} failed: {exc}") from exc

    def wait(self, timeout: float | None = None) -> Any:
        """Alias of :meth:`result`."""
        return self.result(timeout)

    def exception(self) -> BaseException | None:
        """The error of a finished, failed save (delivered: not raised again by the writer), else None."""
        exc = self._future.exception() if self._future.done() else None
        if exc is not None:
            self._delivered(exc)
        return exc

    def _delivered(self, exc: BaseException) -> None:
        self._delivered_once = True
        if self._on_delivered is not None:
            self._on_delivered(exc)

    def _settled_and_delivered(self) -> None:
        """Wait for the save to finish and mark its error delivered: the caller raises it itself (a lazy
        snapshot's step hook)."""
        self._settled()
        self.exception()

    def _settled(self) -> None:
        """Block until the save finished, successfully or not (raises nothing of the save's own)."""
        if self._settle is not None:
            self._settle(None)
        self._future.exception()


class BackgroundWriter:
    """Runs persist jobs one at a time on a daemon thread; at most one job in flight.

    Every writer that ever started a save is finished at interpreter exit (see the module docstring).
    """

    def __init__(self, *, name: str = "savegame-writer", nice: int | None = None) -> None:
        self.pool = BufferPool()
        self._name = name
        self.nice = nice
        """Added to the nice value of each persist thread (None or 0: unchanged); see the module docstring."""
        self._current: PendingSave | None = None
        self._thread: threading.Thread | None = None  # the thread of the latest save
        self._unreported: tuple[str, BaseException] | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()

    def stop_requested(self) -> bool:
        """Whether the save in flight should give up (at exit, after a second Ctrl-C): the persist job
        checks this between writes and aborts its transaction."""
        return self._stop.is_set()

    def wait(self) -> None:
        """Wait for the save in flight; raise its error if it failed and nobody collected it yet.

        An interrupt of the wait (``KeyboardInterrupt``) propagates; the save goes on (and is finished at
        interpreter exit at the latest).
        """
        current = self._current
        if current is not None:
            current._settled()
        self._raise_unreported()

    def _raise_unreported(self) -> None:
        with self._lock:
            unreported, self._unreported = self._unreported, None
        if unreported is not None:
            exc = unreported[1]
            if isinstance(exc, BackgroundSaveError):
                raise exc
            raise BackgroundSaveError(f"a background save of {unreported[0]} failed: {exc}") from exc

    def submit(
        self, path: str, snapshot: Snapshot, job: Callable[[], Any], *, blocking_seconds: float,
        settle: Settle | None = None, poll: Callable[[], None] | None = None,
    ) -> PendingSave:
        """Start ``job`` (the persist phase) after the previous one finished; return its handle.

        The caller must have called :meth:`wait` before taking the snapshot (so buffers are free).
        ``settle``: called by every wait for this save, on the waiting thread, before it blocks (see
        :class:`PendingSave`). ``poll``: called by the handle's :meth:`~PendingSave.poll`.
        """
        if self._closed:
            if settle is not None:
                settle(None)  # no copy may still write into the buffers handed back
            snapshot.release()
            raise BackgroundSaveError("the background writer is closed")
        future: Future[Any] = Future()
        pending = PendingSave(
            future, path=path, blocking_seconds=blocking_seconds, on_delivered=self._consume, settle=settle,
            poll=poll,
        )

        def run() -> None:
            # The buffers go back to the pool *before* the handle completes: the next save waits for the
            # handle and then takes its snapshot, which must find them there (warm, already faulted-in
            # memory) rather than race the release and allocate fresh ones.
            # Wait (GIL released) until the caller is back from Thread.start(): it then returns from the
            # save at once instead of waiting a switch interval (5 ms or more) for this job's Python work.
            # The job (and the encoded items, tensors included, it holds) is dropped here before the handle
            # completes: freed by this daemon thread after that, while the interpreter shuts down (the caller
            # returned from result() and exited), a torch tensor's deallocator takes the GIL during
            # finalization and the process aborts (SIGABRT, "terminate called without an active exception").
            nonlocal job
            started.wait()
            start = time.perf_counter()
            lower_thread_priority(self.nice)
            try:
                result = job()
            except BaseException as exc:
                job = _done_job
                snapshot.release()
                if self._stop.is_set():  # aborted on request at exit: finish_at_exit says so
                    log.info("background save of %s aborted: %s", path, exc)
                else:
                    log.error("background save of %s failed: %s", path, exc)
                with self._lock:
                    self._unreported = (path, exc)
                future.set_exception(exc)
            else:
                job = _done_job
                pending.finished_at = time.perf_counter()
                snapshot.release()
                log.debug("background save of %s committed in %.3f s", path, time.perf_counter() - start)
                future.set_result(result)

        _finish_at_exit(self)
        self._stop.clear()
        previous, self._current = self._current, pending
        started = threading.Event()
        try:
            thread = threading.Thread(target=run, name=self._name, daemon=True)
            thread.start()
            self._thread = thread
        except Exception as exc:  # no thread was started (e.g. the process may start no more): nothing in flight
            self._current = previous
            if settle is not None:
                settle(None)  # no copy may still write into the buffers handed back
            snapshot.release()
            raise BackgroundSaveError(f"could not start the background writer for {path}: {exc}") from exc
        finally:
            # Also when an interrupt (Ctrl-C) lands in start() or just after it: the thread runs, and must
            # not wait for this event forever (every later wait, the one at exit included, would hang).
            started.set()
        return pending

    def _consume(self, exc: BaseException) -> None:
        """A handle delivered ``exc`` to the caller: the writer does not raise it again."""
        with self._lock:
            if self._unreported is not None and self._unreported[1] is exc:
                self._unreported = None

    def report_consumed(self, pending: PendingSave) -> None:
        """The caller saw ``pending``'s error through its handle: do not raise it again later."""
        pending.exception()

    def close(self) -> None:
        """Wait for the last save and raise its error if unreported; further submits fail."""
        try:
            self.wait()
        finally:
            self._closed = True
            self.pool.clear()

    def finish_at_exit(self, stream: TextIO) -> None:
        """Finish the save in flight (a second Ctrl-C aborts it), report an uncollected error on ``stream``."""
        current = self._current
        if current is not None and not current.done():
            _say(stream, f"savegame: finishing the background save of {current.path} before exiting "
                         "(Ctrl-C again to abort it)")  # fmt: skip
            try:
                current._settled()
            except KeyboardInterrupt:
                self._stop.set()
                current._settled()  # the persist job stops at its next write and removes its staging data
                if current.exception() is not None:
                    _say(stream, f"savegame: aborted the background save of {current.path}: nothing was saved "
                                 "there (earlier checkpoints are unchanged)")  # fmt: skip
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=_EXIT_JOIN_SECONDS)  # its last references go before the interpreter does
        with self._lock:
            unreported, self._unreported = self._unreported, None
        if unreported is not None:
            path, exc = unreported
            _say(stream, f"savegame: the background save of {path} failed, nothing was saved there: {exc}")

    def _forget_in_child(self) -> None:
        """After ``fork``: the child has no writer thread, so the parent's save in flight never completes
        here; forget it (a later save in the child would wait for it forever) and any lock its thread held."""
        self._lock = threading.Lock()
        self._current = None
        self._unreported = None
        self._thread = None
        self._stop = threading.Event()


def lower_thread_priority(nice: int | None) -> bool:
    """Add ``nice`` to the calling thread's nice value where the OS has per-thread priorities (Linux);
    return whether it was applied. Never raises: a lower priority is a wish, not a requirement."""
    if not nice:
        return False
    get_id = getattr(threading, "get_native_id", None)
    if not sys.platform.startswith("linux") or get_id is None or not hasattr(os, "setpriority"):
        return False
    try:
        tid = get_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:  # e.g. a sandbox forbidding setpriority: write at normal priority
        log.debug("could not lower the priority of the writer thread: %s", exc)
        return False
    return True


def _say(stream: TextIO, line: str) -> None:
    try:
        print(line, file=stream, flush=True)
    except (OSError, ValueError):  # stderr closed or gone: nothing more can be done
        pass


_writers: weakref.WeakSet[BackgroundWriter] = weakref.WeakSet()
_exit_hook_lock = threading.Lock()
_exit_hook_installed = False
_exit_callbacks: list[Callable[[], None]] = []


def _finish_at_exit(writer: BackgroundWriter) -> None:
    """Have ``writer`` finished at interpreter exit, before thread pools stop taking work.

    ``threading._register_atexit`` hooks run when the main thread ends, before non-daemon threads are
    joined and before :mod:`atexit` handlers; they run in reverse order of registration, so this one
    (registered after ``concurrent.futures`` registered its own) runs while the fsync and hashing pools
    the save needs still accept work. ``atexit`` is the fallback where that hook does not exist.
    """
    _writers.add(writer)
    _install_exit_hook()


def close_at_exit(callback: Callable[[], None]) -> None:
    """Call ``callback`` at interpreter exit, after the background saves in flight were finished.

    The Checkpointer registers one such callback so that a Checkpointer never closed still gets its
    last background save integrated (retention, mirror upload) at exit; an error it raises is printed
    on stderr."""
    _exit_callbacks.append(callback)
    _install_exit_hook()


def _install_exit_hook() -> None:
    global _exit_hook_installed
    with _exit_hook_lock:
        if _exit_hook_installed:
            return
        import concurrent.futures.thread  # noqa: F401  (its exit hook must be registered before ours)

        register = getattr(threading, "_register_atexit", None)
        try:
            if register is None:
                raise RuntimeError("no threading._register_atexit")
            register(_finish_all_at_exit)
        except RuntimeError:  # missing, or the interpreter is already shutting down
            import atexit

            atexit.register(_finish_all_at_exit)
        _exit_hook_installed = True


def _forget_writers_after_fork() -> None:
    """A forked child has none of its parent's writer threads: never wait for their saves (at its exit,
    or before its own first save)."""
    global _writers
    for writer in list(_writers):
        writer._forget_in_child()
    _writers = weakref.WeakSet()


def _done_job() -> None:
    """What a finished save's thread keeps in place of its job (whose items it must not free itself)."""


_EXIT_JOIN_SECONDS = 10.0
"""How long the exit hook waits for a finished save's thread to end once its handle completed."""


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_writers_after_fork)


def _finish_all_at_exit() -> None:
    for writer in list(_writers):
        writer.finish_at_exit(sys.stderr)
    for callback in list(_exit_callbacks):
        try:
            callback()
        except Exception as exc:  # at exit there is no caller left to raise to: say it
            _say(sys.stderr, f"savegame: at exit: {exc}")


_default_writer: BackgroundWriter | None = None
_default_lock = threading.Lock()


def default_writer() -> BackgroundWriter:
    """The process-wide writer used by ``savegame.save(..., background=True)``."""
    global _default_writer
    with _default_lock:
        if _default_writer is None:
            _default_writer = BackgroundWriter()
        return _default_writer
