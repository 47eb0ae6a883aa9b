"""When to save: the :class:`SavePolicy` protocol and the built-in policies (every N epochs / steps /
seconds, on improvement, at the end, never, skip-first, any-of). Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Protocol, runtime_checkable

from savegame.errors import ConfigError
from savegame.policies.values import (
    Direction,
    Mode,
    Progress,
    SaveContext,
    check_count,
    check_min_delta,
    check_monitor,
    check_positive_int,
    check_seconds,
    check_threshold,
    is_better,
    missing_monitor_message,
    resolve_mode,
)

# --------------------------------------------------------------------------------------------------
# Save policies


@runtime_checkable
class SavePolicy(Protocol):
    """Decides whether the Checkpointer saves now. Implementations are pure and immutable."""

    def should_save(self, progress: Progress, context: SaveContext) -> bool:
        """True to save at ``progress``."""
        ...


@dataclass(frozen=True)
class EveryNEpochs:
    """Save at epoch ends once ``n`` more epochs have completed since the last save.

    With no previous save (or one without an epoch, or one *ahead* of ``progress`` because training
    was rolled back) it saves when the number of completed epochs is a multiple of ``n``: epochs
    ``n, 2n, 3n, ...`` (1-based, as in Keras file names). Mid-epoch calls never save. Note that the
    last save may have come from another policy (in :class:`AnyOf`), which shifts the schedule.
    """

    n: int

    def __post_init__(self) -> None:
        check_positive_int("EveryNEpochs", "n", self.n)

    def should_save(self, progress: Progress, context: SaveContext) -> bool:
        """See the class docstring."""
        epoch = progress.epoch
        if not progress.epoch_end or epoch is None or epoch <= 0:
            return False
        last = context.last_saved.epoch if context.last_saved is not None else None
        if last is not None and last <= epoch:
            return epoch - last >= self.n
        return epoch % self.n == 0


@dataclass(frozen=True)
class EveryNSteps:
    """Save once the global step has advanced by ``n`` since the last save.

    With no previous save (or one without a step, or one ahead of ``progress``) it saves at steps that
    are multiples of ``n`` (never at step 0). Applies to mid-epoch and epoch-end calls alike.
    """

    n: int

    def __post_init__(self) -> None:
        check_positive_int("EveryNSteps", "n", self.n)

    def should_save(self, progress: Progress, context: SaveContext) -> bool:
        """See the class docstring."""
        step = progress.step
        if step is None or step <= 0:
            return False
        last = context.last_saved.step if context.last_saved is not None else None
        if last is not None and last <= step:
            return step - last >= self.n
        return step % self.n == 0


@dataclass(frozen=True)
class EveryTSeconds:
    """Save once ``seconds`` have passed since the last save (or since the Checkpointer started).

    Times are monotonic and only comparable within one process, so a last save whose time is before
    ``context.started`` or after ``progress.time`` (it came from another run) is ignored and the start
    time is used instead.
    """

    seconds: float

    def __post_init__(self) -> None:
        check_seconds("EveryTSeconds", "seconds", self.seconds)

    def should_save(self, progress: Progress, context: SaveContext) -> bool:
        """See the class docstring."""
        reference = context.started
        last = context.last_saved
        if last is not None and context.started <= last.time <= progress.time:
            reference = last.time
        return progress.time - reference >= self.seconds


@dataclass(frozen=True)
class OnImprovement:
    """Save when ``metrics[monitor]`` improves on the best value so far (Keras ``save_best_only``).

    The reference is ``context.best``; when that is None, ``threshold`` (Keras's
    ``initial_value_threshold``); when both are None, any non-NaN value saves. An improvement must
    exceed ``min_delta`` (see :func:`is_better`); NaN never improves. Only epoch-end calls are
    evaluated unless ``every_step=True``, and a call that passes no metrics at all (a per-batch
    ``ckpt.step(state, step=s)``) is not judged: no save on improvement, no error. A call that passes
    metrics without ``monitor`` raises :class:`ConfigError` naming it and the keys passed: a typo in
    ``monitor`` must not silently disable saving. (The Checkpointer also raises for a call that says
    ``epoch_end=True`` and passes no metrics.)
    """

    monitor: str
    _: KW_ONLY
    mode: Mode = "auto"
    min_delta: float = 0.0
    threshold: float | None = None
    every_step: bool = False

    def __post_init__(self) -> None:
        check_monitor("OnImprovement", self.monitor)
        resolve_mode(self.monitor, self.mode, owner="OnImprovement")  # fails now, not at the first save
        check_min_delta("OnImprovement", self.min_delta)
        check_threshold("OnImprovement", "threshold", self.threshold)

    @property
    def direction(self) -> Direction:
        """The resolved mode: ``"min"`` or ``"max"``."""
        return resolve_mode(self.monitor, self.mode)

    def value(self, progress: Progress) -> float:
        """The monitored value in ``progress.metrics`` (ConfigError if absent or not a number)."""
        if self.monitor not in progress.metrics:
            raise ConfigError(missing_monitor_message(self.monitor, progress.metrics, epoch_end=progress.epoch_end))
        raw = progress.metrics[self.monitor]
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"metrics=: the monitored metric {self.monitor!r} is not a number: {raw!r}") from None

    def should_save(self, progress: Progress, context: SaveContext) -> bool:
        """See the class docstring."""
        if not (progress.epoch_end or self.every_step) or not progress.metrics:
            return False
        value = self.value(progress)
        reference = context.best if context.best is not None else self.threshold
        return is_better(value, reference, self.direction, self.min_delta)


@dataclass(frozen=True)
class AtEnd:
    """Save at the last call of training (``progress.final``)."""

    def should_save(self, progress: Progress, context: SaveContext) -> bool:
        """See the class docstring."""
        return progress.final


@dataclass(frozen=True)
class Never:
    """Never save automatically (explicit ``ckpt.save()`` calls still do)."""

    def should_save(self, progress: Progress, context: SaveContext) -> bool:
        """Always False."""
        return False


def _check_save_policy(owner: str, policy: object) -> None:
    """Raise :class:`ConfigError` unless ``policy`` has a ``should_save`` method."""
    if isinstance(policy, type):  # the Protocol check is true for the class itself: Never, not Never()
        raise ConfigError(f"{owner}: expected a save policy, got the class {policy.__name__}: pass an instance")
    if not isinstance(policy, SavePolicy):
        raise ConfigError(f"{owner}: expected a save policy (with should_save), got {policy!r}")


@dataclass(frozen=True)
class SkipFirstEpochs:
    """Never save while fewer than ``n`` epochs have completed; otherwise ask ``policy``.

    CANDLE's ``ckpt_skip_epochs``: early checkpoints are rarely worth the disk. Calls whose epoch is
    unknown (None) are delegated, since nothing says they are early.
    """

    n: int
    policy: SavePolicy

    def __post_init__(self) -> None:
        check_count("SkipFirstEpochs", "n", self.n, minimum=0)
        _check_save_policy("SkipFirstEpochs", self.policy)

    def should_save(self, progress: Progress, context: SaveContext) -> bool:
        """See the class docstring."""
        if progress.epoch is not None and progress.epoch < self.n:
            return False
        return self.policy.should_save(progress, context)


@dataclass(frozen=True, init=False)
class AnyOf:
    """Save when any of ``policies`` says so (all are evaluated; they are pure)."""

    policies: tuple[SavePolicy, ...]

    def __init__(self, *policies: SavePolicy) -> None:
        object.__setattr__(self, "policies", tuple(policies))
        self.__post_init__()

    def __post_init__(self) -> None:
        if not self.policies:
            raise ConfigError("AnyOf: needs at least one policy (use Never() to never save)")
        for policy in self.policies:
            _check_save_policy("AnyOf", policy)

    def should_save(self, progress: Progress, context: SaveContext) -> bool:
        """See the class docstring."""
        answers = [policy.should_save(progress, context) for policy in self.policies]
        return any(answers)


