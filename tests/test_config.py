"""Tests for savegame.config: CANDLE parameter files, command-line overrides, presets."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import savegame
from savegame.config import (
    PRESETS,
    CheckpointConfig,
    load_parameters,
    parse_value,
    preset_checkpointer,
    read_parameter_file,
)
from savegame.errors import ConfigError
from savegame.policies import KeepExponential, KeepLast, KeepUnion
from savegame.run.checkpointer import Checkpointer

DEFAULT_MODEL = textwrap.dedent(
    """
    # a comment
    [Global_Params]
    model_name = 'mnist'
    epochs=4
    batch_size=32
    learning_rate=0.01
    dense=[64, 32]
    activation=relu
    evil=__import__('os').system('touch PWNED')
    ; another comment
    [Monitor_Params]
    ckpt_restart_mode='auto'
    ckpt_save_interval=2
    ckpt_save_best=True
    ckpt_save_best_metric='val_accuracy'
    ckpt_keep_limit=2
    ckpt_checksum=True
    metadata='job 42'
    """
)


@pytest.fixture
def param_file(tmp_path: Path) -> Path:
    path = tmp_path / "default_model.txt"
    path.write_text(DEFAULT_MODEL)
    return path


def loop(ckpt: Checkpointer, values: list[float], metric: str = "val_accuracy") -> list[int]:
    """Train a tiny model ``len(values)`` epochs; return the epochs that were saved."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = []
    for i, value in enumerate(values):
        opt.zero_grad()
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
        if ckpt.step({"model": model, "optimizer": opt}, epoch=i + 1, step=i + 1, metrics={metric: value}):
            saved.append(i + 1)
    return saved


def test_read_parameter_file_uses_literals_only(
    param_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    params = read_parameter_file(param_file)
    assert params["model_name"] == "mnist" and params["epochs"] == 4 and params["dense"] == [64, 32]
    assert params["learning_rate"] == 0.01 and params["ckpt_save_best"] is True
    assert params["activation"] == "relu"  # not a literal: kept as text
    assert params["evil"] == "__import__('os').system('touch PWNED')"
    assert not (tmp_path / "PWNED").exists()


def test_parse_value() -> None:
    assert parse_value(" 3 ") == 3 and parse_value("None") is None and parse_value("(1, 'a')") == (1, "a")
    assert parse_value("val_loss") == "val_loss"


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        read_parameter_file(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("no section header\nx=1\n")
    with pytest.raises(ConfigError, match="malformed"):
        read_parameter_file(bad)


def test_command_line_overrides(param_file: Path, tmp_path: Path) -> None:
    argv = ["--ckpt_save_interval", "5", "--epochs", "3", "--ckpt-keep-limit", "7", "--dense", "[8]",
            "--ckpt_directory", str(tmp_path / "out"), "--ckpt_save_best", "false"]  # fmt: skip
    params = load_parameters(param_file, argv)
    assert params["ckpt_save_interval"] == 5 and params["epochs"] == 3 and params["ckpt_keep_limit"] == 7
    assert params["dense"] == [8] and params["ckpt_save_best"] is False
    assert params["batch_size"] == 32  # untouched
    config = CheckpointConfig.from_params(params)
    assert (config.save_interval, config.keep_limit, config.max_epochs, config.save_best) == (5, 7, 3, False)
    assert config.directory == str(tmp_path / "out")


def test_config_file_option_replaces_the_default(param_file: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.txt"
    other.write_text("[Global_Params]\nepochs=9\nckpt_save_interval=0\n")
    params = load_parameters(param_file, ["--config_file", str(other)])
    assert params["epochs"] == 9 and "batch_size" not in params


def test_unknown_option_is_a_usage_error(param_file: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        load_parameters(param_file, ["--ckpt_save_intervall", "2"])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    "params",
    [
        {"ckpt_save_intervall": 2},
        {"ckpt_save_interval": -1},
        {"ckpt_save_interval": "often"},
        {"ckpt_save_best": "maybe"},
        {"ckpt_restart_mode": "sometimes"},
        {"ckpt_keep_mode": "all", "ckpt_keep_limit": 3},
        {"ckpt_keep_limit": 0},
        {"ckpt_preset": "huge"},
        {"ckpt_directory": ""},
    ],
)
def test_invalid_values(params: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        CheckpointConfig.from_params(params)


def test_accuracy_metric_is_maximised_and_interval_zero_keeps_best_and_end(tmp_path: Path) -> None:
    params = {"ckpt_save_interval": 0, "ckpt_save_best": True, "ckpt_save_best_metric": "val_accuracy",
              "ckpt_directory": str(tmp_path), "epochs": 6}  # fmt: skip
    ckpt = CheckpointConfig.from_params(params).build()
    assert ckpt.mode == "max"
    assert loop(ckpt, [0.5, 0.7, 0.6, 0.8, 0.75, 0.7]) == [1, 2, 4, 6]  # improvements + the final epoch
    assert ckpt.best is not None and ckpt.best.epoch == 4


def test_interval_zero_without_best_still_saves_the_end(tmp_path: Path) -> None:
    config = CheckpointConfig(directory=str(tmp_path), save_interval=0, save_best=False, max_epochs=3)
    assert loop(config.build(), [0.1, 0.2, 0.3]) == [3]


def test_skip_epochs_interval_and_keep_limit(tmp_path: Path) -> None:
    config = CheckpointConfig(directory=str(tmp_path), save_interval=2, skip_epochs=3, save_best=True,
                              save_best_metric="val_loss", keep_limit=1, max_epochs=8)  # fmt: skip
    ckpt = config.build()
    assert loop(ckpt, [0.9, 0.8, 0.7, 0.75, 0.72, 0.6, 0.65, 0.64], metric="val_loss") == [3, 4, 6, 8]
    assert [r.epoch for r in ckpt.list()] == [6, 8]  # the newest + the best


def test_metadata_checksum_weights_only_and_restart(tmp_path: Path) -> None:
    params = {"ckpt_directory": str(tmp_path), "metadata": "job 42", "ckpt_checksum": False,
              "ckpt_save_weights_only": True, "ckpt_restart_mode": "required", "ckpt_save_best": False}  # fmt: skip
    ckpt = CheckpointConfig.from_params(params).build()
    assert ckpt.verify is False and ckpt.weights_only and ckpt.restart == "required"
    loop(ckpt, [1.0])
    record = ckpt.list()[0]
    manifest = savegame.read_manifest(record.path)
    assert manifest.metadata == {"metadata": "job 42"} and list(manifest.items) == ["model"]


def test_keep_modes() -> None:
    assert CheckpointConfig(keep_mode="linear", keep_limit=3).keep_policy() == KeepLast(3)
    assert CheckpointConfig(keep_mode="linear").keep_policy() is None
    assert CheckpointConfig(keep_mode="all").keep_policy() is None
    assert CheckpointConfig(keep_mode="exponential").keep_policy() == KeepExponential()
    assert CheckpointConfig(keep_mode="exponential", keep_limit=4).keep_policy() == KeepUnion(
        KeepExponential(), KeepLast(4)
    )


def test_presets_short_normal_long(tmp_path: Path) -> None:
    short = Checkpointer.preset("short", tmp_path / "short", monitor="val_loss", max_epochs=5)
    assert loop(short, [0.5, 0.4, 0.3, 0.2, 0.1], metric="val_loss") == [5]

    normal = Checkpointer.preset("normal", tmp_path / "normal", monitor="val_loss", max_epochs=14)
    values = [0.1] + [0.5] * 13
    assert loop(normal, values, metric="val_loss") == list(range(1, 15))
    kept = [r.epoch for r in normal.list()]
    assert kept == [1, *range(5, 15)]  # the 10 newest + the best

    long = preset_checkpointer("long", tmp_path / "long", monitor="val_loss", max_epochs=12)
    saved = loop(long, [0.5, 0.6, 0.7, 0.8, 0.9, 0.4, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9], metric="val_loss")
    assert saved == [1, 5, 6, 10, 12]  # first improvement, epochs 5 and 10, improvement, end

    without_monitor = Checkpointer.preset("normal", tmp_path / "nomon")
    assert without_monitor.monitor is None


def test_preset_in_params_with_overrides(tmp_path: Path) -> None:
    config = CheckpointConfig.from_params({"ckpt_preset": "long", "ckpt_keep_limit": 3})
    assert config.save_interval == PRESETS["long"].save_interval and config.keep_limit == 3
    assert config.keep_mode == "exponential"
    assert CheckpointConfig.from_params({}, preset="short").save_interval == 0
    with pytest.raises(ConfigError, match="preset"):
        Checkpointer.preset("medium", tmp_path)


def test_candle_file_end_to_end(param_file: Path, tmp_path: Path) -> None:
    params = load_parameters(param_file, ["--ckpt_directory", str(tmp_path / "ck")])
    ckpt = CheckpointConfig.from_params(params).build()
    assert ckpt.monitor == "val_accuracy" and ckpt.mode == "max" and ckpt.max_epochs == 4
    assert loop(ckpt, [0.3, 0.2, 0.25, 0.1]) == [1, 2, 4]  # best at 1, interval at 2, end at 4
    assert [r.epoch for r in ckpt.list()] == [1, 2, 4]  # keep_limit 2 + best (epoch 1)
