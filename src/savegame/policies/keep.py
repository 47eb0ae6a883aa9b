"""Which committed checkpoints retention keeps: the :class:`KeepPolicy` protocol, the built-in policies
(all, last N, best N, every N, per interval, within, exponential, union) and
:func:`select_for_deletion`, which never selects the newest, the best or a pinned checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Literal, Protocol, runtime_checkable

from savegame.errors import ConfigError
from savegame.policies.values import (
    CheckpointInfo,
    Mode,
    check_monitor,
    check_positive_int,
    check_seconds,
    resolve_mode,
)

# --------------------------------------------------------------------------------------------------
# Keep policies


@runtime_checkable
class KeepPolicy(Protocol):
    """Decides which committed checkpoints retention keeps. Implementations are pure and immutable."""

    def keep(self, checkpoints: Sequence[CheckpointInfo], *, now: float) -> set[str]:
        """Names of the checkpoints to keep (``now`` is the current unix time)."""
        ...


@dataclass(frozen=True)
class KeepAll:
    """Keep every checkpoint (no retention)."""

    def keep(self, checkpoints: Sequence[CheckpointInfo], *, now: float) -> set[str]:
        """All names."""
        return {c.name for c in checkpoints}


@dataclass(frozen=True)
class KeepLast:
    """Keep the ``n`` newest checkpoints (largest sequence)."""

    n: int

    def __post_init__(self) -> None:
        check_positive_int("KeepLast", "n", self.n)

    def keep(self, checkpoints: Sequence[CheckpointInfo], *, now: float) -> set[str]:
        """See the class docstring."""
        newest = sorted(checkpoints, key=lambda c: c.sequence, reverse=True)[: self.n]
        return {c.name for c in newest}


@dataclass(frozen=True)
class KeepBest:
    """Keep the ``k`` checkpoints with the best ``monitor`` value (direction from ``mode``).

    Checkpoints lacking the metric, or where it is NaN, infinite or not a number, are never among the best.
    Ties go to the older checkpoint (smaller sequence), as for best tracking: a later equal value is not an
    improvement.
    """

    k: int
    monitor: str
    _: KW_ONLY
    mode: Mode = "auto"

    def __post_init__(self) -> None:
        check_positive_int("KeepBest", "k", self.k)
        check_monitor("KeepBest", self.monitor)
        resolve_mode(self.monitor, self.mode, owner="KeepBest")  # fails now, not at the first prune

    def keep(self, checkpoints: Sequence[CheckpointInfo], *, now: float) -> set[str]:
        """See the class docstring."""
        sign = 1.0 if resolve_mode(self.monitor, self.mode) == "min" else -1.0
        scored: list[tuple[float, int, str]] = []
        for c in checkpoints:
            raw = c.metrics.get(self.monitor)
            if raw is None:
                continue
            try:
                value = float(raw)
            except (TypeError, ValueError):
                continue  # not a number: never among the best
            if not math.isfinite(value):
                continue  # NaN or infinite (diverged): never among the best, as never an improvement
            scored.append((sign * value, c.sequence, c.name))
        scored.sort()
        return {name for _, _, name in scored[: self.k]}


def _position(checkpoint: CheckpointInfo, unit: str) -> int | None:
    """The checkpoint's position on ``unit``'s axis (sequence, step or epoch)."""
    if unit == "sequence":
        return checkpoint.sequence
    if unit == "step":
        return checkpoint.step
    return checkpoint.epoch


@dataclass(frozen=True)
class KeepEvery:
    """Keep the checkpoints whose epoch (or step, with ``unit="step"``) is a multiple of ``n``.

    Checkpoints without that position are not kept by this policy.
    """

    n: int
    _: KW_ONLY
    unit: Literal["epoch", "step"] = "epoch"

    def __post_init__(self) -> None:
        check_positive_int("KeepEvery", "n", self.n)
        if self.unit not in ("epoch", "step"):
            raise ConfigError(f"KeepEvery: unit must be 'epoch' or 'step', got {self.unit!r}")

    def keep(self, checkpoints: Sequence[CheckpointInfo], *, now: float) -> set[str]:
        """See the class docstring."""
        kept = set()
        for c in checkpoints:
            position = _position(c, self.unit)
            if position is not None and position % self.n == 0:
                kept.add(c.name)
        return kept


@dataclass(frozen=True)
class KeepPerInterval:
    """Keep one checkpoint per time bucket: the newest in each bucket of ``created // seconds``.

    Buckets are aligned to the unix epoch (with ``seconds=3600``, one per clock hour in UTC). Use
    :meth:`from_duration` to say ``hours=``/``days=`` instead of seconds.
    """

    seconds: float

    def __post_init__(self) -> None:
        check_seconds("KeepPerInterval", "seconds", self.seconds)

    @classmethod
    def from_duration(
        cls, *, days: float = 0.0, hours: float = 0.0, minutes: float = 0.0, seconds: float = 0.0
    ) -> KeepPerInterval:
        """``KeepPerInterval.from_duration(hours=1)``: the interval as a sum of units."""
        return cls(days * 86400.0 + hours * 3600.0 + minutes * 60.0 + seconds)

    def keep(self, checkpoints: Sequence[CheckpointInfo], *, now: float) -> set[str]:
        """See the class docstring."""
        newest: dict[float, CheckpointInfo] = {}
        for c in checkpoints:
            if not math.isfinite(c.created):
                continue
            bucket = c.created // self.seconds
            current = newest.get(bucket)
            if current is None or c.sequence > current.sequence:
                newest[bucket] = c
        return {c.name for c in newest.values()}


@dataclass(frozen=True)
class KeepWithin:
    """Keep the checkpoints created within the last ``seconds`` before ``now``.

    Combine with others in :class:`KeepUnion`, e.g. everything from the last day plus one per day.
    """

    seconds: float

    def __post_init__(self) -> None:
        check_seconds("KeepWithin", "seconds", self.seconds)

    def keep(self, checkpoints: Sequence[CheckpointInfo], *, now: float) -> set[str]:
        """See the class docstring."""
        return {c.name for c in checkpoints if now - c.created <= self.seconds}


@dataclass(frozen=True)
class KeepExponential:
    """Keep O(log n) checkpoints spread over the whole history, denser near the newest.

    Positions ``p`` are taken on ``unit``'s axis (save ``sequence``, ``step`` or ``epoch``;
    checkpoints without one are not kept by this policy). With ``P`` the newest position, the *age*
    of a checkpoint is ``P - p``. The rule thins greedily from the oldest to the newest:

    * the oldest and the newest are kept;
    * walking the others oldest first, with ``anchor`` the last one kept, a checkpoint ``c`` is
      dropped when the next newer checkpoint ``d`` is close enough to the anchor to make ``c``
      redundant: ``p(d) - p(anchor) <= (base - 1) * (age(d) + 1)``; otherwise ``c`` is kept and
      becomes the anchor.

    So between two consecutive kept checkpoints the gap is at most ``(base - 1) * (age + 1)`` of the
    newer one (unless they were neighbours anyway): going back ``a`` positions you lose at most a
    factor ``base`` of precision. Every second kept checkpoint is ``base`` times older, so at most
    ``2 * log_base(span + 1) + 2`` are kept. The rule is stable under repeated retention: the allowed
    gap between two checkpoints only grows as they age, so a checkpoint deleted earlier would not be
    needed later, and applying it after every save keeps the same shape as applying it once.
    """

    _: KW_ONLY
    base: float = 2.0
    unit: Literal["sequence", "step", "epoch"] = "sequence"

    def __post_init__(self) -> None:
        if isinstance(self.base, bool) or not isinstance(self.base, (int, float)):
            raise ConfigError(f"KeepExponential: base must be a number > 1, got {self.base!r}")
        if not math.isfinite(self.base) or self.base <= 1:
            raise ConfigError(f"KeepExponential: base must be a finite number > 1, got {self.base!r}")
        if self.unit not in ("sequence", "step", "epoch"):
            raise ConfigError(f"KeepExponential: unit must be 'sequence', 'step' or 'epoch', got {self.unit!r}")

    def keep(self, checkpoints: Sequence[CheckpointInfo], *, now: float) -> set[str]:
        """See the class docstring."""
        placed: list[tuple[int, int, str]] = []
        for c in checkpoints:
            position = _position(c, self.unit)
            if position is not None:
                placed.append((position, c.sequence, c.name))
        if not placed:
            return set()
        placed.sort()
        newest = placed[-1][0]
        kept = {placed[0][2], placed[-1][2]}
        anchor = placed[0][0]
        for i in range(1, len(placed) - 1):
            following = placed[i + 1][0]
            if following - anchor <= (self.base - 1.0) * (newest - following + 1):
                continue
            kept.add(placed[i][2])
            anchor = placed[i][0]
        return kept


def _check_keep_policy(owner: str, policy: object) -> None:
    """Raise :class:`ConfigError` unless ``policy`` has a ``keep`` method."""
    if isinstance(policy, type):  # the Protocol check is true for the class itself: KeepLast, not KeepLast(3)
        raise ConfigError(f"{owner}: expected a keep policy, got the class {policy.__name__}: pass an instance")
    if not isinstance(policy, KeepPolicy):
        raise ConfigError(f"{owner}: expected a keep policy (with keep), got {policy!r}")


@dataclass(frozen=True, init=False)
class KeepUnion:
    """Keep what any of ``policies`` keeps."""

    policies: tuple[KeepPolicy, ...]

    def __init__(self, *policies: KeepPolicy) -> None:
        object.__setattr__(self, "policies", tuple(policies))
        self.__post_init__()

    def __post_init__(self) -> None:
        if not self.policies:
            raise ConfigError("KeepUnion: needs at least one policy")
        for policy in self.policies:
            _check_keep_policy("KeepUnion", policy)

    def keep(self, checkpoints: Sequence[CheckpointInfo], *, now: float) -> set[str]:
        """See the class docstring."""
        kept: set[str] = set()
        for policy in self.policies:
            kept |= policy.keep(checkpoints, now=now)
        return kept


def monitors_of(policy: object) -> list[str]:
    """The metrics the :class:`KeepBest` parts of ``policy`` rank by (through :class:`KeepUnion`s), in order."""
    if isinstance(policy, KeepBest):
        return [policy.monitor]
    if isinstance(policy, KeepUnion):
        return [m for part in policy.policies for m in monitors_of(part) if m]
    return []


def select_for_deletion(
    checkpoints: Sequence[CheckpointInfo], policy: KeepPolicy, *, now: float, best_name: str | None
) -> list[CheckpointInfo]:
    """What retention deletes: everything ``policy`` does not keep, oldest first.

    The newest checkpoint (largest sequence) and ``best_name`` are always kept, whatever the policy
    says: the newest is what a crashed run resumes from and the best is what ``load("best")`` serves.
    """
    if not checkpoints:
        return []
    protected = set(policy.keep(checkpoints, now=now))
    protected.add(max(checkpoints, key=lambda c: c.sequence).name)
    if best_name is not None:
        protected.add(best_name)
    doomed = [c for c in checkpoints if c.name not in protected]
    doomed.sort(key=lambda c: c.sequence)
    return doomed
