"""Tests for savegame.cli.demo: the kill -9 / resume / bit-identical demo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from savegame.cli import demo

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.mark.subprocess
@pytest.mark.slow
def test_demo_kills_resumes_and_matches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--dir", str(tmp_path / "demo"), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "SIGKILL -> pid" in out and "exit status -9" in out
    assert "RESUMED name=" in out
    assert "identical: yes" in out
    table = out.split("3. checkpoints in", 1)[1].split("4. uninterrupted", 1)[0]
    assert "name" in table and "val_accuracy" in table and "best" in table and "KiB" in table
    hashes = [line.split(":")[1].strip() for line in out.splitlines() if line.strip().startswith(("killed", "uninter"))]
    assert len(hashes) == 2 and hashes[0] == hashes[1] and len(hashes[0]) == 64
    assert sorted(os.listdir(tmp_path / "demo")) == ["checkpoints", "reference"]


def test_format_table_and_sizes() -> None:
    import datetime as dt

    from savegame.run.checkpointer import CheckpointRecord

    record = CheckpointRecord(
        name="epoch=01-step=0045", path="/x", sequence=1, epoch=1, step=45,
        metrics={"val_loss": 0.5, "val_accuracy": 0.9}, created=dt.datetime.now(dt.timezone.utc),
        size=3 * 1024 * 1024, is_best=True, is_latest=True, weights_only=False, pinned=False,
    )  # fmt: skip
    table = demo.format_table([record])
    assert "epoch=01-step=0045" in table and "0.9000" in table and "best latest" in table and "3.0 MiB" in table


def test_bad_arguments_exit_with_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        demo.main(["--epochs", "1"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        demo.main(["--dir", str(tmp_path), "--kill-at-step", "100000"])


@pytest.mark.subprocess
def test_module_entry_point_help() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)}
    result = subprocess.run([sys.executable, "-m", "savegame.cli.demo", "--help"], capture_output=True, text=True,
                            env=env, timeout=120)  # fmt: skip
    assert result.returncode == 0 and "--dir" in result.stdout
