"""Paced writes: spread the write of one background save over time so it does not starve compute.

A background save at full speed bursts: the kernel copies of ``write()``, the hashing and the disk's
writeback all land in a fraction of a training step and compete with it for the CPUs and the disk. A
:class:`Pacer` with ``rate`` bytes per second lets the persist thread write at most that fast: before
each write of at most :data:`CHUNK_BYTES` it sleeps until the bytes already written are due at
``rate``. It never builds up credit (a write that fell behind the schedule starts the schedule anew
from now), so a slow disk never turns into a later burst.

Pacing never costs the last state: the moment anybody waits for the save (``close()``, ``wait()``, a
preemption or SIGTERM save, the next save under ``if_busy="wait"``, the interpreter's exit),
:meth:`Pacer.hurry` is called and the rest is written at full speed (:mod:`savegame.engine.background`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

CHUNK_BYTES = 4 << 20
"""The largest write a paced save issues at once (the 64 MiB slices of large tensors are split)."""

MAX_SLEEP = 3600.0
"""The longest single sleep of a pacer, in seconds: a longer one is made of several. (A very low rate
would otherwise ask for a wait longer than the platform's timeouts can express, and the save failed.)"""


class Pacer:
    """Paces the writes of one save at ``rate`` bytes per second until :meth:`hurry` is called.

    ``clock`` (seconds, monotonic) and ``sleep`` (waits the given seconds; returns True when woken
    early by :meth:`hurry`) are injectable for tests; by default the real monotonic clock and a wait on
    the hurry event."""

    def __init__(
        self, rate: float, *, clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], bool] | None = None, chunk_bytes: int = CHUNK_BYTES,
    ) -> None:  # fmt: skip
        if not rate > 0:
            raise ValueError(f"Pacer: rate must be > 0 bytes/s, got {rate!r}")
        self.rate = float(rate)
        self.chunk_bytes = int(chunk_bytes)
        self._clock = clock
        self._hurry = threading.Event()
        self._sleep = sleep if sleep is not None else self._hurry.wait
        self._next: float | None = None
        self.slept = 0.0
        """Seconds this pacer asked to sleep so far (what pacing added to the write)."""

    @property
    def hurried(self) -> bool:
        return self._hurry.is_set()

    def hurry(self) -> None:
        """Stop pacing: the rest of the save is written at full speed (and a sleep in progress ends now)."""
        self._hurry.set()

    def before(self, nbytes: int) -> None:
        """Called before writing ``nbytes``: sleep until they are due at the rate, then schedule the next."""
        if self._hurry.is_set():
            return
        now = self._clock()
        due = now if self._next is None else self._next
        if due > now:
            self.slept += due - now
            while due > now:  # in sleeps of at most MAX_SLEEP
                if self._sleep(min(due - now, MAX_SLEEP)):
                    return  # hurried while sleeping
                now = self._clock()
            now = due
        self._next = max(due, now) + nbytes / self.rate

    def chunks(self, data: bytes | bytearray | memoryview) -> list[memoryview]:
        """``data`` in slices of at most :attr:`chunk_bytes` (views, no copies)."""
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        n = view.nbytes
        return [view[i : i + self.chunk_bytes] for i in range(0, n, self.chunk_bytes)] or [view]
