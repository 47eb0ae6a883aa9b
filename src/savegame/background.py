"""Snapshot-then-persist: block training only for a copy to host memory, write in a background thread.

The two phases (as in CheckFreq and ``torch.distributed.checkpoint.async_save``):

1. **snapshot** (caller's thread, blocking): capture and encode the state with ``copy=True``: every array is
   copied into host buffers owned by the save (on CUDA: pinned buffers filled with non-blocking copies,
   then one synchronize). When this returns, the live model may change freely: nothing it does can
   change what is written.
2. **persist** (one background thread): stream the buffers into the tensor files, commit with the
   manifest last. The checkpoint becomes visible ("latest" advances) only when the commit is done.

At most one save is in flight per :class:`BackgroundWriter`: a new save first waits for the previous
one, so host memory is bounded by one snapshot. Buffers of a finished save are reused by the next one
when sizes match (:class:`BufferPool`), so steady-state saving allocates nothing. An error in the
background is logged when it happens and raised (as :class:`BackgroundSaveError`) by the handle's
``result()`` and by the writer's next ``submit``/``wait``/``close``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import BackgroundSaveError

log = logging.getLogger("savegame")


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
            import torch

            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
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


class PendingSave:
    """Handle of a background save: ``result()`` waits for the durable commit and returns its value."""

    def __init__(self, future: Future[Any], *, path: str, blocking_seconds: float) -> None:
        self._future = future
        self.path = path
        self.blocking_seconds = blocking_seconds
        """How long the caller was blocked (the snapshot)."""

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the save to be committed; raise :class:`BackgroundSaveError` if it failed."""
        try:
            return self._future.result(timeout)
        except BackgroundSaveError:
            raise
        except TimeoutError:
            raise
        except BaseException as exc:
            raise BackgroundSaveError(f"background save of {self.path} failed: {exc}") from exc

    def wait(self, timeout: float | None = None) -> Any:
        """Alias of :meth:`result`."""
        return self.result(timeout)

    def exception(self) -> BaseException | None:
        return self._future.exception() if self._future.done() else None


class BackgroundWriter:
    """Runs persist jobs one at a time on a daemon thread; at most one job in flight."""

    def __init__(self, *, name: str = "savegame-writer") -> None:
        self.pool = BufferPool()
        self._name = name
        self._current: PendingSave | None = None
        self._unreported: BaseException | None = None
        self._lock = threading.Lock()
        self._closed = False

    def wait(self) -> None:
        """Wait for the save in flight; raise its error if it failed and was not reported yet."""
        current = self._current
        if current is not None:
            try:
                current.result()
            except BaseException:
                pass
        self._raise_unreported()

    def _raise_unreported(self) -> None:
        with self._lock:
            exc, self._unreported = self._unreported, None
        if exc is not None:
            if isinstance(exc, BackgroundSaveError):
                raise exc
            raise BackgroundSaveError(f"a background save failed: {exc}") from exc

    def submit(
        self, path: str, snapshot: Snapshot, job: Callable[[], Any], *, blocking_seconds: float
    ) -> PendingSave:
        """Start ``job`` (the persist phase) after the previous one finished; return its handle.

        The caller must have called :meth:`wait` before taking the snapshot (so buffers are free).
        """
        if self._closed:
            snapshot.release()
            raise BackgroundSaveError("the background writer is closed")
        future: Future[Any] = Future()
        pending = PendingSave(future, path=path, blocking_seconds=blocking_seconds)

        def run() -> None:
            # The buffers go back to the pool *before* the handle completes: the next save waits for the
            # handle and then takes its snapshot, which must find them there (warm, already faulted-in
            # memory) rather than race the release and allocate fresh ones.
            start = time.perf_counter()
            try:
                result = job()
            except BaseException as exc:
                snapshot.release()
                log.error("background save of %s failed: %s", path, exc)
                with self._lock:
                    self._unreported = exc
                future.set_exception(exc)
            else:
                snapshot.release()
                log.debug("background save of %s committed in %.3f s", path, time.perf_counter() - start)
                future.set_result(result)

        self._current = pending
        threading.Thread(target=run, name=self._name, daemon=True).start()
        return pending

    def report_consumed(self, pending: PendingSave) -> None:
        """The caller saw ``pending``'s error through its handle: do not raise it again later."""
        with self._lock:
            if pending.exception() is self._unreported:
                self._unreported = None

    def close(self) -> None:
        """Wait for the last save and raise its error if unreported; further submits fail."""
        try:
            self.wait()
        finally:
            self._closed = True
            self.pool.clear()


_default_writer: BackgroundWriter | None = None
_default_lock = threading.Lock()


def default_writer() -> BackgroundWriter:
    """The process-wide writer used by ``savegame.save(..., background=True)``."""
    global _default_writer
    with _default_lock:
        if _default_writer is None:
            _default_writer = BackgroundWriter()
        return _default_writer
