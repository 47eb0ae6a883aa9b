"""The translation of the Checkpointer's convenience knobs into policies: ``every_n_epochs`` /
``every_n_steps`` / ``every_seconds`` / ``every="auto"`` / ``save_best_only`` / ``save_at_end`` /
``skip_first_epochs`` into a :class:`~savegame.policies.SavePolicy`, ``keep_last`` / ``keep_best`` into a
:class:`~savegame.policies.KeepPolicy`, and ``monitor`` / ``mode`` / ``min_delta`` / ``threshold`` checked
(or inferred from a policy passed with ``save=`` / ``keep=``).

One job, one place: :class:`savegame.run.checkpointer.Checkpointer` calls :func:`policies_from_knobs` in its
constructor; :mod:`savegame.keras` and :mod:`savegame.cli.scan` build keep policies with
:func:`build_keep_policy`. It sits in the policies layer: it imports only :mod:`savegame.policies`,
:mod:`savegame.policies.autointerval` and :mod:`savegame.errors`. The names stay importable from
:mod:`savegame.run.checkpointer`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from savegame.errors import ConfigError
from savegame.policies import (
    AnyOf,
    AtEnd,
    EveryNEpochs,
    EveryNSteps,
    EveryTSeconds,
    KeepAll,
    KeepBest,
    KeepLast,
    KeepPolicy,
    KeepUnion,
    Mode,
    Never,
    OnImprovement,
    Progress,
    SaveContext,
    SavePolicy,
    SkipFirstEpochs,
    check_count,
    check_threshold,
    resolve_mode,
)
from savegame.policies.autointerval import DEFAULT_MTBF_SECONDS, AutoInterval

__all__ = [
    "AlignedSchedule",
    "KnobPolicies",
    "build_keep_policy",
    "build_save_policy",
    "coerce_metrics",
    "find_improvement",
    "find_keep_best",
    "policies_from_knobs",
]


def coerce_metrics(metrics: Mapping[str, object] | None) -> dict[str, float]:
    """Metrics as ``{name: float}``: accepts ints, floats, NumPy scalars and 0-d tensors.

    Raises :class:`ConfigError` for non-string names and values that are not numbers, so a wrong
    metric fails at the call that passed it, not when a later save tries to name a file after it.
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise ConfigError(f"metrics must be a dict of name -> number, got {type(metrics).__name__}")
    out: dict[str, float] = {}
    for key, raw in metrics.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"metric names must be non-empty strings, got {key!r}")
        if isinstance(raw, (bool, str, bytes)) or _is_bool(raw) or _not_scalar(raw):
            raise ConfigError(f"metric {key!r} must be a number (or 0-d tensor), got {str(raw)[:80]!r}")
        try:
            out[key] = float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise ConfigError(f"metric {key!r} must be a number (or 0-d tensor), got {str(raw)[:80]!r}") from None
    return out


def _is_bool(value: object) -> bool:
    """A NumPy or torch boolean (``np.bool_(True)``, ``torch.tensor(True)``): not a metric, like ``True``."""
    return str(getattr(value, "dtype", "")) in ("bool", "torch.bool")


def _not_scalar(value: object) -> bool:
    """Whether ``value`` is an array or tensor with dimensions (``torch.tensor([0.2])``: ``float()`` takes a
    one-element one, NumPy refuses it; a metric is one number, so both are refused)."""
    shape = getattr(value, "shape", None)
    return shape is not None and len(shape) > 0


def find_improvement(policy: SavePolicy) -> OnImprovement | None:
    """The first :class:`OnImprovement` inside a (composed) save policy, to infer ``monitor``."""
    found = _improvements(policy)
    return found[0] if found else None


def find_keep_best(policy: KeepPolicy) -> KeepBest | None:
    """The first :class:`KeepBest` inside a (composed) keep policy, to infer ``monitor``."""
    found = _keep_bests(policy)
    return found[0] if found else None


@dataclass(frozen=True)
class AlignedSchedule:
    """Ask ``policy`` as if nothing had been saved yet, so a periodic schedule stays aligned.

    :class:`~savegame.policies.EveryNEpochs` counts from the last save, whichever policy made it; a
    save on improvement at epoch 3 would move "every 5 epochs" to 8, 13, ... Wrapped, it saves at
    epochs 5, 10, 15 whatever else was saved in between (CANDLE's ``epoch % interval == 0``, Lightning's
    ``every_n_epochs``), also after a restart. Used by the ``every_n_epochs`` knob.
    """

    policy: SavePolicy

    def should_save(self, progress: Progress, context: SaveContext) -> bool:
        """``policy``'s answer with ``last_saved`` hidden; at most once per epoch end."""
        last = context.last_saved
        if last is not None and last.epoch_end and last.epoch is not None and last.epoch == progress.epoch:
            return False  # this epoch's end was saved already (repeated calls must not save again)
        return self.policy.should_save(progress, SaveContext(None, context.best, context.started))


def _finite_number(value: object) -> bool:
    """Whether ``value`` is an int or float (not bool) other than NaN and the infinities."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def build_save_policy(
    *,
    monitor: str | None,
    mode: Mode,
    min_delta: float,
    threshold: float | None,
    every_n_epochs: int | None,
    every_n_steps: int | None,
    every_seconds: float | None,
    save_best_only: bool,
    save_at_end: bool | None,
    skip_first_epochs: int,
    every: Literal["auto"] | None = None,
    mtbf_seconds: float = DEFAULT_MTBF_SECONDS,
    max_overhead: float = 0.05,
) -> SavePolicy:
    """The save policy the convenience knobs of :class:`Checkpointer` describe (see its docstring)."""
    if every not in (None, "auto"):
        raise ConfigError(f"Checkpointer: every must be 'auto' or None, got {every!r}")
    check_count("Checkpointer", "every_n_epochs", every_n_epochs, minimum=0)
    check_count("Checkpointer", "every_n_steps", every_n_steps, minimum=0)
    check_count("Checkpointer", "skip_first_epochs", skip_first_epochs, minimum=0)
    if every_seconds is not None and (
        isinstance(every_seconds, bool) or not isinstance(every_seconds, (int, float))
        or not 0 <= every_seconds < math.inf
    ):
        raise ConfigError(f"Checkpointer: every_seconds must be a finite number >= 0 (or None), got {every_seconds!r}")
    check_threshold("Checkpointer", "threshold", threshold)
    if every == "auto":  # checked here so the messages name these arguments, not AutoInterval's
        if not _finite_number(mtbf_seconds) or mtbf_seconds <= 0:
            raise ConfigError(f"Checkpointer: mtbf_seconds must be a positive number of seconds, got {mtbf_seconds!r}")
        if not _finite_number(max_overhead) or not 0 < max_overhead <= 1:
            raise ConfigError(f"Checkpointer: max_overhead must be a fraction in (0, 1], got {max_overhead!r}")
    parts: list[SavePolicy] = []
    if save_best_only:
        if monitor is None:
            raise ConfigError("Checkpointer: save_best_only=True needs monitor= (the metric to improve)")
        if every_n_epochs or every_n_steps or every_seconds or every:
            raise ConfigError(
                "Checkpointer: save_best_only=True saves only on improvement; drop every_n_epochs / "
                "every_n_steps / every_seconds, or use save_best_only=False to save on both"
            )
    else:
        if every_n_epochs is None and every_n_steps is None and every_seconds is None and every is None:
            every_n_epochs = 1
        if every == "auto":
            parts.append(AutoInterval(mtbf=mtbf_seconds, max_overhead=max_overhead))
        if every_n_epochs:
            parts.append(AlignedSchedule(EveryNEpochs(every_n_epochs)))
        if every_n_steps:
            parts.append(EveryNSteps(every_n_steps))
        if every_seconds:
            parts.append(EveryTSeconds(float(every_seconds)))
    if monitor is not None:
        parts.append(OnImprovement(monitor, mode=mode, min_delta=min_delta, threshold=threshold))
    policies: list[SavePolicy] = []
    if parts:
        inner: SavePolicy = parts[0] if len(parts) == 1 else AnyOf(*parts)
        policies.append(SkipFirstEpochs(skip_first_epochs, inner) if skip_first_epochs else inner)
    if save_at_end if save_at_end is not None else not save_best_only:
        policies.append(AtEnd())
    if not policies:
        return Never()
    return policies[0] if len(policies) == 1 else AnyOf(*policies)


def build_keep_policy(*, monitor: str | None, mode: Mode, keep_last: int | None, keep_best: int | None) -> KeepPolicy:
    """The keep policy of the ``keep_last`` / ``keep_best`` knobs (everything when neither is set)."""
    check_count("Checkpointer", "keep_last", keep_last, minimum=1)
    check_count("Checkpointer", "keep_best", keep_best, minimum=1)
    parts: list[KeepPolicy] = []
    if keep_last is not None:
        parts.append(KeepLast(keep_last))
    if keep_best is not None:
        if monitor is None:
            raise ConfigError("Checkpointer: keep_best needs monitor= (the metric that ranks checkpoints)")
        parts.append(KeepBest(keep_best, monitor, mode=mode))
    if not parts:
        return KeepAll()
    return parts[0] if len(parts) == 1 else KeepUnion(*parts)


@dataclass(frozen=True)
class KnobPolicies:
    """What :func:`policies_from_knobs` decided: the best-tracking settings and the two policies."""

    monitor: str | None
    mode: Literal["min", "max"] | None
    """``mode`` resolved for ``monitor`` (None without a monitor)."""
    min_delta: float
    threshold: float | None
    save_policy: SavePolicy
    keep_policy: KeepPolicy


def policies_from_knobs(
    *,
    save: SavePolicy | None,
    keep: KeepPolicy | None,
    monitor: str | None,
    mode: Mode,
    min_delta: float,
    threshold: float | None,
    every_n_epochs: int | None,
    every_n_steps: int | None,
    every_seconds: float | None,
    every: Literal["auto"] | None,
    mtbf_seconds: float,
    max_overhead: float,
    save_best_only: bool,
    save_at_end: bool | None,
    skip_first_epochs: int,
    keep_last: int | None,
    keep_best: int | None,
) -> KnobPolicies:
    """The Checkpointer's policies from either ``save=`` / ``keep=`` or the knobs (not both; ConfigError
    naming the conflict), ``monitor`` taken from an ``OnImprovement`` / ``KeepBest`` in them when not given."""
    knobs_used = any(
        v is not None for v in (every_n_epochs, every_n_steps, every_seconds, every, save_at_end)
    ) or save_best_only or skip_first_epochs
    if save is not None and knobs_used:
        raise ConfigError(
            "Checkpointer: pass either save= (a policy) or the every_*/save_best_only/save_at_end/"
            "skip_first_epochs knobs, not both"
        )
    if keep is not None and (keep_last is not None or keep_best is not None):
        raise ConfigError("Checkpointer: pass either keep= (a policy) or keep_last/keep_best, not both")
    if save is not None and (isinstance(save, type) or not isinstance(save, SavePolicy)):
        raise ConfigError(f"Checkpointer: save= must be a save policy (an instance), got {save!r}")
    if keep is not None and (isinstance(keep, type) or not isinstance(keep, KeepPolicy)):
        raise ConfigError(f"Checkpointer: keep= must be a keep policy (an instance), got {keep!r}")

    if monitor is None and save is not None:
        found = find_improvement(save)
        if found is not None:
            monitor, mode, min_delta = found.monitor, found.mode, found.min_delta
            threshold = found.threshold if threshold is None else threshold
    if monitor is None and keep is not None:
        kept = find_keep_best(keep)
        if kept is not None:
            monitor, mode = kept.monitor, kept.mode
    if monitor is not None and (not isinstance(monitor, str) or not monitor):
        raise ConfigError(f"Checkpointer: monitor must be a metric name, got {monitor!r}")
    if not _finite_number(min_delta) or not min_delta >= 0:
        raise ConfigError(f"Checkpointer: min_delta must be a finite number >= 0, got {min_delta!r}")
    check_threshold("Checkpointer", "threshold", threshold)
    save_policy = save if save is not None else build_save_policy(
        monitor=monitor, mode=mode, min_delta=min_delta, threshold=threshold,
        every_n_epochs=every_n_epochs, every_n_steps=every_n_steps, every_seconds=every_seconds,
        save_best_only=save_best_only, save_at_end=save_at_end, skip_first_epochs=skip_first_epochs,
        every=every, mtbf_seconds=mtbf_seconds, max_overhead=max_overhead,
    )  # fmt: skip
    keep_policy = keep if keep is not None else build_keep_policy(
        monitor=monitor, mode=mode, keep_last=keep_last, keep_best=keep_best
    )
    resolved = resolve_mode(monitor, mode, owner=f"monitor={monitor!r}") if monitor else None
    if monitor is None and (mode != "auto" or min_delta != 0 or threshold is not None):
        raise ConfigError("Checkpointer: mode=, min_delta= and threshold= apply to the monitored metric; pass "
                          "monitor= too (or leave them at their defaults)")  # fmt: skip
    _check_same_direction(monitor, resolved, save_policy, keep_policy)
    return KnobPolicies(
        monitor=monitor, mode=resolved, min_delta=float(min_delta),
        threshold=threshold, save_policy=save_policy, keep_policy=keep_policy,
    )  # fmt: skip


def _check_same_direction(
    monitor: str | None, mode: Literal["min", "max"] | None, save: SavePolicy, keep: KeepPolicy
) -> None:
    """:class:`ConfigError` when a ``KeepBest`` or ``OnImprovement`` of ``monitor`` ranks it in the other
    direction than the Checkpointer's best tracking: one of the two would keep the worst checkpoints."""
    if monitor is None or mode is None:
        return
    ranked: list[tuple[str, str, str]] = [(p.monitor, p.mode, "KeepBest") for p in _keep_bests(keep)]
    ranked += [(p.monitor, p.mode, "OnImprovement") for p in _improvements(save)]
    for name, its_mode, kind in ranked:
        if name == monitor and resolve_mode(name, its_mode, owner=kind) != mode:
            raise ConfigError(
                f"Checkpointer: {kind}({name!r}) ranks it by {resolve_mode(name, its_mode)!r} while the "
                f"Checkpointer tracks its best by {mode!r}; give both the same mode"
            )


def _keep_bests(policy: KeepPolicy) -> list[KeepBest]:
    """Every :class:`KeepBest` inside a (composed) keep policy."""
    if isinstance(policy, KeepBest):
        return [policy]
    if isinstance(policy, KeepUnion):
        return [found for sub in policy.policies for found in _keep_bests(sub)]
    return []


def _improvements(policy: SavePolicy) -> list[OnImprovement]:
    """Every :class:`OnImprovement` inside a (composed) save policy."""
    if isinstance(policy, OnImprovement):
        return [policy]
    if isinstance(policy, SkipFirstEpochs):
        return _improvements(policy.policy)
    if isinstance(policy, AnyOf):
        return [found for sub in policy.policies for found in _improvements(sub)]
    return []
