"""How long saves took, recorded in each checkpoint's progress so ``savegame ls`` and ``savegame stats``
can show it from the files alone (no format change: one more key, ``timing``, in the ``progress`` dict
of the manifest, which readers that do not know it ignore)::

    "timing": {"started": 1796170616.24, "blocking": 0.012, "stalled": 3.4, "elapsed": 1210.5, "saves": 11}

* ``started``: when the save call began (unix seconds);
* ``blocking``: how long the save blocked training, for a background save (the snapshot and waiting for
  the previous save); None for a synchronous save, which blocks until it is durable (its blocking time
  is its durable time);
* ``stalled``: the seconds the run's *earlier* saves blocked training, summed over the run (across
  restarts: a resumed run continues the sum of the checkpoint it continues);
* ``elapsed``: the run's training time before this save began (see below);
* ``saves``: how many saves of the run came before this one.

The **durable time** of a checkpoint is read as ``created - started``: from the save call's start to
the manifest's creation time, the commit's last step (its final fsyncs and rename are not included:
a manifest cannot record the moment it is itself made durable). Old checkpoints have no ``timing``.

The **training time** of a run is the wall-clock time its Checkpointers were open (from construction)
up to its newest commit, summed over the run's sessions: a resumed session starts from the training
time recorded up to the checkpoint it resumed from, so time the run was down (between a crash and its
resume) and the work lost after the last commit of a crashed session are not counted. The **stall
time** is the sum of every save's blocking time over the run; their ratio is the share of training
time spent blocked in saves. Each save's ``stalled`` adds the exact blocking time of the session's
earlier saves (what the save call returned as ``SaveResult.seconds``); the newest save of a session
counts with what its own manifest records (a synchronous one up to its manifest: its commit's last
fsync and the retention after it are left out, the next save of the session would have counted them).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from savegame.run.index import IndexEntry

__all__ = ["RecordedTiming", "RunClock", "recorded_timing"]

TIMING_KEY = "timing"


def _seconds(value: object) -> float | None:
    """A finite non-negative number from untrusted progress, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None


@dataclass(frozen=True)
class RecordedTiming:
    """The timings a checkpoint's manifest records (see the module docstring)."""

    started: float
    blocking: float | None
    stalled: float
    elapsed: float
    saves: int
    created: float

    @property
    def durable(self) -> float:
        """Seconds from the save's start to its manifest (its commit)."""
        return max(0.0, self.created - self.started)

    @property
    def blocked(self) -> float:
        """Seconds the save blocked training (a synchronous save: until durable)."""
        return self.blocking if self.blocking is not None else self.durable

    @property
    def run_training(self) -> float:
        """The run's training time up to this checkpoint's commit."""
        return self.elapsed + self.durable

    @property
    def run_stalled(self) -> float:
        """The run's stall time including this save."""
        return self.stalled + self.blocked


def recorded_timing(progress: object, created: float) -> RecordedTiming | None:
    """The timing recorded in a manifest's (untrusted) ``progress``, or None (none, or malformed)."""
    if not isinstance(progress, Mapping):
        return None
    raw = progress.get(TIMING_KEY)
    if not isinstance(raw, Mapping):
        return None
    started, stalled, elapsed = (_seconds(raw.get(k)) for k in ("started", "stalled", "elapsed"))
    saves = raw.get("saves")
    if started is None or stalled is None or elapsed is None or isinstance(saves, bool) or not isinstance(saves, int):
        return None
    blocking = _seconds(raw.get("blocking")) if raw.get("blocking") is not None else None
    if raw.get("blocking") is not None and blocking is None:
        return None
    return RecordedTiming(started, blocking, stalled, elapsed, max(saves, 0), created)


def entry_timing(entry: IndexEntry) -> RecordedTiming | None:
    """The recorded timing of an index entry."""
    return recorded_timing(entry.manifest.progress, entry.created)


class RunClock:
    """The running sums of one Checkpointer's run (stall time, training time, saves) for the ``timing``
    it records; a session continues the sums of the run's newest checkpoint it finds at its first save."""

    def __init__(self) -> None:
        self.opened = time.monotonic()
        self._base: tuple[float, float, int] | None = None  # (training, stalled, saves) before this session
        self.stalled_here = 0.0
        self.saves_here = 0

    def begin(self, run_entries: Iterable[IndexEntry]) -> None:
        """Take the run's sums from the newest of ``run_entries`` with a timing (first save only)."""
        if self._base is not None:
            return
        base = (0.0, 0.0, 0)
        for entry in reversed(list(run_entries)):
            timing = entry_timing(entry)
            if timing is not None:
                base = (timing.run_training, timing.run_stalled, timing.saves + 1)
                break
        self._base = base

    def record(self, *, started_wall: float, started_mono: float, blocking: float | None) -> dict[str, Any]:
        """The ``timing`` of a save that began at ``started_*`` (``blocking`` for background saves)."""
        training, stalled, saves = self._base or (0.0, 0.0, 0)
        return {
            "started": started_wall,
            "blocking": blocking,
            "stalled": stalled + self.stalled_here,
            "elapsed": training + max(0.0, started_mono - self.opened),
            "saves": saves + self.saves_here,
        }

    def finished(self, blocked: float) -> None:
        """A save of this session blocked training for ``blocked`` seconds."""
        self.stalled_here += blocked
        self.saves_here += 1
