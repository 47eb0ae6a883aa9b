"""The values the policies decide on: where training is (:class:`Progress`), what the Checkpointer
remembers (:class:`SaveContext`), a committed checkpoint (:class:`CheckpointInfo`), the direction of
a monitored metric (:func:`resolve_mode`, :func:`is_better`) and the shared argument checks.

The conventions (``epoch``, ``step``, ``time``, metric direction) are in :mod:`savegame.policies`.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from savegame.errors import ConfigError

Mode = Literal["auto", "min", "max"]
Direction = Literal["min", "max"]

MIN_METRIC_TOKENS: frozenset[str] = frozenset(
    {
        "loss", "error", "err", "mse", "mae", "rmse", "msle", "rmsle", "mape", "smape", "nll",
        "crossentropy", "logloss", "hinge", "kld", "divergence", "perplexity", "ppl", "wer",
        "cer", "ter", "fid", "kid", "lpips", "distance", "dist", "regret", "eer", "fpr", "fnr",
        "brier", "ece", "cost", "penalty", "inaccuracy", "gap", "drop", "degradation",
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


def check_positive_int(owner: str, name: str, value: int) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an int >= 1 (n, k, counts)."""
    check_count(owner, name, value, minimum=1)


def check_seconds(owner: str, name: str, value: float) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a finite number of seconds > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{owner}: {name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{owner}: {name} must be a finite number of seconds > 0, got {value!r}")


def check_mode(owner: str, mode: str) -> None:
    """Raise :class:`ConfigError` unless ``mode`` is ``"auto"``, ``"min"`` or ``"max"``."""
    if mode not in ("auto", "min", "max"):
        raise ConfigError(f"{owner}: mode must be 'auto', 'min' or 'max', got {mode!r}")


def check_monitor(owner: str, monitor: str) -> None:
    """Raise :class:`ConfigError` unless ``monitor`` is a non-empty metric name."""
    if not isinstance(monitor, str) or not monitor:
        raise ConfigError(f"{owner}: monitor must be a non-empty metric name, got {monitor!r}")


def check_min_delta(owner: str, min_delta: float) -> None:
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


def resolve_mode(monitor: str, mode: str = "auto", *, owner: str = "resolve_mode") -> Direction:
    """The direction (``"min"`` or ``"max"``) in which ``monitor`` improves.

    ``mode`` ``"min"``/``"max"`` is returned as is; ``"auto"`` decides from the metric name with the
    rules in the module docstring (Keras's ``"acc"``/``"fmeasure"`` rule plus documented token lists). A
    name no rule decides raises :class:`ConfigError` (as Keras 3 does) rather than guessing: a wrong guess
    makes best-tracking keep the worst checkpoint and retention delete the best. Any other ``mode`` raises
    too. ``owner`` names the caller in the error (the policy or option being configured).
    """
    check_mode(owner, mode)
    if mode == "min":
        return "min"
    if mode == "max":
        return "max"
    check_monitor(owner, monitor)
    name = monitor.lower()
    tokens = _TOKEN.findall(name)
    candidates = set(tokens) | {t.rstrip("0123456789") for t in tokens}
    if candidates & {"neg", "negative"}:  # scikit-learn maximises neg_log_loss; a negative log-likelihood
        raise ConfigError(  # is minimised: the name cannot tell
            f"{owner}: mode='auto' cannot tell whether monitor={monitor!r} improves by going down or up (a "
            "negated metric: scikit-learn maximises its neg_* scores, a negative log-likelihood is minimised); "
            "pass mode='min' or mode='max'."
        )
    if candidates & MIN_METRIC_TOKENS:
        return "min"
    bare = name.removeprefix("val_").removeprefix("val/")
    if "acc" in name or bare.startswith("fmeasure"):
        return "max"
    if candidates & MAX_METRIC_TOKENS:
        return "max"
    raise ConfigError(
        f"{owner}: mode='auto' cannot tell from its name whether monitor={monitor!r} improves by going down "
        "(a loss or error) or up (an accuracy or score): the name contains none of the known words "
        "(savegame.policies.MIN_METRIC_TOKENS, MAX_METRIC_TOKENS). Guessing would keep or save the worst "
        "checkpoints; pass mode='min' or mode='max'."
    )


def is_better(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """True when ``value`` improves on ``best`` by more than ``min_delta`` in direction ``mode``.

    ``mode`` must be resolved (``"min"`` or ``"max"``, see :func:`resolve_mode`). The improvement is
    ``value - best`` for ``"max"`` and ``best - value`` for ``"min"``; it must be strictly greater than
    ``min_delta`` (Keras semantics, where an equal value is not an improvement). NaN and infinities are
    never an improvement (a diverged loss of ``-inf`` must not become the best and let retention delete
    the real one); with no ``best`` (None, NaN or infinite) any finite value is.
    """
    if mode not in ("min", "max"):
        raise ConfigError(f"is_better: mode must be 'min' or 'max' (resolve 'auto' first), got {mode!r}")
    check_min_delta("is_better", min_delta)
    value = float(value)
    if not math.isfinite(value):
        return False
    if best is None or not math.isfinite(best):
        return True
    gain = value - best if mode == "max" else best - value
    return gain > min_delta  # NaN (inf - inf) compares False: not an improvement


