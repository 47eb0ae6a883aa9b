"""Issue 15 item 10: per-batch ``ckpt.step(state, epoch=e, step=s)`` with ``monitor=`` does not judge
improvement (no save, no best, no error); epoch-end calls without the metric get an error naming the
arguments (``monitor=``, ``metrics=``, ``epoch_end=False``), never an internal class."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from savegame.errors import ConfigError
from savegame.policies import AnyOf, EveryNSteps, OnImprovement
from savegame.run.checkpointer import Checkpointer

INTERNAL = re.compile(r"OnImprovement|EveryTSeconds|AutoInterval|Progress|AnyOf|KeepBest|resolve_mode|is_better")


def training_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 3)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()
    return {"model": model, "optimizer": opt}


def test_per_batch_calls_without_metrics_do_not_judge_improvement(tmp_path: Path) -> None:
    state = training_state()
    ckpt = Checkpointer(tmp_path, monitor="val_loss", save_best_only=True)
    for epoch in range(2):
        best = ckpt.best
        for step in range(3):
            assert ckpt.step(state, epoch=epoch, step=epoch * 3 + step) is None  # no error, no save
        assert ckpt.best == best  # unchanged by the per-batch calls
        saved = ckpt.step(state, epoch=epoch + 1, step=epoch * 3 + 3, metrics={"val_loss": 1.0 - epoch / 10})
        assert saved is not None and saved.is_best
    assert [c.epoch for c in ckpt.list()] == [1, 2]
    assert ckpt.best_value == pytest.approx(0.9)
    ckpt.close()


def test_per_batch_saves_of_another_policy_do_not_touch_the_best(tmp_path: Path) -> None:
    state = training_state()
    ckpt = Checkpointer(tmp_path, save=AnyOf(EveryNSteps(2), OnImprovement("val_loss")))
    ckpt.step(state, epoch=1, step=1, metrics={"val_loss": 0.5})
    best = ckpt.best
    assert best is not None
    for step in range(2, 6):
        ckpt.step(state, epoch=1, step=step)  # every second step saves; none is judged
    assert len(ckpt.list()) == 3
    assert ckpt.best is not None and ckpt.best.name == best.name and ckpt.best_value == 0.5
    ckpt.close()


def test_an_epoch_end_call_without_the_metric_names_the_arguments(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, monitor="val_loss")
    state = training_state()
    with pytest.raises(ConfigError) as raised:
        ckpt.step(state, epoch=1, epoch_end=True)
    message = str(raised.value)
    assert "'val_loss'" in message and "metrics=" in message and "epoch_end=False" in message
    assert not INTERNAL.search(message)
    with pytest.raises(ConfigError) as raised:  # metrics passed, monitored one missing (a typo)
        ckpt.step(state, epoch=1, metrics={"val_los": 0.5})
    message = str(raised.value)
    assert "'val_loss'" in message and "metrics=" in message and "val_los" in message and "monitor=" in message
    assert not INTERNAL.search(message)
    assert ckpt.step(state, epoch=1, step=4, metrics={"x": 1.0}, epoch_end=False) is None  # mid-epoch: not judged
    assert ckpt.step(state, epoch=1, step=5, epoch_end=0) is None  # a falsy epoch_end is not an epoch end
    assert ckpt.list() == []
    ckpt.close()


def test_every_step_improvement_still_insists_on_the_metric_when_metrics_are_passed(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, save=OnImprovement("val_loss", every_step=True))
    state = training_state()
    assert ckpt.step(state, step=1, epoch_end=False) is None  # no metrics at all: not judged
    with pytest.raises(ConfigError, match="'val_loss' is not in metrics=") as raised:
        ckpt.step(state, step=2, epoch_end=False, metrics={"loss": 1.0})
    assert not INTERNAL.search(str(raised.value))
    assert ckpt.step(state, step=3, epoch_end=False, metrics={"val_loss": 1.0}) is not None
    ckpt.close()


def test_a_policy_given_by_the_user_reports_a_non_number_in_user_terms() -> None:
    from savegame.policies import Progress, SaveContext

    with pytest.raises(ConfigError, match="metrics=") as raised:
        OnImprovement("val_loss").should_save(
            Progress(metrics={"val_loss": "low"}),  # type: ignore[dict-item]
            SaveContext(None, None, 0.0),
        )
    assert not INTERNAL.search(str(raised.value))


@pytest.mark.parametrize(
    ("options", "argument"),
    [
        ({"monitor": "val_loss", "threshold": "high"}, "threshold"),
        ({"monitor": "val_loss", "threshold": float("nan")}, "threshold"),
        ({"monitor": "val_loss", "min_delta": float("inf")}, "min_delta"),
        ({"every_seconds": float("inf")}, "every_seconds"),
        ({"every_seconds": float("nan")}, "every_seconds"),
        ({"every": "auto", "mtbf_seconds": -1.0}, "mtbf_seconds"),
        ({"every": "auto", "mtbf_seconds": float("nan")}, "mtbf_seconds"),
        ({"every": "auto", "max_overhead": 5.0}, "max_overhead"),
        ({"save": OnImprovement("val_loss"), "threshold": "x"}, "threshold"),
    ],
)
def test_checkpointer_option_errors_name_the_option_not_a_policy_class(
    tmp_path: Path, options: dict[str, Any], argument: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        Checkpointer(tmp_path, lock=False, **options)
    message = str(raised.value)
    assert message.startswith(f"Checkpointer: {argument} ") and not INTERNAL.search(message)


@pytest.mark.parametrize(("options", "argument"), [({"epoch": "3"}, "epoch"), ({"step": -1}, "step"),
                                                   ({"epoch": 1.5}, "epoch")])  # fmt: skip
def test_step_position_errors_name_the_argument(tmp_path: Path, options: dict[str, Any], argument: str) -> None:
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(ConfigError) as raised:
        ckpt.step(training_state(), **options)
    message = str(raised.value)
    assert message.startswith(f"Checkpointer: {argument} ") and not INTERNAL.search(message)
    ckpt.close()


@pytest.mark.parametrize("end_epoch", ["completed", "zero-based"])
def test_a_loop_that_never_passes_the_metric_is_warned_once(tmp_path: Path, end_epoch: str) -> None:
    """Calls without metrics= are per-batch calls: an epoch-end call that forgets metrics= would make
    save-on-improvement silently never fire, so a whole epoch without the metric warns (once)."""
    state = training_state()
    ckpt = Checkpointer(tmp_path, monitor="val_loss", save_best_only=True)
    with pytest.warns(UserWarning, match=r"metrics=.*'val_loss'.*not judged") as caught:
        for epoch in range(4):
            for step in range(2):
                ckpt.step(state, epoch=epoch, step=epoch * 2 + step)
            ckpt.step(state, epoch=epoch + 1 if end_epoch == "completed" else epoch, step=epoch * 2 + 2)
    assert len([w for w in caught if "not judged" in str(w.message)]) == 1
    ckpt.close()


@pytest.mark.parametrize("end_epoch", ["completed", "zero-based"])
def test_a_loop_that_passes_the_metric_at_each_epoch_end_is_not_warned(tmp_path: Path, end_epoch: str) -> None:
    state = training_state()
    ckpt = Checkpointer(tmp_path, monitor="val_loss", save_best_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for epoch in range(4):
            for step in range(2):
                ckpt.step(state, epoch=epoch, step=epoch * 2 + step)
            ckpt.step(state, epoch=epoch + 1 if end_epoch == "completed" else epoch, step=epoch * 2 + 2,
                      metrics={"val_loss": 1.0 / (epoch + 1)})
    assert len(ckpt.list()) == 4
    ckpt.close()
