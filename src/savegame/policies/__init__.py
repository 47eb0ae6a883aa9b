"""When to save (:class:`SavePolicy`) and which checkpoints to keep (:class:`KeepPolicy`).

Pure decision logic: no I/O, no clock, no framework imports. The Checkpointer builds a
:class:`Progress` (where training is) and a :class:`SaveContext` (what it remembers) and asks its save
policy; after each commit it describes the committed checkpoints as :class:`CheckpointInfo` values and
asks :func:`select_for_deletion` what retention may remove. Keeping the logic pure makes every rule
testable with made-up numbers and lets the Keras callback and the Checkpointer share it.

Conventions used throughout:

* ``epoch`` is the number of **completed** epochs: 1 at the end of the first epoch, the number Keras
  shows in file names (``{epoch:02d}`` gives ``01`` for the first epoch) and what the PyTorch loops in
  the wild write as ``epoch + 1``. ``epoch == 0`` means "no epoch finished yet".
* ``step`` is the global step: batches (optimizer steps) seen since the start of training.
* ``time`` is a monotonic clock in seconds, only meaningful within one process.
* Positions that go *backwards* (the run was rolled back to an older checkpoint) are treated like
  "no previous save" rather than blocking saves until training catches up again.

Direction of a monitored metric (``mode="auto"``, :func:`resolve_mode`): Keras 3 minimises ``loss``
and otherwise asks the metric object for its direction; Keras 2 and Lightning's ancestors maximised
names containing ``"acc"`` or starting with ``"fmeasure"`` and minimised everything else. savegame sees
only names, so it decides from the name, lower-cased and split into alphanumeric tokens (``val/mAP@50``
-> ``val``, ``map``, ``50``; a token's trailing digits are also tried, so ``ap50`` matches ``ap``):

1. a token in :data:`MIN_METRIC_TOKENS` (``loss``, ``error``, ``mse``, ``perplexity``, ...) -> ``"min"``;
2. ``"acc"`` anywhere in the name, or a name starting with ``fmeasure`` (the Keras rule) -> ``"max"``;
3. a token in :data:`MAX_METRIC_TOKENS` (``auc``, ``precision``, ``recall``, ``f1``, ``iou``, ``map``,
   ``score``, ``bleu``, ``psnr``, ``reward``, ...) -> ``"max"``;
4. anything else -> ``"min"`` (Keras 2's default). Pass ``mode="max"`` explicitly when in doubt.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from types import MappingProxyType
from typing import Literal, Protocol, runtime_checkable

from savegame.errors import ConfigError

__all__ = [
    "MAX_METRIC_TOKENS",
    "MIN_METRIC_TOKENS",
    "AnyOf",
    "AtEnd",
    "CheckpointInfo",
    "EveryNEpochs",
    "EveryNSteps",
    "EveryTSeconds",
    "KeepAll",
    "KeepBest",
    "KeepEvery",
    "KeepExponential",
    "KeepLast",
    "KeepPerInterval",
    "KeepPolicy",
    "KeepUnion",
    "KeepWithin",
    "Never",
    "OnImprovement",
    "Progress",
    "SaveContext",
    "SavePolicy",
    "SkipFirstEpochs",
    "is_better",
    "resolve_mode",
    "select_for_deletion",
]

Mode = Literal["auto", "min", "max"]
Direction = Literal["min", "max"]

MIN_METRIC_TOKENS: frozenset[str] = frozenset(
    {
        "loss", "error", "err", "mse", "mae", "rmse", "msle", "rmsle", "mape", "smape", "nll",
        "crossentropy", "logloss", "hinge", "kld", "divergence", "perplexity", "ppl", "wer",
        "cer", "ter", "fid", "kid", "lpips", "distance", "dist", "regret", "eer", "fpr", "fnr",
        "brier", "ece", "cost", "penalty",
    }
)  # fmt: skip
"""Name tokens that mark a metric to minimise under ``mode="auto"`` (checked first)."""

MAX_METRIC_TOKENS: frozenset[str] = frozenset(
    {
        "acc", "accuracy", "auc", "auroc", "auprc", "precision", "recall", "f1", "f2", "fbeta",
        "fmeasure", "iou", "miou", "jaccard", "dice", "map", "ap", "mar", "ndcg", "mrr", "hit",
        "hits", "hitrate", "r2", "bleu", "rouge", "rougel", "meteor", "chrf", "cider", "psnr",
        "ssim", "msssim", "score", "kappa", "mcc", "specificity", "sensitivity", "tpr", "tnr",
        "top1", "top5", "similarity", "correlation", "pearson", "spearman", "reward", "return",
    }
)  # fmt: skip
"""Name tokens that mark a metric to maximise under ``mode="auto"``."""

_TOKEN = re.compile(r"[a-z0-9]+")


# --------------------------------------------------------------------------------------------------
# Values describing training and checkpoints


def check_count(owner: str, name: str, value: int | None, *, minimum: int) -> None:
    """Raise :class:`ConfigError` unless ``value`` is None or an int (not bool) >= ``minimum``: the one
    count check of every policy and of the Checkpointer's options (``owner`` names who is configured)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{owner}: {name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ConfigError(f"{owner}: {name} must be >= {minimum}, got {value}")


def _check_positive_int(owner: str, name: str, value: int) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an int >= 1 (n, k, counts)."""
    check_count(owner, name, value, minimum=1)


def _check_seconds(owner: str, name: str, value: float) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a finite number of seconds > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{owner}: {name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{owner}: {name} must be a finite number of seconds > 0, got {value!r}")


def _check_mode(owner: str, mode: str) -> None:
    """Raise :class:`ConfigError` unless ``mode`` is ``"auto"``, ``"min"`` or ``"max"``."""
    if mode not in ("auto", "min", "max"):
        raise ConfigError(f"{owner}: mode must be 'auto', 'min' or 'max', got {mode!r}")


def _check_monitor(owner: str, monitor: str) -> None:
    """Raise :class:`ConfigError` unless ``monitor`` is a non-empty metric name."""
    if not isinstance(monitor, str) or not monitor:
        raise ConfigError(f"{owner}: monitor must be a non-empty metric name, got {monitor!r}")


def _check_min_delta(owner: str, min_delta: float) -> None:
    """Raise :class:`ConfigError` unless ``min_delta`` is a finite number >= 0."""
    if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)):
        raise ConfigError(f"{owner}: min_delta must be a number, got {min_delta!r}")
    if not math.isfinite(min_delta) or min_delta < 0:
        raise ConfigError(f"{owner}: min_delta must be a finite number >= 0, got {min_delta!r}")


def check_threshold(owner: str, name: str, value: object) -> None:
    """Raise :class:`ConfigError` unless ``value`` (an improvement threshold) is None or a number, not NaN."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{owner}: {name} must be a number (not NaN) or None, got {value!r}")


def missing_monitor_message(monitor: str, metrics: Mapping[str, object], *, epoch_end: bool = True) -> str:
    """What to say when the monitored metric is not among the ``metrics=`` of a call that is judged,
    in the words of the arguments the user passes (``monitor=``, ``metrics=``, ``epoch_end=False``)."""
    passed = ", ".join(sorted(metrics)) or "none"
    where = "at epoch ends" if epoch_end else "at every call (every_step=True)"
    hint = ", and epoch_end=False for calls inside an epoch (those do not judge improvement)" if epoch_end else ""
    return (
        f"the monitored metric {monitor!r} is not in metrics= (available: {passed}); pass "
        f"metrics={{{monitor!r}: value}} {where} (check monitor= for a typo){hint}"
    )


def _frozen_metrics(metrics: Mapping[str, float]) -> Mapping[str, float]:
    """A read-only snapshot, so a value object never changes when the caller's dict does."""
    return MappingProxyType(dict(metrics))


@dataclass(frozen=True)
class Progress:
    """Where training is when the Checkpointer is asked whether to save.

    ``epoch`` counts completed epochs (1 after the first one) and ``step`` counts batches seen; either
    may be unknown (None). ``time`` is the Checkpointer's monotonic clock (tests pass fake values).
    ``epoch_end`` is False for mid-epoch (per-step) calls, ``final`` is True for the last call of
    training. ``metrics`` is copied into a read-only mapping; integer scalars from numpy or torch are
    accepted for ``epoch``/``step`` and converted to ``int``.
    """

    epoch: int | None = None
    step: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    time: float = 0.0
    epoch_end: bool = True
    final: bool = False

    def __post_init__(self) -> None:
        for name in ("epoch", "step"):
            object.__setattr__(self, name, check_position("Progress", name, getattr(self, name)))
        object.__setattr__(self, "metrics", _frozen_metrics(self.metrics))


def check_position(owner: str, name: str, value: object) -> int | None:
    """``value`` as an epoch or step count: None, or an int >= 0 (NumPy / torch integer scalars are
    converted); :class:`ConfigError` naming ``owner`` and ``name`` otherwise."""
    if value is not None and not isinstance(value, (bool, int)) and hasattr(value, "__index__"):
        value = operator.index(value)  # numpy / torch integer scalars -> int
    if value is not None and not isinstance(value, int):
        raise ConfigError(f"{owner}: {name} must be an int, got {value!r} ({type(value).__name__})")
    check_count(owner, name, value, minimum=0)
    return value


@dataclass(frozen=True)
class SaveContext:
    """What the Checkpointer knows when deciding whether to save.

    ``last_saved`` is the progress of the last committed save (None if there is none yet in this run
    or root), ``best`` the best value of the monitored metric so far (persisted across runs; None if
    none), ``started`` the monotonic time at which the Checkpointer started.
    """

    last_saved: Progress | None
    best: float | None
    started: float


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint as retention sees it.

    ``sequence`` is the save counter within the root (newer = larger, unique); ``created`` the unix
    time of the commit. Names are unique within one call to a keep policy.
    """

    name: str
    sequence: int
    epoch: int | None
    step: int | None
    metrics: Mapping[str, float]
    created: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", _frozen_metrics(self.metrics))


# --------------------------------------------------------------------------------------------------
# Metric direction and improvement


def resolve_mode(monitor: str, mode: str = "auto") -> Direction:
    """The direction (``"min"`` or ``"max"``) in which ``monitor`` improves.

    ``mode`` ``"min"``/``"max"`` is returned as is; ``"auto"`` decides from the metric name with the
    rules in the module docstring (Keras's ``"acc"``/``"fmeasure"`` rule plus documented token lists).
    Anything else raises :class:`ConfigError`.
    """
    _check_mode("resolve_mode", mode)
    if mode == "min":
        return "min"
    if mode == "max":
        return "max"
    _check_monitor("resolve_mode", monitor)
    name = monitor.lower()
    tokens = _TOKEN.findall(name)
    candidates = set(tokens) | {t.rstrip("0123456789") for t in tokens}
    if candidates & MIN_METRIC_TOKENS:
        return "min"
    bare = name.removeprefix("val_").removeprefix("val/")
    if "acc" in name or bare.startswith("fmeasure"):
        return "max"
    if candidates & MAX_METRIC_TOKENS:
        return "max"
    return "min"


def is_better(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """True when ``value`` improves on ``best`` by more than ``min_delta`` in direction ``mode``.

    ``mode`` must be resolved (``"min"`` or ``"max"``, see :func:`resolve_mode`). The improvement is
    ``value - best`` for ``"max"`` and ``best - value`` for ``"min"``; it must be strictly greater than
    ``min_delta`` (Keras semantics, where an equal value is not an improvement). NaN is never an
    improvement; with no ``best`` (None or NaN) any non-NaN value is.
    """
    if mode not in ("min", "max"):
        raise ConfigError(f"is_better: mode must be 'min' or 'max' (resolve 'auto' first), got {mode!r}")
    _check_min_delta("is_better", min_delta)
    value = float(value)
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    gain = value - best if mode == "max" else best - value
    return gain > min_delta  # NaN (inf - inf) compares False: not an improvement


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
        _check_positive_int("EveryNEpochs", "n", self.n)

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
        _check_positive_int("EveryNSteps", "n", self.n)

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
        _check_seconds("EveryTSeconds", "seconds", self.seconds)

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
        _check_monitor("OnImprovement", self.monitor)
        _check_mode("OnImprovement", self.mode)
        _check_min_delta("OnImprovement", self.min_delta)
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
        _check_positive_int("KeepLast", "n", self.n)

    def keep(self, checkpoints: Sequence[CheckpointInfo], *, now: float) -> set[str]:
        """See the class docstring."""
        newest = sorted(checkpoints, key=lambda c: c.sequence, reverse=True)[: self.n]
        return {c.name for c in newest}


@dataclass(frozen=True)
class KeepBest:
    """Keep the ``k`` checkpoints with the best ``monitor`` value (direction from ``mode``).

    Checkpoints lacking the metric, or where it is NaN or not a number, are never among the best. Ties go to the older
    checkpoint (smaller sequence), as for best tracking: a later equal value is not an improvement.
    """

    k: int
    monitor: str
    _: KW_ONLY
    mode: Mode = "auto"

    def __post_init__(self) -> None:
        _check_positive_int("KeepBest", "k", self.k)
        _check_monitor("KeepBest", self.monitor)
        _check_mode("KeepBest", self.mode)

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
            if math.isnan(value):
                continue
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
        _check_positive_int("KeepEvery", "n", self.n)
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
        _check_seconds("KeepPerInterval", "seconds", self.seconds)

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
        _check_seconds("KeepWithin", "seconds", self.seconds)

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
