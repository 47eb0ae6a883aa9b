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

import pytest
from _kerashelp import ROOT

EXAMPLES = ROOT / "examples"


def _run_example(
    name: str, args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> str:
    path = EXAMPLES / name
    with monkeypatch.context() as patch:
        patch.setattr(sys, "argv", [str(path), *args])
        runpy.run_path(str(path), run_name="__main__")
    return capsys.readouterr().out


def test_seed000_best_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _run_example("keras_seed000_best_weights.py", [str(tmp_path / "out")], monkeypatch, capsys)
    assert "restored val_loss" in out
    assert "val_loss improved from" in out  # verbose=1 prints Keras's messages


def test_seed004_named_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _run_example("keras_seed004_named_checkpoints.py", [str(tmp_path / "out")], monkeypatch, capsys)
    names = [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("xception_v1_")]
    assert names and len(names) <= 3 and all(len(n) == len("xception_v1_01_0.123") for n in names)
    assert (tmp_path / "out" / "best.weights.h5").is_file()


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
