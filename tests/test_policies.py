"""Tests for savegame.policies: save policies, keep policies and retention selection."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from savegame.errors import CheckpointError, ConfigError
from savegame.policies import (
    AnyOf,
    AtEnd,
    CheckpointInfo,
    EveryNEpochs,
    EveryNSteps,
    EveryTSeconds,
    KeepAll,
    KeepBest,
    KeepEvery,
    KeepExponential,
    KeepLast,
    KeepPerInterval,
    KeepPolicy,
    KeepUnion,
    KeepWithin,
    Never,
    OnImprovement,
    Progress,
    SaveContext,
    SavePolicy,
    SkipFirstEpochs,
    is_better,
    resolve_mode,
    select_for_deletion,
)

NAN = float("nan")
INF = float("inf")
FRESH = SaveContext(last_saved=None, best=None, started=0.0)


def ctx(last: Progress | None = None, best: float | None = None, started: float = 0.0) -> SaveContext:
    return SaveContext(last_saved=last, best=best, started=started)


def info(
    seq: int,
    *,
    epoch: int | None = None,
    step: int | None = None,
    metrics: dict[str, float] | None = None,
    created: float = 0.0,
    name: str | None = None,
) -> CheckpointInfo:
    return CheckpointInfo(
        name=name if name is not None else f"ckpt-{seq}",
        sequence=seq,
        epoch=epoch,
        step=step,
        metrics=metrics or {},
        created=created,
    )


# --------------------------------------------------------------------------------------------------
# Values


def test_progress_defaults_and_metrics_snapshot() -> None:
    metrics = {"loss": 1.0}
    p = Progress(epoch=1, metrics=metrics)
    metrics["loss"] = 2.0
    assert p.metrics["loss"] == 1.0
    assert p.step is None
    assert p.time == 0.0
    assert p.epoch_end
    assert not p.final
    with pytest.raises(TypeError):
        p.metrics["loss"] = 3.0  # type: ignore[index]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"epoch": -1}, "epoch must be >= 0"), ({"step": -5}, "step must be >= 0"),
     ({"epoch": 1.5}, "epoch must be an int"), ({"step": True}, "step must be an int")],
)  # fmt: skip
def test_progress_rejects_bad_positions(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        Progress(**kwargs)  # type: ignore[arg-type]


class _IndexLike:
    """Stands in for a numpy/torch integer scalar: not an int, but has __index__."""

    def __index__(self) -> int:
        return 4


def test_progress_converts_integer_scalars() -> None:
    p = Progress(epoch=_IndexLike(), step=_IndexLike())  # type: ignore[arg-type]
    assert p.epoch == 4
    assert type(p.epoch) is int
    assert p.step == 4


def test_keep_best_ignores_non_numeric_metrics() -> None:
    cps = [info(1, metrics={"val_loss": "bad"}), info(2, metrics={"val_loss": 3.0})]  # type: ignore[dict-item]
    assert KeepBest(2, "val_loss").keep(cps, now=0) == {"ckpt-2"}


def test_config_error_is_a_checkpoint_error_and_value_error() -> None:
    with pytest.raises(CheckpointError):
        EveryNEpochs(0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        EveryNEpochs(0)


# --------------------------------------------------------------------------------------------------
# resolve_mode / is_better


@pytest.mark.parametrize(
    "monitor",
    ["acc", "val_acc", "accuracy", "val_accuracy", "val_categorical_accuracy", "top_k_acc",
     "fmeasure", "fmeasure_macro", "val_auc", "precision", "val_recall", "f1", "val_f1_score",
     "mean_iou", "val/mAP@50", "ap50", "score", "bleu", "psnr", "reward", "r2_score", "ndcg@10"],
)  # fmt: skip
def test_resolve_mode_auto_max(monitor: str) -> None:
    assert resolve_mode(monitor, "auto") == "max"


@pytest.mark.parametrize(
    "monitor",
    ["loss", "val_loss", "mse", "val_mae", "mean_squared_error", "perplexity", "wer", "fid",
     "dice_loss", "accuracy_loss", "categorical_crossentropy", "val_inaccuracy", "val_accuracy_gap",
     "val_acc_drop"],
)  # fmt: skip
def test_resolve_mode_auto_min(monitor: str) -> None:
    assert resolve_mode(monitor, "auto") == "min"


@pytest.mark.parametrize("monitor", ["lr", "something_unknown", "val_exact_match", "win_rate", "val_top_1",
                                     "neg_log_loss", "neg_mean_squared_error", "val_negative_log_likelihood"])
def test_resolve_mode_auto_refuses_a_name_it_cannot_tell(monitor: str) -> None:
    """Keras 2 minimised these and HF's Trainer maximises them: a guess keeps the worst checkpoint as
    the best, so ``auto`` refuses (as Keras 3 does) and says which modes to pass; explicit modes work."""
    with pytest.raises(ConfigError, match=r"pass mode='min' or mode='max'") as caught:
        resolve_mode(monitor, "auto")
    assert repr(monitor) in str(caught.value)
    assert resolve_mode(monitor, "max") == "max" and resolve_mode(monitor, "min") == "min"


def test_policies_that_rank_by_an_undecidable_name_fail_when_built() -> None:
    """The error comes when the policy is configured, not at the first prune or save (after a commit)."""
    with pytest.raises(ConfigError, match=r"KeepBest.*'val_exact_match'"):
        KeepBest(2, "val_exact_match")
    with pytest.raises(ConfigError, match=r"OnImprovement.*'val_exact_match'"):
        OnImprovement("val_exact_match")
    runs = [info(seq, metrics={"val_exact_match": v}) for seq, v in ((1, 0.2), (2, 0.9), (3, 0.5))]
    assert KeepBest(2, "val_exact_match", mode="max").keep(runs, now=0.0) == {"ckpt-2", "ckpt-3"}


def test_resolve_mode_explicit_and_default() -> None:
    assert resolve_mode("val_loss", "max") == "max"
    assert resolve_mode("val_acc", "min") == "min"
    assert resolve_mode("val_acc") == "max"


@pytest.mark.parametrize("mode", ["maximum", "", "MIN", "Auto"])
def test_resolve_mode_rejects_unknown_mode(mode: str) -> None:
    with pytest.raises(ConfigError, match="mode must be 'auto', 'min' or 'max'"):
        resolve_mode("val_loss", mode)


def test_resolve_mode_rejects_empty_monitor() -> None:
    with pytest.raises(ConfigError, match="monitor"):
        resolve_mode("", "auto")


def test_is_better_basics() -> None:
    assert is_better(0.5, None, "max")
    assert is_better(0.5, None, "min")
    assert not is_better(NAN, None, "max")
    assert not is_better(NAN, 1.0, "min")
    assert is_better(0.5, NAN, "max")  # a NaN best is no best
    assert is_better(0.6, 0.5, "max")
    assert not is_better(0.5, 0.5, "max")
    assert is_better(0.4, 0.5, "min")
    assert not is_better(0.5, 0.5, "min")
    assert not is_better(0.6, 0.5, "min")
    assert not is_better(0.4, 0.5, "max")
    assert is_better(0.75, 0.5, "max", 0.125)
    assert not is_better(0.625, 0.5, "max", 0.125)
    assert is_better(0.25, 0.5, "min", 0.125)
    assert not is_better(0.375, 0.5, "min", 0.125)
    assert not is_better(INF, 1.0, "max")  # infinities never improve (test_infinite_metrics_are_never_the_best)
    assert not is_better(INF, INF, "max")
    assert not is_better(-INF, 1.0, "min")
    assert not is_better(-INF, -INF, "min")


def test_is_better_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="resolve 'auto' first"):
        is_better(1.0, 0.0, "auto")
    with pytest.raises(ConfigError, match="min_delta"):
        is_better(1.0, 0.0, "max", -0.1)
    with pytest.raises(ConfigError, match="min_delta"):
        is_better(1.0, 0.0, "max", NAN)


# --------------------------------------------------------------------------------------------------
# Save policies


def test_policies_satisfy_the_protocol() -> None:
    policies: list[SavePolicy] = [
        EveryNEpochs(1), EveryNSteps(1), EveryTSeconds(1.0), OnImprovement("val_loss"), AtEnd(),
        Never(), SkipFirstEpochs(1, AtEnd()), AnyOf(AtEnd()),
    ]  # fmt: skip
    assert all(isinstance(p, SavePolicy) for p in policies)


def test_every_n_epochs_without_last_save_uses_multiples() -> None:
    policy = EveryNEpochs(3)
    saved = [e for e in range(10) if policy.should_save(Progress(epoch=e), FRESH)]
    assert saved == [3, 6, 9]


def test_every_n_epochs_counts_from_last_save() -> None:
    policy = EveryNEpochs(3)
    last = Progress(epoch=4)
    assert not policy.should_save(Progress(epoch=6), ctx(last))
    assert policy.should_save(Progress(epoch=7), ctx(last))
    assert policy.should_save(Progress(epoch=9), ctx(last))


def test_every_n_epochs_simulated_run() -> None:
    policy = EveryNEpochs(2)
    last: Progress | None = None
    saved = []
    for epoch in range(1, 9):
        progress = Progress(epoch=epoch)
        if policy.should_save(progress, ctx(last)):
            saved.append(epoch)
            last = progress
    assert saved == [2, 4, 6, 8]


def test_every_n_epochs_ignores_mid_epoch_and_unknown_epoch() -> None:
    policy = EveryNEpochs(1)
    assert not policy.should_save(Progress(epoch=5, epoch_end=False), FRESH)
    assert not policy.should_save(Progress(epoch=None, step=100), FRESH)
    assert not policy.should_save(Progress(epoch=0), FRESH)
    assert policy.should_save(Progress(epoch=1), FRESH)


def test_every_n_epochs_after_rollback_falls_back_to_multiples() -> None:
    policy = EveryNEpochs(2)
    last = Progress(epoch=10)  # the run was restored to epoch 4 after saving epoch 10
    assert not policy.should_save(Progress(epoch=5), ctx(last))
    assert policy.should_save(Progress(epoch=6), ctx(last))


def test_every_n_epochs_last_save_without_epoch() -> None:
    policy = EveryNEpochs(2)
    last = Progress(step=100)
    assert policy.should_save(Progress(epoch=2), ctx(last))
    assert not policy.should_save(Progress(epoch=3), ctx(last))


def test_every_n_steps() -> None:
    policy = EveryNSteps(100)
    assert not policy.should_save(Progress(step=0), FRESH)
    assert not policy.should_save(Progress(step=99), FRESH)
    assert policy.should_save(Progress(step=100), FRESH)
    assert policy.should_save(Progress(step=100, epoch_end=False), FRESH)
    assert not policy.should_save(Progress(step=None, epoch=3), FRESH)
    last = Progress(step=150)
    assert not policy.should_save(Progress(step=200), ctx(last))
    assert policy.should_save(Progress(step=250), ctx(last))
    assert policy.should_save(Progress(step=300), ctx(Progress(step=1000)))  # rolled back


def test_every_t_seconds() -> None:
    policy = EveryTSeconds(60.0)
    assert not policy.should_save(Progress(time=159.0), ctx(started=100.0))
    assert policy.should_save(Progress(time=160.0), ctx(started=100.0))
    last = Progress(time=200.0)
    assert not policy.should_save(Progress(time=259.9), ctx(last, started=100.0))
    assert policy.should_save(Progress(time=260.0), ctx(last, started=100.0))


def test_every_t_seconds_ignores_last_save_from_another_clock() -> None:
    policy = EveryTSeconds(60.0)
    from_future = Progress(time=10_000.0)  # a previous process's monotonic clock
    assert policy.should_save(Progress(time=170.0), ctx(from_future, started=100.0))
    from_past = Progress(time=5.0)  # before this Checkpointer started
    assert not policy.should_save(Progress(time=150.0), ctx(from_past, started=100.0))
    assert policy.should_save(Progress(time=160.0), ctx(from_past, started=100.0))


def test_on_improvement_max_and_min() -> None:
    acc = OnImprovement("val_acc")
    assert acc.direction == "max"
    assert acc.should_save(Progress(metrics={"val_acc": 0.5}), FRESH)
    assert acc.should_save(Progress(metrics={"val_acc": 0.6}), ctx(best=0.5))
    assert not acc.should_save(Progress(metrics={"val_acc": 0.5}), ctx(best=0.5))
    loss = OnImprovement("val_loss")
    assert loss.direction == "min"
    assert loss.should_save(Progress(metrics={"val_loss": 0.4}), ctx(best=0.5))
    assert not loss.should_save(Progress(metrics={"val_loss": 0.6}), ctx(best=0.5))
    forced = OnImprovement("val_loss", mode="max")
    assert forced.should_save(Progress(metrics={"val_loss": 0.6}), ctx(best=0.5))


def test_on_improvement_threshold_and_min_delta() -> None:
    policy = OnImprovement("val_acc", threshold=0.75, min_delta=0.125)
    assert not policy.should_save(Progress(metrics={"val_acc": 0.8}), FRESH)
    assert policy.should_save(Progress(metrics={"val_acc": 0.9}), FRESH)
    # once there is a best, the threshold no longer matters
    assert policy.should_save(Progress(metrics={"val_acc": 0.5}), ctx(best=0.25))


def test_on_improvement_epoch_end_only_unless_every_step() -> None:
    mid = Progress(metrics={"loss": 0.1}, epoch_end=False)
    assert not OnImprovement("loss").should_save(mid, FRESH)
    assert OnImprovement("loss", every_step=True).should_save(mid, FRESH)
    # mid-epoch calls without the metric are not an error when not evaluated
    assert not OnImprovement("val_loss").should_save(Progress(epoch_end=False), FRESH)


def test_on_improvement_missing_metric_names_metric_and_keys() -> None:
    policy = OnImprovement("val_acc")
    with pytest.raises(ConfigError, match=r"'val_acc'.*available: loss, val_loss"):
        policy.should_save(Progress(metrics={"val_loss": 1.0, "loss": 2.0}), FRESH)
    # a call without any metrics (per batch) is not judged: no save on improvement, no error (issue 15)
    assert not policy.should_save(Progress(), FRESH)


def test_on_improvement_non_numeric_metric() -> None:
    with pytest.raises(ConfigError, match="not a number"):
        OnImprovement("val_acc").should_save(
            Progress(metrics={"val_acc": "high"}),  # type: ignore[dict-item]
            FRESH,
        )


def test_on_improvement_nan_never_saves() -> None:
    policy = OnImprovement("val_loss")
    assert not policy.should_save(Progress(metrics={"val_loss": NAN}), FRESH)
    assert not policy.should_save(Progress(metrics={"val_loss": NAN}), ctx(best=1.0))


def test_on_improvement_options_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        OnImprovement("val_loss", "min")  # type: ignore[call-arg]


def reference_saves(values: Sequence[float], mode: str, min_delta: float, threshold: float | None) -> list[bool]:
    """Hand-written Keras-style save_best_only: compare, save, remember the saved value."""
    best: float | None = None
    out = []
    for v in values:
        reference = best if best is not None else threshold
        if math.isnan(v):
            save = False
        elif reference is None:
            save = True
        elif mode == "max":
            save = v > reference + min_delta
        else:
            save = v < reference - min_delta
        if save:
            best = v
        out.append(save)
    return out


def simulate(policy: OnImprovement, values: Sequence[float]) -> list[bool]:
    """Drive the policy like the Checkpointer: best is the value of the last improving save."""
    best: float | None = None
    out = []
    for epoch, v in enumerate(values, start=1):
        save = policy.should_save(Progress(epoch=epoch, metrics={"m": v}), ctx(best=best))
        if save:
            best = v
        out.append(save)
    return out


@pytest.mark.parametrize(
    ("values", "mode", "min_delta", "threshold", "expected"),
    [
        ([0.5, 0.75, 0.75, 0.5, 1.0], "max", 0.0, None, [True, True, False, False, True]),
        ([1.0, 0.5, 0.75, 0.25, 0.25], "min", 0.0, None, [True, True, False, True, False]),
        ([0.5, 0.625, 0.875, 1.0], "max", 0.25, None, [True, False, True, False]),
        ([0.5, 0.75, 1.0], "max", 0.0, 0.75, [False, False, True]),
        ([NAN, 0.5, NAN, 0.25], "min", 0.0, None, [False, True, False, True]),
        ([2.0, 1.5, 1.0], "min", 0.0, 1.25, [False, False, True]),
    ],
)
def test_on_improvement_scripted(
    values: list[float], mode: str, min_delta: float, threshold: float | None, expected: list[bool]
) -> None:
    policy = OnImprovement("m", mode=mode, min_delta=min_delta, threshold=threshold)  # type: ignore[arg-type]
    assert reference_saves(values, mode, min_delta, threshold) == expected
    assert simulate(policy, values) == expected


GRID = st.one_of(st.integers(-16, 16).map(lambda i: i / 4), st.just(NAN))


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(GRID, max_size=25),
    mode=st.sampled_from(["min", "max"]),
    min_delta=st.integers(0, 4).map(lambda i: i / 4),
    threshold=st.one_of(st.none(), st.integers(-8, 8).map(lambda i: i / 4)),
)
def test_on_improvement_matches_reference(
    values: list[float], mode: str, min_delta: float, threshold: float | None
) -> None:
    policy = OnImprovement("m", mode=mode, min_delta=min_delta, threshold=threshold)  # type: ignore[arg-type]
    assert simulate(policy, values) == reference_saves(values, mode, min_delta, threshold)


def test_at_end_and_never() -> None:
    assert AtEnd().should_save(Progress(final=True), FRESH)
    assert not AtEnd().should_save(Progress(epoch=3), FRESH)
    assert not Never().should_save(Progress(epoch=3, final=True), FRESH)


def test_skip_first_epochs() -> None:
    policy = SkipFirstEpochs(3, EveryNEpochs(1))
    saved = [e for e in range(1, 6) if policy.should_save(Progress(epoch=e), FRESH)]
    assert saved == [3, 4, 5]
    assert SkipFirstEpochs(3, AtEnd()).should_save(Progress(epoch=None, final=True), FRESH)
    assert SkipFirstEpochs(0, EveryNEpochs(1)).should_save(Progress(epoch=1), FRESH)


def test_any_of() -> None:
    policy = AnyOf(EveryNSteps(100), AtEnd())
    assert policy.should_save(Progress(step=100), FRESH)
    assert policy.should_save(Progress(step=7, final=True), FRESH)
    assert not policy.should_save(Progress(step=7), FRESH)
    assert policy.policies == (EveryNSteps(100), AtEnd())


def test_any_of_evaluates_all_policies() -> None:
    calls: list[str] = []

    class Spy:
        def __init__(self, label: str, answer: bool) -> None:
            self.label, self.answer = label, answer

        def should_save(self, progress: Progress, context: SaveContext) -> bool:
            calls.append(self.label)
            return self.answer

    assert AnyOf(Spy("a", True), Spy("b", False)).should_save(Progress(), FRESH)
    assert calls == ["a", "b"]


def test_policies_are_frozen() -> None:
    policy = EveryNEpochs(2)
    with pytest.raises(AttributeError):
        policy.n = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("build", "needle"),
    [
        (lambda: EveryNEpochs(0), "EveryNEpochs: n must be >= 1, got 0"),
        (lambda: EveryNEpochs(-2), "n must be >= 1"),
        (lambda: EveryNEpochs(1.5), "n must be an int"),  # type: ignore[arg-type]
        (lambda: EveryNEpochs(True), "n must be an int"),
        (lambda: EveryNSteps(0), "EveryNSteps: n must be >= 1"),
        (
            lambda: EveryTSeconds(-1.0),
            "EveryTSeconds: seconds must be a finite number of seconds > 0",
        ),
        (lambda: EveryTSeconds(0), "seconds > 0"),
        (lambda: EveryTSeconds(INF), "finite"),
        (lambda: EveryTSeconds(NAN), "finite"),
        (lambda: EveryTSeconds("60"), "number of seconds"),  # type: ignore[arg-type]
        (
            lambda: OnImprovement("val_loss", mode="best"),  # type: ignore[arg-type]
            "mode must be 'auto', 'min' or 'max', got 'best'",
        ),
        (lambda: OnImprovement(""), "monitor must be a non-empty metric name"),
        (
            lambda: OnImprovement("val_loss", min_delta=-0.1),
            "min_delta must be a finite number >= 0",
        ),
        (lambda: OnImprovement("val_loss", min_delta=INF), "min_delta"),
        (lambda: OnImprovement("val_loss", threshold=NAN), "threshold"),
        (lambda: SkipFirstEpochs(-1, AtEnd()), "SkipFirstEpochs: n must be >= 0"),
        (lambda: SkipFirstEpochs(1, "always"), "expected a save policy"),  # type: ignore[arg-type]
        (AnyOf, "AnyOf: needs at least one policy"),
        (lambda: AnyOf(AtEnd(), KeepAll()), "expected a save policy"),  # type: ignore[arg-type]
        (lambda: KeepLast(0), "KeepLast: n must be >= 1"),
        (lambda: KeepBest(0, "val_loss"), "KeepBest: k must be >= 1"),
        (lambda: KeepBest(1, "val_loss", mode="up"), "mode must be"),  # type: ignore[arg-type]
        (lambda: KeepBest(1, ""), "monitor"),
        (lambda: KeepEvery(0), "KeepEvery: n must be >= 1"),
        (lambda: KeepEvery(2, unit="sequence"), "unit must be 'epoch' or 'step'"),  # type: ignore[arg-type]
        (lambda: KeepPerInterval(0), "KeepPerInterval: seconds"),
        (lambda: KeepPerInterval(-3600), "seconds > 0"),
        (KeepPerInterval.from_duration, "seconds > 0"),
        (lambda: KeepWithin(-1), "KeepWithin: seconds"),
        (lambda: KeepExponential(base=1.0), "base must be a finite number > 1"),
        (lambda: KeepExponential(base=0.5), "base must be"),
        (lambda: KeepExponential(base=INF), "base must be"),
        (lambda: KeepExponential(unit="hour"), "unit must be 'sequence', 'step' or 'epoch'"),  # type: ignore[arg-type]
        (KeepUnion, "KeepUnion: needs at least one policy"),
        (lambda: KeepUnion(KeepAll(), AtEnd()), "expected a keep policy"),  # type: ignore[arg-type]
    ],
)
def test_config_errors(build: object, needle: str) -> None:
    assert callable(build)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        build()


# --------------------------------------------------------------------------------------------------
# Keep policies


def names(kept: set[str] | list[CheckpointInfo]) -> set[str]:
    return {k if isinstance(k, str) else k.name for k in kept}


def test_keep_all_and_last() -> None:
    cps = [info(s) for s in (3, 1, 2, 5)]
    assert KeepAll().keep(cps, now=0) == {"ckpt-1", "ckpt-2", "ckpt-3", "ckpt-5"}
    assert KeepLast(2).keep(cps, now=0) == {"ckpt-3", "ckpt-5"}
    assert KeepLast(10).keep(cps, now=0) == names(cps)
    assert KeepLast(1).keep([], now=0) == set()


def test_keep_best_min_max_ties_and_nan() -> None:
    cps = [
        info(1, metrics={"val_loss": 0.5, "val_acc": 0.9}),
        info(2, metrics={"val_loss": NAN, "val_acc": 0.9}),
        info(3, metrics={}),
        info(4, metrics={"val_loss": 0.3, "val_acc": 0.7}),
        info(5, metrics={"val_loss": 0.5, "val_acc": NAN}),
    ]
    assert KeepBest(1, "val_loss").keep(cps, now=0) == {"ckpt-4"}
    assert KeepBest(2, "val_loss").keep(cps, now=0) == {"ckpt-4", "ckpt-1"}  # tie -> older (first to reach it)
    assert KeepBest(3, "val_loss").keep(cps, now=0) == {"ckpt-1", "ckpt-4", "ckpt-5"}
    assert KeepBest(10, "val_loss").keep(cps, now=0) == {"ckpt-1", "ckpt-4", "ckpt-5"}
    assert KeepBest(1, "val_acc").keep(cps, now=0) == {"ckpt-1"}  # tie at 0.9 -> older
    assert KeepBest(1, "val_acc", mode="min").keep(cps, now=0) == {"ckpt-4"}
    assert KeepBest(1, "absent_loss").keep(cps, now=0) == set()


def test_keep_every() -> None:
    cps = [info(i, epoch=i, step=i * 50) for i in range(1, 11)] + [info(11)]
    assert KeepEvery(5).keep(cps, now=0) == {"ckpt-5", "ckpt-10"}
    assert KeepEvery(100, unit="step").keep(cps, now=0) == {f"ckpt-{i}" for i in (2, 4, 6, 8, 10)}


def test_keep_per_interval() -> None:
    cps = [
        info(1, created=3600 * 5 + 10),
        info(2, created=3600 * 5 + 3000),
        info(3, created=3600 * 6 + 1),
        info(4, created=3600 * 8 + 5),
        info(5, created=3600 * 8 + 6),
        info(6, created=NAN),
    ]
    assert KeepPerInterval(3600).keep(cps, now=0) == {"ckpt-2", "ckpt-3", "ckpt-5"}
    assert KeepPerInterval.from_duration(hours=1) == KeepPerInterval(3600.0)
    assert KeepPerInterval.from_duration(days=1, minutes=1).seconds == 86460.0
    assert KeepPerInterval.from_duration(hours=3).keep(cps, now=0) == {"ckpt-2", "ckpt-5"}


def test_keep_within() -> None:
    cps = [info(1, created=100.0), info(2, created=900.0), info(3, created=1000.0)]
    assert KeepWithin(100).keep(cps, now=1000.0) == {"ckpt-2", "ckpt-3"}


def test_keep_union() -> None:
    cps = [info(i, epoch=i, metrics={"val_loss": 10.0 - abs(i - 3)}) for i in range(1, 8)]
    policy = KeepUnion(KeepLast(2), KeepBest(1, "val_loss", mode="max"))
    assert policy.keep(cps, now=0) == {"ckpt-6", "ckpt-7", "ckpt-3"}
    assert isinstance(policy, KeepPolicy)


def test_keep_exponential_shape() -> None:
    cps = [info(i) for i in range(100)]
    kept = sorted(int(n.split("-")[1]) for n in KeepExponential().keep(cps, now=0))
    assert kept[0] == 0
    assert kept[-1] == 99
    ages = [99 - k for k in reversed(kept)]
    # dense near the newest, sparse further back
    assert ages[:3] == [0, 1, 3]
    assert len(kept) <= 2 * math.log2(100) + 2
    # consecutive kept checkpoints: the gap is at most (base - 1) * (age of the newer + 1)
    for newer, older in itertools.pairwise(ages):
        assert older - newer <= max(1, newer + 1)


def test_keep_exponential_units_and_missing_positions() -> None:
    cps = [info(i, step=i * 10) for i in range(20)] + [info(20, step=None)]
    by_step = KeepExponential(unit="step").keep(cps, now=0)
    assert "ckpt-20" not in by_step
    assert {"ckpt-0", "ckpt-19"} <= by_step
    assert KeepExponential(unit="epoch").keep(cps, now=0) == set()
    assert KeepExponential().keep([], now=0) == set()
    assert KeepExponential().keep([info(7)], now=0) == {"ckpt-7"}


def test_keep_exponential_is_stable_under_repeated_retention() -> None:
    policy = KeepExponential(base=2.0)
    alive: list[CheckpointInfo] = []
    for seq in range(2000):
        alive.append(info(seq))
        doomed = names(select_for_deletion(alive, policy, now=0, best_name=None))
        alive = [c for c in alive if c.name not in doomed]
    ages = sorted(1999 - c.sequence for c in alive)
    assert ages[0] == 0
    assert ages[-1] == 1999
    assert len(alive) <= 2 * math.log2(2000) + 3
    # every age has a kept checkpoint at most a factor of ~2 older
    for age in range(2000):
        nearest_older = min(a for a in ages if a >= age)
        assert nearest_older - age <= (age + 1) * 1.01


# --------------------------------------------------------------------------------------------------
# select_for_deletion


def test_select_for_deletion_protects_newest_and_best_and_sorts_oldest_first() -> None:
    cps = [info(s, metrics={"val_loss": float(s)}) for s in (4, 2, 6, 1, 5, 3)]
    doomed = select_for_deletion(cps, KeepLast(1), now=0, best_name="ckpt-1")
    assert [c.sequence for c in doomed] == [2, 3, 4, 5]
    doomed = select_for_deletion(cps, KeepLast(2), now=0, best_name=None)
    assert [c.sequence for c in doomed] == [1, 2, 3, 4]
    assert select_for_deletion([], KeepLast(1), now=0, best_name="x") == []
    assert select_for_deletion(cps, KeepAll(), now=0, best_name=None) == []


class _NothingKept:
    def keep(self, checkpoints: Sequence[CheckpointInfo], *, now: float) -> set[str]:
        return set()


def test_select_for_deletion_keeps_newest_even_if_policy_keeps_nothing() -> None:
    cps = [info(s) for s in range(5)]
    doomed = select_for_deletion(cps, _NothingKept(), now=0, best_name="ckpt-2")
    assert [c.name for c in doomed] == ["ckpt-0", "ckpt-1", "ckpt-3"]


CHECKPOINT_FIELDS = st.tuples(
    st.one_of(st.none(), st.integers(0, 60)),
    st.one_of(st.none(), st.integers(0, 10_000)),
    st.one_of(st.none(), st.floats(0, 10), st.just(NAN)),
    st.floats(0, 1e6),
)


@st.composite
def checkpoint_lists(draw: st.DrawFn) -> list[CheckpointInfo]:
    """Checkpoints with unique sequences, in random order, with optional positions and metric."""
    rows = draw(st.lists(CHECKPOINT_FIELDS, max_size=30))
    sequences = sorted(draw(st.sets(st.integers(0, 500), min_size=len(rows), max_size=len(rows))))
    out = [
        info(seq, epoch=epoch, step=step, created=created,
             metrics={} if loss is None else {"val_loss": loss})
        for seq, (epoch, step, loss, created) in zip(sequences, rows, strict=True)
    ]  # fmt: skip
    return list(draw(st.permutations(out)))


LEAF_POLICIES: st.SearchStrategy[KeepPolicy] = st.one_of(
    st.just(KeepAll()),
    st.builds(KeepLast, st.integers(1, 5)),
    st.builds(KeepBest, st.integers(1, 3), st.just("val_loss"), mode=st.sampled_from(["min", "max"])),
    st.builds(KeepEvery, st.integers(1, 10), unit=st.sampled_from(["epoch", "step"])),
    st.builds(KeepPerInterval, st.floats(1.0, 1e5)),
    st.builds(KeepWithin, st.floats(1.0, 1e5)),
    st.builds(
        KeepExponential,
        base=st.floats(1.1, 4.0),
        unit=st.sampled_from(["sequence", "step", "epoch"]),
    ),
)


def keep_policies() -> st.SearchStrategy[KeepPolicy]:
    unions = st.lists(LEAF_POLICIES, min_size=1, max_size=3).map(lambda ps: KeepUnion(*ps))
    return st.one_of(LEAF_POLICIES, unions)


def members(policy: KeepPolicy) -> list[KeepPolicy]:
    return list(policy.policies) if isinstance(policy, KeepUnion) else [policy]


@settings(max_examples=200, deadline=None)
@given(cps=checkpoint_lists(), policy=keep_policies(), data=st.data())
def test_select_for_deletion_properties(cps: list[CheckpointInfo], policy: KeepPolicy, data: st.DataObject) -> None:
    best_name = data.draw(st.one_of(st.none(), st.sampled_from([c.name for c in cps] or ["none"])))
    now = data.draw(st.floats(0, 2e6))
    doomed = select_for_deletion(cps, policy, now=now, best_name=best_name)
    doomed_names = [c.name for c in doomed]
    assert len(set(doomed_names)) == len(doomed_names)
    assert [c.sequence for c in doomed] == sorted(c.sequence for c in doomed)
    assert all(c in cps for c in doomed)
    if cps:
        assert max(cps, key=lambda c: c.sequence).name not in doomed_names
    assert best_name not in doomed_names
    for member in members(policy):
        assert not member.keep(cps, now=now) & set(doomed_names)
    survivors = {c.name for c in cps} - set(doomed_names)
    expected = set(policy.keep(cps, now=now))
    if cps:
        expected.add(max(cps, key=lambda c: c.sequence).name)
    if best_name is not None:
        expected.add(best_name)
    assert survivors == expected & {c.name for c in cps}


@settings(max_examples=100, deadline=None)
@given(cps=checkpoint_lists(), n=st.integers(1, 6), data=st.data())
def test_keep_last_plus_best_keeps_at_most_n_plus_one(cps: list[CheckpointInfo], n: int, data: st.DataObject) -> None:
    best_name = data.draw(st.one_of(st.none(), st.sampled_from([c.name for c in cps] or ["none"])))
    doomed = select_for_deletion(cps, KeepLast(n), now=0.0, best_name=best_name)
    survivors = len(cps) - len(doomed)
    assert survivors <= n + 1
    newest_n = {c.name for c in sorted(cps, key=lambda c: c.sequence)[-n:]}
    best_is_old = best_name is not None and best_name in {c.name for c in cps} - newest_n
    assert survivors == min(len(cps), n) + best_is_old


@settings(max_examples=200, deadline=None)
@given(
    positions=st.sets(st.integers(0, 100_000), min_size=1, max_size=300),
    base=st.floats(1.1, 8.0),
)
def test_keep_exponential_keeps_log_many_and_both_ends(positions: set[int], base: float) -> None:
    cps = [info(i, step=p) for i, p in enumerate(sorted(positions))]
    kept = KeepExponential(base=base, unit="step").keep(cps, now=0)
    assert cps[0].name in kept
    assert cps[-1].name in kept
    span = max(positions) - min(positions)
    assert len(kept) <= 2 * math.log(span + 1, base) + 3
    by_sequence = [info(i) for i in range(len(positions))]
    kept_seq = KeepExponential(base=base).keep(by_sequence, now=0)
    assert len(kept_seq) <= 2 * math.log(len(positions), base) + 3
    assert {by_sequence[0].name, by_sequence[-1].name} <= kept_seq


def test_infinite_metrics_are_never_the_best() -> None:
    """A diverged loss of ``-inf`` (or an accuracy of ``inf``) was an improvement: it became the best, and
    retention deleted the real one. Infinities are treated as NaN is: never better, never kept as best."""
    inf = math.inf
    assert not is_better(-inf, 0.1, "min") and not is_better(inf, 0.9, "max")
    assert is_better(0.5, -inf, "min") and is_better(0.5, None, "max")  # a finite value replaces a bad best
    cps = [info(1, metrics={"val_loss": 0.5}), info(2, metrics={"val_loss": 0.1}), info(3, metrics={"val_loss": -inf})]
    assert KeepBest(1, "val_loss").keep(cps, now=0) == {"ckpt-2"}
    cps = [info(1, metrics={"val_acc": 0.5}), info(2, metrics={"val_acc": inf})]
    assert KeepBest(1, "val_acc").keep(cps, now=0) == {"ckpt-1"}
