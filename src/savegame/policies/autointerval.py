"""``every="auto"``: a save interval from the measured save cost and the failure rate (Young / Daly).

Saving too rarely loses work at a failure; saving too often spends the time on saving. With a blocking
cost of ``C`` seconds per save and a mean time between failures ``M``, the expected waste per unit of
time is minimised by Young's interval ``T = sqrt(2 C M)``; Daly's higher-order refinement (used here,
for ``C < 2M``) is::

    T = sqrt(2 C M) * (1 + sqrt(C / (2 M)) / 3 + C / (18 M)) - C        (and T = M when C >= 2M)

``C`` is what training actually waits for: the snapshot time of a background save, the whole save
otherwise. It is measured on every save and smoothed (exponential moving average), so the interval
follows the real cost. Two bounds apply: an **overhead cap** (``T >= C / max_overhead``: never spend more
than ``max_overhead`` of the time blocked in saves) and ``[min_seconds, max_seconds]``.

Until the first cost is measured, the policy saves as soon as ``first_after`` seconds have passed (0 by
default: the first call saves, which measures the cost).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from savegame.errors import ConfigError
from savegame.policies import AnyOf, Progress, SaveContext, SkipFirstEpochs

DEFAULT_MTBF_SECONDS = 24 * 3600.0
"""A failure a day: a pessimistic default for preemptible cloud nodes and shared clusters."""


def daly_interval(cost: float, mtbf: float) -> float:
    """Daly's optimal checkpoint interval (seconds of work between saves) for ``cost`` and ``mtbf``."""
    if cost <= 0:
        return 0.0
    if cost >= 2 * mtbf:
        return mtbf
    ratio = cost / (2 * mtbf)
    return math.sqrt(2 * cost * mtbf) * (1 + math.sqrt(ratio) / 3 + ratio / 9) - cost


@dataclass
class AutoInterval:
    """A save policy whose interval is set by :func:`daly_interval` from measured save costs.

    ``mtbf``: mean time between failures in seconds. ``max_overhead``: largest fraction of wall time
    spent blocked in saves (0.05 = 5 %). ``min_seconds`` / ``max_seconds``: bounds of the interval.
    ``smoothing``: weight of the newest measurement in the moving average of the cost.
    ``first_after``: seconds before the first save when no cost is known yet.

    Unlike the other policies this one has state (the measured cost): the Checkpointer calls
    :meth:`record_save_cost` after every save (see :func:`record_save_cost`).
    """

    mtbf: float = DEFAULT_MTBF_SECONDS
    max_overhead: float = 0.05
    min_seconds: float = 1.0
    max_seconds: float = 3600.0
    smoothing: float = 0.3
    first_after: float = 0.0
    cost: float | None = field(default=None)

    def __post_init__(self) -> None:
        if not (self.mtbf > 0 and math.isfinite(self.mtbf)):
            raise ConfigError(f"AutoInterval: mtbf must be a positive number of seconds, got {self.mtbf!r}")
        if not 0 < self.max_overhead <= 1:
            raise ConfigError(f"AutoInterval: max_overhead must be in (0, 1], got {self.max_overhead!r}")
        if not 0 <= self.min_seconds <= self.max_seconds:
            raise ConfigError(
                f"AutoInterval: need 0 <= min_seconds <= max_seconds, got {self.min_seconds!r}, {self.max_seconds!r}"
            )
        if not 0 < self.smoothing <= 1:
            raise ConfigError(f"AutoInterval: smoothing must be in (0, 1], got {self.smoothing!r}")
        if self.first_after < 0:
            raise ConfigError(f"AutoInterval: first_after must be >= 0, got {self.first_after!r}")

    def record_save_cost(self, seconds: float) -> None:
        """Fold a measured blocking cost (seconds) into the moving average."""
        if not (seconds >= 0 and math.isfinite(seconds)):
            return
        if self.cost is None:
            self.cost = seconds
        else:
            self.cost = self.smoothing * seconds + (1 - self.smoothing) * self.cost

    def interval(self) -> float:
        """The current target interval in seconds."""
        if self.cost is None:
            return self.first_after
        target = max(daly_interval(self.cost, self.mtbf), self.cost / self.max_overhead)
        return min(max(target, self.min_seconds), self.max_seconds)

    def should_save(self, progress: Progress, context: SaveContext) -> bool:
        """Save when the interval has passed since the last save (or the start)."""
        reference = context.started
        last = context.last_saved
        if last is not None and context.started <= last.time <= progress.time:
            reference = last.time
        return progress.time - reference >= self.interval()


def record_save_cost(policy: object, seconds: float) -> None:
    """Tell every cost-aware policy inside ``policy`` (through AnyOf / SkipFirstEpochs) a save's cost."""
    if isinstance(policy, AnyOf):
        for member in policy.policies:
            record_save_cost(member, seconds)
    elif isinstance(policy, SkipFirstEpochs):
        record_save_cost(policy.policy, seconds)
    else:
        hook = getattr(policy, "record_save_cost", None)
        if callable(hook):
            hook(seconds)
