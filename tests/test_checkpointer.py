"""Tests for savegame.run.checkpointer: policies in real loops, retention, best tracking, names, resume."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import savegame
from savegame.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CommitError,
    ConfigError,
    InvalidNameError,
    StateMismatchError,
    UnsupportedTypeError,
)
from savegame.policies import (
    AnyOf,
    EveryNSteps,
    KeepEvery,
    KeepExponential,
    KeepLast,
    KeepPerInterval,
    KeepUnion,
    Never,
    OnImprovement,
)
from savegame.run.checkpointer import Checkpointer, ResumeWarning
from savegame.storage.local import FileOps

SRC = str(Path(__file__).resolve().parents[1] / "src")


# --------------------------------------------------------------------------------------------------
# Helpers


class Trainer:
    """A tiny real model + optimizer trained on fixed random data, one optimizer step per call."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.01)
        self.x = torch.randn(16, 4)
        self.y = torch.randn(16, 2)

    def train_step(self) -> float:
        self.optimizer.zero_grad()
        loss = nn.functional.mse_loss(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    @property
    def state(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer}


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def names(ckpt: Checkpointer) -> list[str]:
    return [r.name for r in ckpt.list()]


def saved_epochs(results: list[Any]) -> list[int]:
    return [r.epoch for r in results if r is not None]


def run_epochs(ckpt: Checkpointer, trainer: Trainer, losses: list[float], *, final: bool = True) -> list[Any]:
    """Train one step per epoch and report ``val_loss`` = ``losses[epoch]``."""
    results = []
    for i, value in enumerate(losses):
        trainer.train_step()
        last = final and i == len(losses) - 1
        results.append(ckpt.step(trainer.state, epoch=i + 1, step=i + 1, metrics={"val_loss": value}, final=last))
    return results


@pytest.fixture
def trainer() -> Trainer:
    return Trainer()


# --------------------------------------------------------------------------------------------------
# Save policies in real loops


def test_default_saves_every_epoch_and_tracks_best(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path, monitor="val_loss")
    results = run_epochs(ckpt, trainer, [0.5, 0.4, 0.6])
    assert saved_epochs(results) == [1, 2, 3]
    assert [r.is_best for r in results] == [True, True, False]
    assert names(ckpt) == ["epoch=001-step=000001", "epoch=002-step=000002", "epoch=003-step=000003"]
    assert ckpt.best is not None and ckpt.best.epoch == 2
    assert ckpt.latest is not None and ckpt.latest.epoch == 3
    assert ckpt.best_value == 0.4


def test_every_n_epochs_with_end_save(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path, every_n_epochs=3)
    results = run_epochs(ckpt, trainer, [1.0] * 7)
    assert saved_epochs(results) == [3, 6, 7]


def test_every_n_epochs_saves_once_per_epoch_even_if_called_per_batch(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path, every_n_epochs=2, save_at_end=False)
    saved = []
    for epoch in range(1, 5):
        for batch in range(3):  # forgot epoch_end=False: still one save per scheduled epoch
            trainer.train_step()
            if ckpt.step(trainer.state, epoch=epoch, step=epoch * 3 + batch) is not None:
                saved.append(epoch)
    assert saved == [2, 4]
    restarted = Checkpointer(tmp_path, every_n_epochs=2, save_at_end=False)
    assert restarted.step(trainer.state, epoch=4, step=99) is None  # epoch 4 is on disk already


def test_every_n_epochs_zero_without_monitor_saves_only_at_end(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path, every_n_epochs=0)
    assert saved_epochs(run_epochs(ckpt, trainer, [1.0] * 4)) == [4]


def test_every_n_steps_mid_epoch(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path, every_n_steps=4, save_at_end=False)
    steps = []
    step = 0
    for epoch in range(2):
        for _ in range(5):
            trainer.train_step()
            step += 1
            if ckpt.step(trainer.state, epoch=epoch, step=step, epoch_end=False) is not None:
                steps.append(step)
        ckpt.step(trainer.state, epoch=epoch + 1, step=step)
    assert steps == [4, 8]


def test_every_seconds_uses_injected_clock(tmp_path: Path, trainer: Trainer) -> None:
    clock = FakeClock()
    ckpt = Checkpointer(tmp_path, every_seconds=60, save_at_end=False, clock=clock)
    saved = []
    for step in range(1, 11):
        clock.now += 25
        if ckpt.step(trainer.state, step=step, epoch_end=False) is not None:
            saved.append(step)
    assert saved == [3, 6, 9]


def test_save_best_only_max_mode_and_template(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(
        tmp_path, name="mobilenet_v2_{epoch:02d}_{val_accuracy:.3f}", monitor="val_accuracy",
        save_best_only=True,
    )  # fmt: skip
    assert ckpt.mode == "max"
    accs = [0.72, 0.70, 0.81, 0.81, 0.79, 0.895, 0.6]
    for i, acc in enumerate(accs):
        trainer.train_step()
        ckpt.step(trainer.state, epoch=i + 1, metrics={"val_accuracy": acc}, final=i == len(accs) - 1)
    assert names(ckpt) == ["mobilenet_v2_01_0.720", "mobilenet_v2_03_0.810", "mobilenet_v2_06_0.895"]
    assert ckpt.best is not None and ckpt.best.name == "mobilenet_v2_06_0.895"


def test_min_delta_and_threshold(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path, monitor="val_loss", save_best_only=True, min_delta=0.05, threshold=1.0)
    results = run_epochs(ckpt, trainer, [1.2, 0.97, 0.9, 0.88, 0.7])
    assert saved_epochs(results) == [3, 5]


def test_skip_first_epochs_keeps_final_save(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path, monitor="val_loss", skip_first_epochs=3)
    assert saved_epochs(run_epochs(ckpt, trainer, [0.9, 0.8, 0.7, 0.6, 0.7])) == [3, 4, 5]
    short = Checkpointer(tmp_path / "short", skip_first_epochs=10)
    assert saved_epochs(run_epochs(short, trainer, [0.9, 0.8])) == [2]


def test_policy_objects_and_inferred_monitor(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path, save=AnyOf(EveryNSteps(3), OnImprovement("val_acc")))
    assert ckpt.monitor == "val_acc" and ckpt.mode == "max"
    saved = []
    accuracies = [0.5, 0.4, 0.3, 0.6, 0.1, 0.2, 0.1, 0.9]
    for step, acc in enumerate(accuracies, start=1):
        trainer.train_step()
        if ckpt.step(trainer.state, epoch=step, step=step, metrics={"val_acc": acc}):
            saved.append(step)
    assert saved == [1, 4, 7, 8]  # improvements at 1, 4, 8; three steps after the save at 4: 7
    assert ckpt.best is not None and ckpt.best.step == 8


def test_never_policy_with_forced_saves_and_pins(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path, save=Never(), keep_last=1)
    assert run_epochs(ckpt, trainer, [1.0, 2.0]) == [None, None]
    pinned = ckpt.save(trainer.state, name="pinned", pin=True)
    ckpt.save(trainer.state, epoch=1)
    ckpt.save(trainer.state, epoch=2)
    assert names(ckpt) == ["pinned", "epoch=002"]
    assert pinned.name == "pinned" and ckpt.list()[0].pinned


def test_max_epochs_marks_the_final_call_once(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path, every_n_epochs=0, max_epochs=3)
    assert saved_epochs(run_epochs(ckpt, trainer, [1.0, 1.0, 1.0], final=False)) == [3]
    again = Checkpointer(tmp_path / "dup", every_n_epochs=1)
    trainer.train_step()
    assert again.step(trainer.state, epoch=1, step=5) is not None
    assert again.step(trainer.state, epoch=1, step=5, final=True) is None  # same position: no duplicate
    assert len(again.list()) == 1


def test_missing_monitored_metric_is_an_error(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path, monitor="val_loss")
    with pytest.raises(ConfigError, match="val_loss"):
        ckpt.step(trainer.state, epoch=1, metrics={"val_los": 1.0})


def test_metrics_accept_tensors_and_numpy(tmp_path: Path, trainer: Trainer) -> None:
    import numpy as np

    ckpt = Checkpointer(tmp_path, monitor="val_loss")
    result = ckpt.step(trainer.state, epoch=1, metrics={"val_loss": torch.tensor(0.5), "acc": np.float32(0.25)})
    assert result is not None and result.metrics == {"val_loss": 0.5, "acc": 0.25}
    with pytest.raises(ConfigError):
        ckpt.step(trainer.state, epoch=2, metrics={"val_loss": "low"})
    # a bare OverflowError; booleans and one-element arrays passed as numbers (np.array([0.3]) was refused)
    for bad in (10**400, np.bool_(True), torch.tensor(True), torch.tensor([0.2]), np.array([0.3])):
        with pytest.raises(ConfigError, match="'val_loss' must be a number"):
            ckpt.step(trainer.state, epoch=2, metrics={"val_loss": bad})
    assert len(ckpt.list()) == 1


@pytest.mark.parametrize(
    "options",
    [
        {"save": Never(), "every_n_epochs": 2},
        {"keep": KeepLast(2), "keep_last": 3},
        {"save_best_only": True},
        {"save_best_only": True, "monitor": "val_loss", "every_n_epochs": 2},
        {"keep_best": 2},
        {"restart": "sometimes"},
        {"mode": "up"},
        {"every_n_epochs": -1},
        {"keep_last": 0},
        {"min_delta": -1.0},
    ],
)
def test_invalid_options(tmp_path: Path, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Checkpointer(tmp_path, **options)


def test_closed_checkpointer_refuses_saves(tmp_path: Path, trainer: Trainer) -> None:
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(trainer.state, epoch=1)
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.step(trainer.state, epoch=2)
    assert len(ckpt.list()) == 1


# --------------------------------------------------------------------------------------------------
# Keep policies


def test_keep_last_never_deletes_best(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path, monitor="val_loss", keep_last=2)
    results = run_epochs(ckpt, trainer, [0.1, 0.5, 0.6, 0.7, 0.8])
    assert [r.name for r in ckpt.list()] == ["epoch=001-step=000001", "epoch=004-step=000004", "epoch=005-step=000005"]
    assert ckpt.best is not None and ckpt.best.epoch == 1
    assert results[2].deleted == ()  # 1 is the best, 2 and 3 are the two newest
    assert results[3].deleted == ("epoch=002-step=000002",)


def test_keep_best_k(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path, monitor="val_loss", keep_best=2)
    run_epochs(ckpt, trainer, [0.5, 0.2, 0.9, 0.3, 0.8])
    assert [r.epoch for r in ckpt.list()] == [2, 4, 5]  # two best + the newest


def test_keep_every_and_union(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path, keep=KeepUnion(KeepEvery(3), KeepLast(1)))
    run_epochs(ckpt, trainer, [1.0] * 8)
    assert [r.epoch for r in ckpt.list()] == [3, 6, 8]


def test_keep_per_interval_with_wall_clock(tmp_path: Path, trainer: Trainer) -> None:
    wall = FakeClock(1_000_000.0)
    ckpt = Checkpointer(tmp_path, keep=KeepPerInterval(3600), wall_clock=wall)
    # created times come from the manifests (real time): all in the same hour bucket -> only newest
    run_epochs(ckpt, trainer, [1.0] * 3)
    records = ckpt.list()
    buckets = {int(r.created.timestamp() // 3600) for r in records}
    assert len(records) == len(buckets)
    assert records[-1].epoch == 3


def test_keep_exponential_thins_history(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path, keep=KeepExponential(), every_n_epochs=1)
    run_epochs(ckpt, trainer, [1.0] * 20, final=False)
    kept = [r.sequence for r in ckpt.list()]
    assert kept[0] == 1 and kept[-1] == 20
    assert len(kept) <= 2 * math.log2(21) + 2
    assert len(kept) < 20


def test_prune_dry_run_and_real(tmp_path: Path, trainer: Trainer) -> None:
    run_epochs(Checkpointer(tmp_path), trainer, [1.0] * 5)
    strict = Checkpointer(tmp_path, keep_last=2)
    would = strict.prune()
    assert would == ["epoch=001-step=000001", "epoch=002-step=000002", "epoch=003-step=000003"]
    assert len(strict.list()) == 5
    assert strict.prune(dry_run=False) == would
    assert len(strict.list()) == 2


def test_foreign_checkpoints_are_never_deleted(tmp_path: Path, trainer: Trainer) -> None:
    savegame.save(tmp_path / "handmade", {"model": trainer.model})
    ckpt = Checkpointer(tmp_path, keep_last=1)
    run_epochs(ckpt, trainer, [1.0] * 3)
    records = ckpt.list()
    assert [r.name for r in records] == ["handmade", "epoch=003-step=000003"]
    assert records[0].sequence is None


def test_failed_deletion_warns_and_continues(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=1)
    run_epochs(ckpt, trainer, [1.0], final=False)

    class NoRename(FileOps):
        def rename(self, src: str, dst: str) -> None:
            if ".trash-" in dst:
                raise OSError(13, "Permission denied", dst)
            super().rename(src, dst)

    ckpt.storage.ops = NoRename()
    with pytest.warns(UserWarning, match="could not delete"):
        result = ckpt.step(trainer.state, epoch=2, step=2, metrics={"val_loss": 1.0})
    assert result is not None and result.deleted == ()
    assert len(ckpt.list()) == 2


# --------------------------------------------------------------------------------------------------
# Best tracking across restarts


def test_best_survives_restart_and_is_in_the_manifest(tmp_path: Path, trainer: Trainer) -> None:
    first = Checkpointer(tmp_path, monitor="val_loss", save_best_only=True)
    run_epochs(first, trainer, [0.5, 0.3, 0.4], final=False)
    latest = first.latest
    assert latest is not None
    progress = savegame.read_manifest(latest.path).progress
    assert progress is not None
    assert progress["best"]["name"] == "epoch=002-step=000002" and progress["best"]["value"] == 0.3

    second = Checkpointer(tmp_path, monitor="val_loss", save_best_only=True)
    assert second.best_value == 0.3 and second.best is not None and second.best.epoch == 2
    trainer.train_step()
    assert second.step(trainer.state, epoch=4, step=4, metrics={"val_loss": 0.35}) is None  # not better than 0.3
    assert second.step(trainer.state, epoch=5, step=5, metrics={"val_loss": 0.25}) is not None


def test_best_recomputed_when_recorded_best_is_gone(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path, monitor="val_loss")
    run_epochs(ckpt, trainer, [0.5, 0.2, 0.4], final=False)
    ckpt.storage.quarantine("epoch=002-step=000002")
    again = Checkpointer(tmp_path, monitor="val_loss")
    assert again.best is not None and again.best.epoch == 3 and again.best_value == 0.4


def test_changing_monitor_ranks_by_the_new_metric(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path, monitor="val_loss")
    for i, (loss, acc) in enumerate([(0.5, 0.9), (0.4, 0.8), (0.6, 0.7)]):
        ckpt.step(trainer.state, epoch=i + 1, metrics={"val_loss": loss, "val_acc": acc})
    by_acc = Checkpointer(tmp_path, monitor="val_acc")
    assert by_acc.best is not None and by_acc.best.epoch == 1


# --------------------------------------------------------------------------------------------------
# Names


def test_name_collisions_get_version_suffixes(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path, name="run_{epoch:02d}")
    first = ckpt.save(trainer.state, epoch=1)
    before = (tmp_path / "run_01" / "manifest.json").read_bytes()
    second = ckpt.save(trainer.state, epoch=1)
    third = Checkpointer(tmp_path, name="run_{epoch:02d}").save(trainer.state, epoch=1)
    assert (first.name, second.name, third.name) == ("run_01", "run_01-v1", "run_01-v2")
    assert (tmp_path / "run_01" / "manifest.json").read_bytes() == before
    assert ckpt.save(trainer.state, name="run_01").name == "run_01-v3"


def test_invalid_templates_fail_at_construction(tmp_path: Path) -> None:
    for template in ("a/{epoch}", "{epoch:s}", "..", "{}", "x{val.loss}"):
        with pytest.raises(InvalidNameError):
            Checkpointer(tmp_path, name=template)
    with pytest.raises(InvalidNameError):
        Checkpointer(tmp_path).save({}, name="../escape")


def test_template_missing_value_falls_back_with_warning(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path, name="m_{epoch:02d}_{val_loss:.3f}", every_n_steps=1)
    with pytest.warns(UserWarning, match="val_loss"):
        result = ckpt.step(trainer.state, epoch=0, step=1, epoch_end=False)
    assert result is not None and result.name == "epoch=000-step=000001"


# --------------------------------------------------------------------------------------------------
# Failed saves


class Exploding:
    """A Stateful whose state_dict fails on demand (a save that dies mid-capture)."""

    def __init__(self) -> None:
        self.fail = False

    def state_dict(self) -> dict[str, int]:
        if self.fail:
            raise RuntimeError("boom")
        return {"x": 1}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass


class FailPublish(FileOps):
    """Fails the rename that publishes a checkpoint (a crash between data and commit)."""

    def rename(self, src: str, dst: str) -> None:
        if os.path.basename(src).startswith(".staging-"):
            raise OSError(5, "Input/output error", dst)
        super().rename(src, dst)


def _leftovers(root: Path) -> list[str]:
    return [n for n in os.listdir(root) if n.startswith((".staging-", ".trash-"))]


def test_failed_saves_leave_everything_intact(tmp_path: Path, trainer: Trainer) -> None:
    bomb = Exploding()
    ckpt = Checkpointer(tmp_path, monitor="val_loss", keep_last=1)
    state = {**trainer.state, "bomb": bomb}
    ckpt.step(state, epoch=1, metrics={"val_loss": 0.5})
    bomb.fail = True
    with pytest.raises(UnsupportedTypeError, match="boom"):
        ckpt.step(state, epoch=2, metrics={"val_loss": 0.1})
    bomb.fail = False
    ckpt.storage.ops = FailPublish()
    with pytest.raises(CommitError):
        ckpt.step(state, epoch=3, metrics={"val_loss": 0.1})
    assert names(ckpt) == ["epoch=001"]
    assert _leftovers(tmp_path) == []
    savegame.verify(tmp_path / "epoch=001")
    ckpt.storage.ops = FileOps()
    assert ckpt.step(state, epoch=4, metrics={"val_loss": 0.2}) is not None
    assert names(ckpt) == ["epoch=004"]


def _best_of(history: list[tuple[str, float]]) -> str | None:
    best: tuple[str, float] | None = None
    for name, value in history:
        if best is None or value < best[1]:
            best = (name, value)
    return best[0] if best else None


operation = st.one_of(
    st.tuples(st.just("step"), st.sampled_from([0.1, 0.2, 0.3, 0.5, 0.8, 1.0])),
    st.tuples(st.just("save"), st.sampled_from([0.1, 0.4, 0.9])),
    st.tuples(st.just("fail_capture"), st.just(0.0)),
    st.tuples(st.just("fail_commit"), st.just(0.0)),
    st.tuples(st.just("restart"), st.just(0.0)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(operation, min_size=1, max_size=14),
    keep_last=st.integers(1, 3),
    keep_best=st.sampled_from([None, 1, 2]),
    every=st.integers(1, 2),
)
def test_property_newest_and_best_survive_and_counts_hold(
    ops: list[tuple[str, float]], keep_last: int, keep_best: int | None, every: int
) -> None:
    trainer = Trainer()
    bomb = Exploding()
    state = {**trainer.state, "bomb": bomb}
    with tempfile.TemporaryDirectory() as tmp:

        def make() -> Checkpointer:
            return Checkpointer(tmp, monitor="val_loss", every_n_epochs=every, keep_last=keep_last, keep_best=keep_best)

        ckpt = make()
        history: list[tuple[str, float]] = []  # committed saves, in order
        epoch = 0
        for kind, value in ops:
            before = set(names(ckpt))
            epoch += 1
            trainer.train_step()
            if kind == "restart":
                ckpt = make()
                epoch -= 1
            elif kind == "step":
                result = ckpt.step(state, epoch=epoch, step=epoch, metrics={"val_loss": value})
                if result is not None:
                    history.append((result.name, value))
            elif kind == "save":
                result = ckpt.save(state, epoch=epoch, step=epoch, metrics={"val_loss": value})
                history.append((result.name, value))
            elif kind == "fail_capture":
                bomb.fail = True
                with pytest.raises(UnsupportedTypeError):
                    ckpt.save(state, epoch=epoch, metrics={"val_loss": 0.0})
                bomb.fail = False
            else:
                ckpt.storage.ops = FailPublish()
                with pytest.raises(CommitError):
                    ckpt.save(state, epoch=epoch, metrics={"val_loss": 0.0})
                ckpt.storage.ops = FileOps()
            current = names(ckpt)
            if kind.startswith("fail") or kind == "restart":
                assert set(current) == before
            assert not _leftovers(Path(tmp))
            if history:
                newest, best = history[-1][0], _best_of(history)
                assert newest in current and ckpt.latest is not None and ckpt.latest.name == newest
                assert best in current and ckpt.best is not None and ckpt.best.name == best
            # the newest is among the last; the tracked best is extra only when KeepBest broke a tie differently
            assert len(current) <= keep_last + (keep_best or 0) + 1
            assert len(set(current)) == len(current)


# --------------------------------------------------------------------------------------------------
# Restore, restart modes, quarantine


def test_restore_latest_loads_state_in_place(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path)
    loss = trainer.train_step()
    ckpt.save({**trainer.state, "loss": loss, "history": {"a": [1, 2]}}, epoch=3, step=30, metrics={"val": 1.5})
    fresh = Trainer(seed=1)
    state = {**fresh.state, "loss": 0.0, "history": {}}
    restored = Checkpointer(tmp_path).restore(state)
    assert restored is not None
    assert (restored.epoch, restored.step, dict(restored.metrics)) == (3, 30, {"val": 1.5})
    assert restored.data == {"loss": loss, "history": {"a": [1, 2]}}
    for a, b in zip(trainer.model.parameters(), fresh.model.parameters()):
        assert torch.equal(a, b)
    assert fresh.optimizer.state_dict()["state"][0]["step"] == trainer.optimizer.state_dict()["state"][0]["step"]


def test_restore_restores_the_global_rng(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path)
    ckpt.save(trainer.state, epoch=1)
    expected = torch.rand(3)
    torch.rand(100)
    ckpt.restore(Trainer().state)
    assert torch.equal(torch.rand(3), expected)


def test_restart_modes(tmp_path: Path, trainer: Trainer) -> None:
    assert Checkpointer(tmp_path / "empty").restore(trainer.state) is None
    with pytest.raises(CheckpointNotFoundError):
        Checkpointer(tmp_path / "empty", restart="required").restore(trainer.state)
    Checkpointer(tmp_path / "full").save(trainer.state, epoch=1)
    assert Checkpointer(tmp_path / "full", restart="off").restore(trainer.state) is None
    assert Checkpointer(tmp_path / "full", restart="off").restore(trainer.state, "epoch=001") is not None
    assert Checkpointer(tmp_path / "full", restart="required").restore(trainer.state) is not None


def test_restore_best_and_by_name(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path, monitor="val_loss")
    snapshots = []
    for i, value in enumerate([0.5, 0.1, 0.3]):
        trainer.train_step()
        ckpt.step(trainer.state, epoch=i + 1, metrics={"val_loss": value})
        snapshots.append([p.detach().clone() for p in trainer.model.parameters()])
    fresh = Trainer(seed=3)
    restored = ckpt.restore(fresh.state, "best")
    assert restored is not None and restored.epoch == 2
    assert all(torch.equal(a, b) for a, b in zip(snapshots[1], fresh.model.parameters()))
    assert ckpt.restore(fresh.state, "epoch=001") is not None
    assert all(torch.equal(a, b) for a, b in zip(snapshots[0], fresh.model.parameters()))
    with pytest.raises(CheckpointNotFoundError):
        ckpt.restore(fresh.state, "nope")
    with pytest.raises(CheckpointNotFoundError, match="monitor"):
        Checkpointer(tmp_path).restore(fresh.state, "best")


def test_restore_strictness(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path)
    ckpt.save({"model": trainer.model}, epoch=1)
    extra = {**trainer.state, "scheduler": torch.optim.lr_scheduler.StepLR(trainer.optimizer, 2)}
    with pytest.raises(StateMismatchError, match="optimizer"):
        ckpt.restore(extra)
    with pytest.warns(ResumeWarning):
        assert ckpt.restore(extra, strict=False) is not None
    with pytest.raises(StateMismatchError):
        ckpt.restore({"model": nn.Linear(4, 2)})


def test_weights_only(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path, weights_only=True)
    result = ckpt.save({**trainer.state, "epoch": 3}, epoch=3)
    manifest = savegame.read_manifest(result.path)
    assert list(manifest.items) == ["model"]
    assert ckpt.list()[0].weights_only
    fresh = Trainer(seed=5)
    with pytest.warns(ResumeWarning, match="optimizer"):
        restored = ckpt.restore(fresh.state)
    assert restored is not None and restored.epoch == 3
    assert all(torch.equal(a, b) for a, b in zip(trainer.model.parameters(), fresh.model.parameters()))
    with pytest.raises(ConfigError, match="Module"):
        ckpt.save({"optimizer": trainer.optimizer})


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_newest_is_quarantined_and_previous_restored(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path)
    trainer.train_step()
    ckpt.save(trainer.state, epoch=1)
    good = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train_step()
    ckpt.save(trainer.state, epoch=2)
    _flip_byte(tmp_path / "epoch=002" / "model.safetensors")

    fresh = Trainer(seed=9)
    resumer = Checkpointer(tmp_path)
    with pytest.warns(ResumeWarning, match="epoch=002"):
        restored = resumer.restore(fresh.state)
    assert restored is not None and restored.name == "epoch=001" and restored.quarantined == ("epoch=002",)
    assert all(torch.equal(a, b) for a, b in zip(good, fresh.model.parameters()))
    quarantined = resumer.storage.quarantined()
    assert len(quarantined) == 1 and quarantined[0].startswith(".quarantine-epoch=002")
    assert names(resumer) == ["epoch=001"]
    # the next save continues the sequence and is the newest
    assert resumer.save(fresh.state, epoch=2).name == "epoch=002"


def test_verified_resume_reads_each_file_once(
    tmp_path: Path, trainer: Trainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from savegame.storage.local import LocalCheckpointReader

    ckpt = Checkpointer(tmp_path)
    trainer.train_step()
    ckpt.save({**trainer.state, "stats": {"seen": torch.arange(5)}}, epoch=1)
    reads: list[str] = []
    original = LocalCheckpointReader.read_file

    def counting(self: LocalCheckpointReader, file: str, size: int) -> object:
        reads.append(file)
        return original(self, file, size)

    monkeypatch.setattr(LocalCheckpointReader, "read_file", counting)
    fresh = Trainer(seed=3)
    restored = Checkpointer(tmp_path).restore({**fresh.state, "stats": None})
    assert restored is not None and torch.equal(restored.data["stats"]["seen"], torch.arange(5))
    assert all(torch.equal(a, b) for a, b in zip(trainer.model.parameters(), fresh.model.parameters()))
    # Verified once each: load checks the files it restores from, the rest are checked before it.
    assert sorted(reads) == ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "stats.safetensors"]


def test_damage_in_an_item_not_restored_still_fails_the_resume(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path)
    ckpt.save({**trainer.state, "stats": {"seen": torch.arange(5)}}, epoch=1)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train_step()
    ckpt.save({**trainer.state, "stats": {"seen": torch.arange(5)}}, epoch=2)
    _flip_byte(tmp_path / "epoch=002" / "stats.safetensors")
    fresh = Trainer(seed=4)
    with pytest.warns(ResumeWarning, match="epoch=002"):
        restored = Checkpointer(tmp_path).restore(fresh.state)  # "stats" is not asked for, still verified
    assert restored is not None and restored.name == "epoch=001" and restored.quarantined == ("epoch=002",)
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.model.parameters()))


def test_corrupted_manifest_is_quarantined(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path)
    ckpt.save(trainer.state, epoch=1)
    ckpt.save(trainer.state, epoch=2)
    manifest = tmp_path / "epoch=002" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"epoch": 2', b'"epoch": 7'))
    with pytest.warns(ResumeWarning):
        restored = Checkpointer(tmp_path).restore(trainer.state)
    assert restored is not None and restored.name == "epoch=001"


def test_all_corrupted_required_raises(tmp_path: Path, trainer: Trainer) -> None:
    Checkpointer(tmp_path).save(trainer.state, epoch=1)
    _flip_byte(tmp_path / "epoch=001" / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResumeWarning)
        with pytest.raises(CheckpointNotFoundError, match="quarantined"):
            Checkpointer(tmp_path, restart="required").restore(trainer.state)


def test_best_corrupted_raises_without_quarantine(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path, monitor="val_loss")
    run_epochs(ckpt, trainer, [0.1, 0.5], final=False)
    _flip_byte(tmp_path / "epoch=001-step=000001" / "model.safetensors")
    with pytest.raises(savegame.CorruptCheckpointError):
        ckpt.restore(trainer.state, "best")
    assert ckpt.storage.quarantined() == []


def test_staging_leftovers_of_dead_writers_are_cleaned(tmp_path: Path) -> None:
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / f".staging-{socket.gethostname()}-{dead.pid}-abc"
    leftover.mkdir(parents=True)
    Checkpointer(tmp_path)
    assert not leftover.exists()


# --------------------------------------------------------------------------------------------------
# Exact resume after SIGKILL mid-epoch

TRAIN_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from savegame.run.checkpointer import Checkpointer
    from savegame.data import ResumableRandomSampler

    directory, epochs, slow = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "slow"
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    x, y = torch.randn(200, 6), torch.randint(0, 3, (200,))
    dataset = TensorDataset(x, y)
    sampler = ResumableRandomSampler(dataset, seed=7)
    loader = DataLoader(dataset, batch_size=16, sampler=sampler, generator=torch.Generator())
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ckpt = Checkpointer(directory, every_n_steps=3, keep_last=2)
    state = {"model": model, "optimizer": opt, "sampler": sampler}
    restored = ckpt.restore(state)
    start, step = (restored.epoch or 0, restored.step or 0) if restored else (0, 0)
    if restored:
        print("RESUMED", restored.name, sampler.position, flush=True)
    for epoch in range(start, epochs):
        sampler.set_epoch(epoch)
        model.train()
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            step += 1
            ckpt.step(state, epoch=epoch, step=step, epoch_end=False)
            print("STEP", epoch, step, flush=True)
            if slow:
                time.sleep(0.01)
        ckpt.step(state, epoch=epoch + 1, step=step, final=epoch + 1 == epochs)
    print("FINAL", "".join(p.detach().numpy().tobytes().hex() for p in model.parameters()), flush=True)
    """
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH")) if p)
    env.setdefault("TORCHDYNAMO_DISABLE", "1")  # no torch.compile here; skips a ~3 s import
    return env


def _final(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("FINAL ")]
    assert lines, output
    return lines[-1].split()[1]


@pytest.mark.subprocess
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    run_dir, ref_dir = tmp_path / "run", tmp_path / "ref"
    epochs, steps_per_epoch = 3, 13
    reference = subprocess.Popen(  # the uninterrupted run, in parallel
        [sys.executable, str(script), str(ref_dir), str(epochs), "fast"],
        stdout=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run_dir), str(epochs), "slow"],
        stdout=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    assert proc.stdout is not None
    killed_at = None
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        parts = line.split()
        if parts and parts[0] == "STEP" and int(parts[2]) >= steps_per_epoch + 5:  # inside epoch 2
            proc.send_signal(signal.SIGKILL)
            killed_at = int(parts[2])
            break
        assert time.monotonic() < deadline
    proc.wait()
    assert killed_at is not None and proc.returncode == -signal.SIGKILL

    resumed = subprocess.run(
        [sys.executable, str(script), str(run_dir), str(epochs), "fast"],
        capture_output=True, text=True, env=_env(), timeout=120, check=True,
    )  # fmt: skip
    assert "RESUMED" in resumed.stdout
    resumed_line = next(line for line in resumed.stdout.splitlines() if line.startswith("RESUMED"))
    assert int(resumed_line.split()[2]) > 0  # resumed mid-epoch, not at an epoch boundary
    reference_out, _ = reference.communicate(timeout=120)
    assert reference.returncode == 0 and "RESUMED" not in reference_out
    assert _final(resumed.stdout) == _final(reference_out)


def test_in_process_mid_epoch_resume_matches(tmp_path: Path) -> None:
    """The same guarantee without processes: stop mid-epoch, restore into fresh objects, compare."""
    from torch.utils.data import DataLoader, TensorDataset

    from savegame.data import ResumableRandomSampler

    def run(directory: Path, stop_at: int | None) -> list[torch.Tensor] | None:
        torch.manual_seed(0)
        x, y = torch.randn(100, 5), torch.randn(100, 1)
        dataset = TensorDataset(x, y)
        sampler = ResumableRandomSampler(dataset, seed=1)
        loader = DataLoader(dataset, batch_size=8, sampler=sampler, generator=torch.Generator())
        model = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.2), nn.Linear(16, 1))
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        ckpt = Checkpointer(directory, every_n_steps=5)
        state = {"model": model, "optimizer": opt, "sampler": sampler}
        restored = ckpt.restore(state)
        start, step = (restored.epoch or 0, restored.step or 0) if restored else (0, 0)
        for epoch in range(start, 3):
            sampler.set_epoch(epoch)
            for xb, yb in loader:
                opt.zero_grad()
                nn.functional.mse_loss(model(xb), yb).backward()
                opt.step()
                step += 1
                ckpt.step(state, epoch=epoch, step=step, epoch_end=False)
                if step == stop_at:
                    return None
            ckpt.step(state, epoch=epoch + 1, step=step)
        return [p.detach().clone() for p in model.parameters()]

    assert run(tmp_path / "a", stop_at=22) is None  # 13 steps per epoch: stops inside epoch 2
    resumed = run(tmp_path / "a", stop_at=None)
    reference = run(tmp_path / "b", stop_at=None)
    assert resumed is not None and reference is not None
    assert all(torch.equal(a, b) for a, b in zip(resumed, reference))


def test_list_records(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path, monitor="val_loss", metadata={"run": "x"})
    run_epochs(ckpt, trainer, [0.3, 0.4])
    records = ckpt.list()
    assert [r.sequence for r in records] == [1, 2]
    assert [(r.is_best, r.is_latest) for r in records] == [(True, False), (False, True)]
    assert all(r.size > 0 and r.created.tzinfo is not None for r in records)
    assert savegame.read_manifest(records[0].path).metadata == {"run": "x"}



# --------------------------------------------------------------------------------------------------
# Background saves


def test_background_saves_commit_and_apply_retention(tmp_path: Path, trainer: Trainer) -> None:
    with Checkpointer(tmp_path, monitor="val_loss", keep_last=1, background=True) as ckpt:
        results = run_epochs(ckpt, trainer, [0.5, 0.2, 0.4, 0.6])
        assert all(r is not None and r.pending is not None and r.size is None for r in results)
        snapshot = [p.detach().clone() for p in trainer.model.parameters()]
        for _ in range(3):
            trainer.train_step()  # training goes on while the last save is written
    assert names(ckpt) == ["epoch=002-step=000002", "epoch=004-step=000004"]  # best + newest
    fresh = Trainer(seed=4)
    restored = Checkpointer(tmp_path).restore(fresh.state)
    assert restored is not None and restored.epoch == 4
    assert all(torch.equal(a, b) for a, b in zip(snapshot, fresh.model.parameters()))


def test_background_failure_is_raised_at_the_next_call(tmp_path: Path, trainer: Trainer) -> None:
    ckpt = Checkpointer(tmp_path, monitor="val_loss", background=True)
    ckpt.save(trainer.state, epoch=1, metrics={"val_loss": 0.5})
    ckpt.wait()
    ckpt.storage.ops = FailPublish()
    result = ckpt.save(trainer.state, epoch=2, metrics={"val_loss": 0.1})
    assert result.is_best  # optimistic until the commit fails
    assert result.pending is not None
    while not result.pending.done():  # fails, but nobody collects the error through the handle
        time.sleep(0.01)
    with pytest.raises(savegame.BackgroundSaveError):  # so the Checkpointer reports it at the next call
        ckpt.step(trainer.state, epoch=3, metrics={"val_loss": 0.9})
    ckpt.storage.ops = FileOps()
    assert names(ckpt) == ["epoch=001"]
    assert ckpt.best is not None and ckpt.best.name == "epoch=001"  # corrected from the directory
    second = ckpt.save(trainer.state, epoch=3, metrics={"val_loss": 0.3})
    ckpt.close()
    assert second.is_best and names(ckpt) == ["epoch=001", "epoch=003"]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("older", [False, True], ids=["only-one", "with-older"])
def test_a_checkpoint_of_a_newer_savegame_stops_the_resume(tmp_path: Path, older: bool) -> None:
    """The newest checkpoint, written by a newer savegame (a signed manifest of a format this one does not
    read), is not damage: restore() returned None (training started over) or quietly resumed an older
    one, with a log line only. It now raises UnsupportedFormatError and changes nothing."""
    import json

    from savegame.errors import UnsupportedFormatError
    from savegame.format.manifest import sign_manifest

    model = nn.Linear(2, 2)
    with Checkpointer(tmp_path, name="e{epoch:02d}") as ckpt:
        for epoch in ((1, 2) if older else (2,)):
            ckpt.save({"model": model}, epoch=epoch)
    manifest = tmp_path / "e02" / "manifest.json"
    body = json.loads(manifest.read_bytes())
    body["format_version"] = 99
    manifest.write_bytes(sign_manifest(body))
    before = sorted(p.name for p in tmp_path.iterdir())
    target = nn.Linear(2, 2)
    weight = target.weight.detach().clone()
    with Checkpointer(tmp_path, name="e{epoch:02d}") as ckpt, pytest.raises(UnsupportedFormatError, match="upgrade"):
        ckpt.restore({"model": target})
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing quarantined
    assert torch.equal(target.weight, weight)


def test_a_checkpoint_whose_manifest_was_deleted_is_not_passed_over_in_silence(tmp_path: Path) -> None:
    """Every other damage to a manifest quarantines the checkpoint with a warning; a deleted one made the
    folder "not a checkpoint" and the resume fell back to the older one without a word."""
    model = nn.Linear(2, 2)
    with Checkpointer(tmp_path, name="e{epoch:02d}") as ckpt:
        for epoch in (1, 2):
            ckpt.save({"model": model}, epoch=epoch)
    (tmp_path / "e02" / "manifest.json").unlink()
    (tmp_path / "notes").mkdir()  # a user's folder without data files: not mentioned
    with Checkpointer(tmp_path, name="e{epoch:02d}") as ckpt:
        with pytest.warns(savegame.ResumeWarning, match=r"e02: holds savegame data files but no manifest\.json"):
            restored = ckpt.restore({"model": nn.Linear(2, 2)})
    assert restored is not None and restored.epoch == 1
    assert (tmp_path / "e02" / "model.safetensors").exists()  # left where it was
