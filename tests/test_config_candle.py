"""CANDLE's own keys and defaults: ``ckpt_metadata``, ``ckpt_directory=None`` and where savegame differs."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import savegame
from savegame.config import KEYS, CheckpointConfig, load_parameters
from savegame.errors import CheckpointError, ConfigError


def _train(config: CheckpointConfig, epochs: range) -> savegame.Checkpointer:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = config.build()
    state = {"model": model, "optimizer": opt}
    ckpt.restore(state)
    for epoch in epochs:
        opt.zero_grad()
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
        ckpt.step(state, epoch=epoch, step=epoch, metrics={"val_loss": 1.0 / epoch})
    ckpt.close()
    return ckpt


def test_ckpt_metadata_is_stored_in_every_manifest(tmp_path: Path) -> None:
    config = CheckpointConfig.from_params(
        {"ckpt_directory": str(tmp_path), "ckpt_metadata": "job 42 on node7", "epochs": 2}
    )
    ckpt = _train(config, range(1, 3))
    records = ckpt.list()
    assert records
    for record in records:
        assert savegame.read_manifest(record.path).metadata == {"metadata": "job 42 on node7"}


def test_ckpt_metadata_from_a_candle_file_and_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "default_model.txt"
    path.write_text(textwrap.dedent("""
        [Global_Params]
        epochs=2
        ckpt_metadata='from the file'
    """))
    assert CheckpointConfig.from_params(load_parameters(path, [])).metadata == "from the file"
    params = load_parameters(path, ["--ckpt_metadata", "job 7"])
    assert CheckpointConfig.from_params(params).metadata == "job 7"


def test_ckpt_metadata_and_metadata_must_agree() -> None:
    assert CheckpointConfig.from_params({"ckpt_metadata": "a", "metadata": "a"}).metadata == "a"
    assert CheckpointConfig.from_params({"ckpt_metadata": None, "metadata": "b"}).metadata == "b"
    with pytest.raises(ConfigError, match="ckpt_metadata='a' and metadata='b' disagree") as caught:
        CheckpointConfig.from_params({"ckpt_metadata": "a", "metadata": "b"})
    assert isinstance(caught.value, CheckpointError)


def test_ckpt_directory_none_is_output_dir_ckpts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    config = CheckpointConfig.from_params({"ckpt_directory": None, "output_dir": str(out)})
    assert config.directory == os.path.join(str(out), "ckpts")
    ckpt = _train(config, range(1, 2))
    assert [Path(r.path).parent for r in ckpt.list()] == [out / "ckpts"]
    monkeypatch.chdir(tmp_path)  # no output_dir: the ckpt module's own default
    assert CheckpointConfig.from_params({"ckpt_directory": None}).directory == "./save"
    assert CheckpointConfig.from_params({}).directory == "./save"  # absent: unchanged default
    # on the command line, as CANDLE's parser gives it
    params = load_parameters(None, ["--ckpt_directory", "None"], defaults={"output_dir": str(out)})
    assert CheckpointConfig.from_params(params).directory == os.path.join(str(out), "ckpts")
    with pytest.raises(ConfigError, match="output_dir must be a path"):
        CheckpointConfig.from_params({"ckpt_directory": None, "output_dir": 5})
    with pytest.raises(ConfigError, match="ckpt_directory must be a non-empty string"):
        CheckpointConfig.from_params({"ckpt_directory": ""})


def test_keys_documented_for_the_command_line() -> None:
    assert "ckpt_metadata" in KEYS and KEYS["ckpt_directory"].optional


def test_keep_limit_counts_the_checkpoints_of_earlier_processes(tmp_path: Path) -> None:
    """As documented (where savegame differs from CANDLE): after a restart the limit covers the run's
    checkpoints written before it too, so the directory holds the newest N (and the best), not N more."""
    params = {"ckpt_directory": str(tmp_path), "ckpt_keep_limit": 2, "ckpt_save_best": False, "epochs": 6}
    _train(CheckpointConfig.from_params(params), range(1, 4))
    ckpt = _train(CheckpointConfig.from_params(params), range(4, 7))  # a restart: resumes at epoch 3
    assert [r.epoch for r in ckpt.list()] == [5, 6]


def test_interval_default_is_one_and_zero_keeps_best_and_end() -> None:
    assert CheckpointConfig().save_interval == 1  # CANDLE's parser says 0 (its ckpt module 1)
    assert "best/end saves still happen" in KEYS["ckpt_save_interval"].help


def test_best_settings_without_save_best_are_not_an_error(tmp_path: Path) -> None:
    """CANDLE files list every key: ``ckpt_save_best=False`` with ``ckpt_save_best_mode='min'`` and a
    ``ckpt_best_metric_last`` builds a Checkpointer that tracks no best (mode and threshold without a
    monitor are refused when passed to the Checkpointer directly)."""
    from savegame.config import CheckpointConfig

    config = CheckpointConfig.from_params({"ckpt_save_best": False, "ckpt_save_best_mode": "min",
                                           "ckpt_best_metric_last": 0.5, "ckpt_directory": str(tmp_path)})  # fmt: skip
    with config.build() as ckpt:
        assert ckpt.monitor is None
