"""Progress bars and log lines of saves and loads: drawn only on a terminal (or when forced) and only for
long operations; every save and load logs bytes, time and throughput."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest

import savegame
from savegame._util import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_draws_on_a_terminal_after_the_delay_and_never_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAVEGAME_PROGRESS", raising=False)
    term, pipe = Terminal(), io.StringIO()
    for stream in (term, pipe):
        bar = progress.ProgressBar("saving x", 100, stream=stream, show_after=0.0)
        bar.advance(50)
        bar.advance(50)
        bar.close()
    assert "saving x [" in term.getvalue() and "100%" in term.getvalue() and term.getvalue().endswith("\n")
    assert pipe.getvalue() == ""
    quiet = Terminal()
    bar = progress.ProgressBar("saving y", 100, stream=quiet)  # default delay: short operations stay quiet
    bar.advance(100)
    bar.close()
    assert quiet.getvalue() == ""
    monkeypatch.setenv("SAVEGAME_PROGRESS", "0")
    off = Terminal()
    bar = progress.ProgressBar("saving z", 100, stream=off, show_after=0.0)
    bar.advance(100)
    bar.close()
    assert off.getvalue() == ""


def test_saves_and_loads_draw_when_forced_and_log_their_throughput(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("SAVEGAME_PROGRESS", "1")
    monkeypatch.setattr(progress, "SHOW_AFTER_SECONDS", 0.0)
    monkeypatch.setattr(progress, "_MIN_INTERVAL", 0.0)
    state = {"model": {"w": np.arange(1 << 20, dtype=np.float32)}, "opt": {"m": np.ones(1 << 18)}}
    with caplog.at_level(logging.INFO, logger="savegame"):
        savegame.save(tmp_path / "c", state)
        loaded = savegame.load(tmp_path / "c")
    err = capsys.readouterr().err
    assert "saving c [" in err and "loading " in err and "100%" in err
    assert np.array_equal(loaded["model"]["w"], state["model"]["w"])
    messages = [r.getMessage() for r in caplog.records]
    assert any("MB/s" in m and "saved" in m for m in messages), messages
    total = savegame.read_manifest(tmp_path / "c").total_bytes
    assert any(m.startswith("loaded ") and f": {total} bytes in " in m and "MB/s" in m for m in messages), messages
