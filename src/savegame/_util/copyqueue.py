"""Host copies of a background save's snapshot, run on a worker thread while the state is still walked.

A background save blocks training for the snapshot: walking the state (Python, a few microseconds per
tensor) and copying every tensor into reused host buffers (memory bandwidth). ``Tensor.copy_`` releases
the GIL, so a worker thread copies batch *k* while the caller encodes the tensors of batch *k+1*; the
snapshot then costs about the larger of the two instead of their sum. :meth:`CopyQueue.wait` returns
only when every copy is done (the save call returns after it, so the live tensors may change at once).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from savegame._util.workers import LazyPool

_BATCH_BYTES = 8 << 20
"""Copies are handed to the worker in batches of about this many bytes (one handoff per batch)."""
_BATCH_COUNT = 256

_copier = LazyPool("savegame-snapshot", 1)


def snapshot_pool() -> ThreadPoolExecutor:
    """The one snapshot worker thread (FIFO): eager copies of a save, then its lazy ones
    (:mod:`savegame.engine.lazy`)."""
    return _copier.get()


def _run(batch: list[tuple[Any, Any]]) -> None:
    for dest, src in batch:
        dest.copy_(src)


class CopyQueue:
    """Collects ``dest.copy_(src)`` calls and runs them, in batches, on the snapshot worker thread."""

    def __init__(self) -> None:
        self._batch: list[tuple[Any, Any]] = []
        self._bytes = 0
        self._futures: list[Future[None]] = []

    def add(self, dest: Any, src: Any, nbytes: int) -> None:
        """Schedule ``dest.copy_(src)``; neither may be used until :meth:`wait` returned."""
        self._batch.append((dest, src))
        self._bytes += nbytes
        if self._bytes >= _BATCH_BYTES or len(self._batch) >= _BATCH_COUNT:
            self.flush()

    def run(self, job: Callable[[], None]) -> None:
        """Run ``job`` (a copy of many tensors in one call, e.g. a ``torch.stack`` into a snapshot buffer)
        on the worker if it has finished everything handed to it so far, else here and now; what ``job``
        reads and writes may not be used until :meth:`wait` returned.

        A worker still busy is one that did not get a CPU or the GIL (it takes the GIL to start and to
        end each job, and waits up to the interpreter's switch interval for it while the caller runs
        Python): handing it more would only make :meth:`wait` wait for a longer backlog at the end."""
        if self._futures and not self._futures[-1].done():
            job()
            return
        self.flush()
        self._futures.append(_copier.get().submit(job))

    def flush(self) -> None:
        """Hand what is queued to the worker now (without waiting)."""
        if self._batch:
            self._futures.append(_copier.get().submit(_run, self._batch))
            self._batch = []
            self._bytes = 0

    def wait(self) -> None:
        """Run what is still queued and wait for every copy; raise the first error, after all finished."""
        self.flush()
        first: BaseException | None = None
        for future in self._futures:
            try:
                future.result()
            except BaseException as exc:  # re-raised below, once no copy is running any more
                first = first or exc
        self._futures = []
        if first is not None:
            raise first
