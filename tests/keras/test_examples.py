"""The Keras examples run (under this process's backend) and do what they print.

They run in this process (``runpy``, as ``__main__`` with their command line): starting a fresh Python
for each would cost a Keras import apiece. The seed 001 example is run twice, as a user re-running the
script would; the second run builds a second copy of the model in this process (layer names
``dense_3``...), which the restore matches by structure.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from _kerashelp import ROOT, EpochRecorder, arrays

import savegame.keras

EXAMPLES = ROOT / "examples"


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Every ``fit`` the example runs gets a :class:`EpochRecorder` appended; ``models`` holds the models fitted."""
    seen: dict[str, Any] = {"models": [], "recorders": []}
    fit = keras.Model.fit

    def recording_fit(self: Any, *args: Any, callbacks: Any = None, **kwargs: Any) -> Any:
        recorder = EpochRecorder()
        seen["models"].append(self)
        seen["recorders"].append(recorder)
        return fit(self, *args, callbacks=[*(callbacks or []), recorder], **kwargs)

    monkeypatch.setattr(keras.Model, "fit", recording_fit)
    return seen


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))


def _run_example(
    name: str, args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> str:
    path = EXAMPLES / name
    with monkeypatch.context() as patch:
        patch.setattr(sys, "argv", [str(path), *args])
        runpy.run_path(str(path), run_name="__main__")
    return capsys.readouterr().out


def test_seed000_best_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], recorded: dict[str, Any]
) -> None:
    loaded: list[Any] = []
    load_weights = savegame.keras.load_weights

    def spy(model: Any, *args: Any, **kwargs: Any) -> Any:
        report = load_weights(model, *args, **kwargs)
        loaded.append(arrays(model.weights))
        return report

    monkeypatch.setattr(savegame.keras, "load_weights", spy)
    out = _run_example("keras_seed000_best_weights.py", [str(tmp_path / "out")], monkeypatch, capsys)
    assert "restored val_loss" in out
    assert "val_loss improved from" in out  # verbose=1 prints Keras's messages
    (recorder,) = recorded["recorders"]
    losses = [logs["val_loss"] for logs in recorder.logs]
    best = int(np.argmin(losses))  # the first epoch with the lowest val_loss (Keras's strict improvement)
    assert len(loaded) == 1 and _same(loaded[0], recorder.weights[best])  # the best epoch's weights, exactly
    if best != len(losses) - 1:
        assert not _same(loaded[0], recorder.weights[-1])


def test_seed004_named_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], recorded: dict[str, Any]
) -> None:
    _run_example("keras_seed004_named_checkpoints.py", [str(tmp_path / "out")], monkeypatch, capsys)
    names = [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("xception_v1_")]
    assert names and len(names) <= 3 and all(len(n) == len("xception_v1_01_0.123") for n in names)
    exported = tmp_path / "out" / "best.weights.h5"
    assert exported.is_file()
    (model,), (recorder,) = recorded["models"], recorded["recorders"]
    accuracies = [logs["val_accuracy"] for logs in recorder.logs]
    best = int(np.argmax(accuracies))  # the first epoch with the highest val_accuracy
    assert f"xception_v1_{best + 1:02d}_{accuracies[best]:.3f}" in names
    model.load_weights(str(exported))  # the Keras file the example wrote holds that epoch's weights
    assert _same(arrays(model.weights), recorder.weights[best])


def test_seed001_candle_style_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    _run_example("keras_seed001_candle.py", ["--ckpt_directory", "save", "--epochs", "2"], monkeypatch, capsys)
    again = _run_example("keras_seed001_candle.py", ["--ckpt_directory", "save", "--epochs", "3"], monkeypatch, capsys)
    assert "Resumed from" in again and "(epoch 2)" in again
    assert "Epoch 3/3" in again and "Epoch 1/3" not in again  # only the remaining epoch is trained
    kept = sorted(p.name for p in (tmp_path / "save" / "digits_keras").iterdir() if not p.name.startswith("."))
    assert kept[-1].startswith("epoch=003") and len(kept) <= 3


def test_seed001_candle_interval_counts_epochs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--ckpt_save_interval 2`` saves every second epoch (and the last), not every 2 batches."""
    monkeypatch.chdir(tmp_path)
    args = ["--ckpt_directory", "save", "--epochs", "5", "--ckpt_save_interval", "2", "--ckpt_save_best", "False",
            "--ckpt_keep_limit", "10"]
    _run_example("keras_seed001_candle.py", args, monkeypatch, capsys)
    kept = sorted(p.name for p in (tmp_path / "save" / "digits_keras").iterdir() if not p.name.startswith("."))
    assert [name.split("-")[0] for name in kept] == ["epoch=002", "epoch=004", "epoch=005"], kept
