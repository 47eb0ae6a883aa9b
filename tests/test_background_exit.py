"""A background save still in flight when the process ends is finished (or cleanly aborted), never lost.

Real child processes (tests/_exit_child.py) on a slowed-down disk: Ctrl-C (SIGINT) while a Checkpointer's
background save is being written and the loop's plain ``ckpt.close()`` is never reached; a second Ctrl-C
while the exit waits for it; ``close()`` called from the ``except KeyboardInterrupt``; a functional
``save(..., background=True)`` whose handle is never waited for, succeeding or failing late.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import savegame

CHILD = str(Path(__file__).with_name("_exit_child.py"))
pytestmark = pytest.mark.subprocess


def _start(mode: str, root: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, CHILD, mode, str(root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


def _read_until(stream: object, text: str, proc: subprocess.Popen[str], timeout: float = 60) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()  # type: ignore[attr-defined]
        if not line:
            raise AssertionError(f"child ended before {text!r}: rc={proc.wait()} seen={seen}")
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f"no {text!r} within {timeout} s: {seen}")


def _wait_writing(proc: subprocess.Popen[str]) -> None:
    """Until the save is being written and the child's main thread is "training" (both lines, any order)."""
    seen = "".join(_read_until(proc.stdout, "WRITING", proc))
    if "SUBMITTED" not in seen:
        _read_until(proc.stdout, "SUBMITTED", proc)
    time.sleep(0.2)  # from the print into the sleep


def _no_staging(root: Path) -> None:
    assert [p.name for p in root.iterdir() if p.name.startswith((".staging-", ".trash-"))] == []


def _expected_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"w{i}": rng.standard_normal(50_000) for i in range(12)}


def _assert_committed(path: Path) -> None:
    savegame.verify(path)
    loaded = savegame.load(path)
    expected = _expected_weights()
    assert sorted(loaded["weights"]) == sorted(expected)
    assert all(np.array_equal(loaded["weights"][k], v) for k, v in expected.items())


def test_ctrl_c_during_a_checkpointer_background_save_commits_it_at_exit(tmp_path: Path) -> None:
    proc = _start("ckpt-sigint", tmp_path)
    try:
        _wait_writing(proc)  # the background save is being written (slowly)
        proc.send_signal(signal.SIGINT)  # Ctrl-C while "training": ckpt.close() is never reached
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert "finishing the background save" in err and "epoch=001" in err
    assert savegame.storage.LocalStorage(tmp_path).committed() == ["epoch=001"]
    _assert_committed(tmp_path / "epoch=001")
    _no_staging(tmp_path)


def test_second_ctrl_c_at_exit_aborts_the_save_cleanly(tmp_path: Path) -> None:
    proc = _start("ckpt-sigint", tmp_path)
    try:
        _wait_writing(proc)
        proc.send_signal(signal.SIGINT)
        _read_until(proc.stderr, "finishing the background save", proc)
        proc.send_signal(signal.SIGINT)  # impatient: abort it
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "aborted the background save" in err and "nothing was saved" in err
    assert savegame.storage.LocalStorage(tmp_path).committed() == []  # cleanly absent, and said so
    _no_staging(tmp_path)


def test_close_after_ctrl_c_commits_the_save_in_flight(tmp_path: Path) -> None:
    proc = _start("ckpt-close", tmp_path)
    try:
        _wait_writing(proc)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert "CLOSED" in out and proc.returncode != 0
    _assert_committed(tmp_path / "epoch=001")
    _no_staging(tmp_path)


def test_functional_background_save_never_waited_for_is_finished_at_exit(tmp_path: Path) -> None:
    proc = _start("save-no-wait", tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SUBMITTED" in out
    _assert_committed(tmp_path / "c")
    _no_staging(tmp_path)


def test_background_save_failing_after_the_script_ended_is_reported_on_stderr(tmp_path: Path) -> None:
    proc = _start("save-fails-late", tmp_path)
    _, err = proc.communicate(timeout=120)
    assert "the background save of" in err and str(tmp_path / "c") in err
    assert "nothing was saved there" in err and "injected" in err
    assert list(tmp_path.iterdir()) == []  # nothing visible, no staging debris


def test_checkpointer_never_closed_is_closed_at_exit_with_retention_applied(tmp_path: Path) -> None:
    proc = _start("ckpt-forgotten", tmp_path)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "finishing the background save" in err
    # the save in flight was committed, and then integrated as close() would: keep_last=1 applied
    assert savegame.storage.LocalStorage(tmp_path).committed() == ["epoch=002"]
    _assert_committed(tmp_path / "epoch=002")
    _no_staging(tmp_path)
