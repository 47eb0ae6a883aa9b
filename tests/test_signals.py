"""Preemption signals: the handler records, the loop saves at a safe point (or at once between steps
when opted in), then exits or re-raises; previous handlers come back. Real signals, real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

import savegame
from crash import figures
from savegame.errors import ConfigError
from savegame.run.signals import DEFAULT_SIGNALS, PreemptionError, PreemptionHandler, parse_signal

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "tests" / "crash" / "worker.py")
GRACE_SECONDS = 30.0


@pytest.fixture(autouse=True)
def restore_handlers() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in DEFAULT_SIGNALS}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


# ---------------------------------------------------------------------------------------------------
# In this process (signal.raise_signal runs the Python handler before it returns)


def test_records_then_saves_at_the_safe_point_and_exits() -> None:
    saved: list[int] = []
    with PreemptionHandler(on_preempt=saved.append) as handler:
        assert not handler.requested and handler.safe_point() is False
        signal.raise_signal(signal.SIGUSR1)
        assert handler.requested and handler.signum == signal.SIGUSR1 and handler.signal_name == "SIGUSR1"
        assert saved == [], "the handler itself must not save (the step may be half done)"
        with pytest.raises(SystemExit) as info:
            handler.safe_point()
    assert saved == [signal.SIGUSR1]
    assert info.value.code == 128 + signal.SIGUSR1
    assert handler.save_seconds is not None


def test_exit_code_and_explicit_save_callback() -> None:
    calls: list[str] = []
    with PreemptionHandler(signals=["TERM"], exit_code=0, on_preempt=lambda s: calls.append("default")) as h:
        signal.raise_signal(signal.SIGTERM)
        with pytest.raises(SystemExit) as info:
            h.safe_point(lambda s: calls.append("explicit"))
    assert info.value.code == 0 and calls == ["explicit"]


def test_continue_clears_the_request_and_can_fire_again() -> None:
    saved: list[int] = []
    with PreemptionHandler(action="continue", on_preempt=saved.append) as handler:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.raise_signal(sig)
            assert handler.safe_point() is True
            assert not handler.requested
        assert handler.count == 2
    assert saved == [signal.SIGUSR1, signal.SIGTERM]


def test_previous_handlers_are_restored() -> None:
    seen: list[int] = []

    def mine(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)

    signal.signal(signal.SIGUSR1, mine)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    handler = PreemptionHandler().install()
    assert handler.installed and signal.getsignal(signal.SIGUSR1) is not mine
    handler.close()
    assert signal.getsignal(signal.SIGUSR1) is mine and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    signal.raise_signal(signal.SIGUSR1)
    assert seen == [signal.SIGUSR1]
    handler.close()  # idempotent


def test_a_handler_installed_over_ours_is_left_alone() -> None:
    def theirs(signum: int, frame: FrameType | None) -> None:
        pass

    handler = PreemptionHandler(signals=["USR1"]).install()
    signal.signal(signal.SIGUSR1, theirs)
    handler.close()
    assert signal.getsignal(signal.SIGUSR1) is theirs


def test_nested_handlers_unwind_in_order() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    outer = PreemptionHandler(action="continue").install()
    inner = PreemptionHandler(action="continue").install()
    signal.raise_signal(signal.SIGUSR1)
    assert inner.requested and not outer.requested
    inner.close()
    signal.raise_signal(signal.SIGUSR1)
    assert outer.requested
    outer.close()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN


def test_immediate_save_between_steps() -> None:
    """Opted in: a signal inside ``between_steps`` saves at once, without waiting for the loop."""
    events: list[str] = []
    with PreemptionHandler(on_preempt=lambda s: events.append("saved")) as handler:
        with pytest.raises(SystemExit):
            with handler.between_steps():
                events.append("waiting for data")
                signal.raise_signal(signal.SIGTERM)
                events.append("got data")  # never reached: the save and exit happened in the handler
    assert events == ["waiting for data", "saved"]


def test_immediate_region_with_continue_and_a_pending_signal() -> None:
    events: list[str] = []
    with PreemptionHandler(action="continue", on_preempt=lambda s: events.append("default")) as handler:
        signal.raise_signal(signal.SIGUSR1)  # outside any region: only recorded
        assert events == [] and handler.requested
        with handler.between_steps(lambda s: events.append("region")):  # pending: saves on entry
            events.append("inside")
        assert events == ["region", "inside"] and not handler.requested
        signal.raise_signal(signal.SIGUSR1)
        assert events == ["region", "inside"]  # outside the region again: recorded only


def test_a_second_signal_during_the_save_does_not_interrupt_it() -> None:
    calls: list[int] = []

    def save(signum: int) -> None:
        signal.raise_signal(signal.SIGTERM)  # the scheduler insists
        calls.append(signum)

    with PreemptionHandler(action="continue", on_preempt=save) as handler:
        signal.raise_signal(signal.SIGUSR1)
        assert handler.safe_point() is True
    assert calls == [signal.SIGUSR1] and handler.count == 2


def test_reraise_hands_the_signal_to_the_previous_python_handler() -> None:
    seen: list[int] = []

    def previous(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)

    signal.signal(signal.SIGUSR1, previous)
    saved: list[int] = []
    handler = PreemptionHandler(action="reraise", on_preempt=saved.append).install()
    signal.raise_signal(signal.SIGUSR1)
    assert seen == []
    handler.safe_point()
    assert saved == [signal.SIGUSR1] and seen == [signal.SIGUSR1]
    assert signal.getsignal(signal.SIGUSR1) is previous and not handler.installed


def test_main_thread_only() -> None:
    handler = PreemptionHandler()
    errors: list[BaseException] = []

    def run() -> None:
        for call in (handler.install, handler.safe_point):
            try:
                call()
            except BaseException as exc:
                errors.append(exc)

    thread = threading.Thread(target=run, name="not-main")
    thread.start()
    thread.join()
    assert len(errors) == 2 and all(isinstance(e, PreemptionError) for e in errors)
    assert "main thread" in str(errors[0]) and "not-main" in str(errors[0])
    assert isinstance(errors[0], savegame.CheckpointError)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"signals": ["SIGKILL"]}, "cannot be caught"),
        ({"signals": ["NOPE"]}, "unknown signal"),
        ({"signals": []}, "no signals"),
        ({"action": "explode"}, "action"),
        ({"exit_code": 300}, "exit_code"),
    ],
)
def test_bad_configuration(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        PreemptionHandler(**kwargs)  # type: ignore[arg-type]


def test_parse_signal_spellings() -> None:
    assert {parse_signal(s) for s in ("SIGTERM", "term", " Term ", 15, signal.SIGTERM)} == {signal.SIGTERM}


# ---------------------------------------------------------------------------------------------------
# Real signals to a process training a torch model


def _start_preempt_child(root: Path, action: str, mode: str, checkpointer: str | None = None) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    args = ["preempt", str(root), action, mode] if checkpointer is None else [
        "ckpt-preempt", str(root), action, mode, checkpointer]
    return subprocess.Popen([sys.executable, WORKER, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


def _wait_for_line(proc: subprocess.Popen[str], prefix: str, timeout: float = 60) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"child exited before printing {prefix!r}: {proc.wait()} {proc.stderr.read()}")  # type: ignore[union-attr]
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no {prefix!r} within {timeout} s")


def _preempt(
    tmp_path: Path, sig: signal.Signals, action: str, mode: str, after: str, checkpointer: str | None = None
) -> tuple[int, float, str]:
    proc = _start_preempt_child(tmp_path, action, mode, checkpointer)
    try:
        seen = _wait_for_line(proc, after)  # part of the output: the save may happen at this very step
        sent = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=GRACE_SECONDS)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, elapsed, seen + out + err


def _saved_step(root: Path) -> int:
    names = sorted(p.name for p in root.iterdir() if p.name.startswith("preempted-step-"))
    assert len(names) == 1, names
    savegame.verify(root / names[0])
    state = savegame.load(root / names[0])
    assert int(names[0].rsplit("-", 1)[1]) == state["step"]
    return int(state["step"])


@pytest.mark.subprocess
def test_sigterm_saves_at_the_next_step_and_exits_143(tmp_path: Path) -> None:
    code, elapsed, output = _preempt(tmp_path, signal.SIGTERM, "exit", "safe-point", "step 5")
    assert code == 128 + signal.SIGTERM, output
    assert _saved_step(tmp_path) >= 5
    assert elapsed < GRACE_SECONDS
    figures.record("signals", "sigterm_safe_point_exit_seconds", round(elapsed, 3))


@pytest.mark.subprocess
def test_sigusr1_saves_then_reraises_the_default_action(tmp_path: Path) -> None:
    code, elapsed, output = _preempt(tmp_path, signal.SIGUSR1, "reraise", "safe-point", "step 5")
    assert code == -signal.SIGUSR1, output  # ended *by the signal*, as the scheduler expects
    assert "saved" in output and _saved_step(tmp_path) >= 5
    figures.record("signals", "sigusr1_reraise_exit_seconds", round(elapsed, 3))


@pytest.mark.subprocess
def test_immediate_save_while_waiting_between_steps(tmp_path: Path) -> None:
    """The child waits 60 s for "data" between steps; opted in, the signal saves and exits at once."""
    code, elapsed, output = _preempt(tmp_path, signal.SIGTERM, "exit", "immediate", "step 1")
    assert code == 128 + signal.SIGTERM, output
    assert elapsed < 20, f"the save waited for the next step ({elapsed:.1f} s)"
    assert _saved_step(tmp_path) == 1
    figures.record("signals", "immediate_exit_seconds", round(elapsed, 3))


@pytest.mark.subprocess
@pytest.mark.parametrize("writes", ["sync", "background"])
def test_checkpointer_save_on_signal_saves_at_the_next_step_and_exits_143(tmp_path: Path, writes: str) -> None:
    code, elapsed, output = _preempt(tmp_path, signal.SIGTERM, "exit", "safe-point", "step 5", checkpointer=writes)
    assert code == 128 + signal.SIGTERM, output
    step = _saved_step(tmp_path)
    assert step >= 5 and f"step {step}" in output
    assert elapsed < GRACE_SECONDS
    assert savegame.read_manifest(next(tmp_path.glob("preempted-step-*"))).metadata["preempted_by"] == "SIGTERM"
    assert not (tmp_path / ".lock").exists() or (tmp_path / ".lock").read_text() == ""  # released on the way out


@pytest.mark.subprocess
def test_checkpointer_save_on_signal_reraise_and_continue(tmp_path: Path) -> None:
    code, _, output = _preempt(tmp_path / "reraise", signal.SIGUSR1, "reraise", "safe-point", "step 3",
                               checkpointer="sync")  # fmt: skip
    assert code == -signal.SIGUSR1, output
    assert _saved_step(tmp_path / "reraise") >= 3
    proc = _start_preempt_child(tmp_path / "continue", "continue", "safe-point", "sync")
    try:
        _wait_for_line(proc, "step 3")
        proc.send_signal(signal.SIGUSR1)
        _wait_for_line(proc, "continuing")
        _wait_for_line(proc, "step 30")  # still training after the save
    finally:
        proc.kill()
        proc.wait()
    _saved_step(tmp_path / "continue")


@pytest.mark.subprocess
def test_checkpointer_between_steps_saves_at_once(tmp_path: Path) -> None:
    code, elapsed, output = _preempt(tmp_path, signal.SIGTERM, "exit", "immediate", "step 1", checkpointer="sync")
    assert code == 128 + signal.SIGTERM, output
    assert elapsed < 20, f"the save waited for the next step ({elapsed:.1f} s)"
    assert _saved_step(tmp_path) == 1


def test_checkpointer_signal_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(savegame.ConfigError, match="action"):
        savegame.Checkpointer(tmp_path, save_on_signal=True, signal_action="explode")  # type: ignore[arg-type]
    with pytest.raises(savegame.CheckpointError, match=r"SIGNOPE|signal"):
        savegame.Checkpointer(tmp_path, save_on_signal=["SIGNOPE"])
    ckpt = savegame.Checkpointer(tmp_path)
    with pytest.raises(savegame.ConfigError, match="save_on_signal"), ckpt.between_steps({}):
        pass
    ckpt.close()
    before = signal.getsignal(signal.SIGTERM)
    with savegame.Checkpointer(tmp_path, save_on_signal=True) as ckpt:
        assert signal.getsignal(signal.SIGTERM) is not before
        assert ckpt.preemption is not None and not ckpt.preemption.requested
    assert signal.getsignal(signal.SIGTERM) is before  # close() puts the old handlers back
    with savegame.Checkpointer(tmp_path, save_on_signal="SIGUSR1") as ckpt:  # one signal by name
        assert ckpt.preemption is not None and ckpt.preemption.signals == (signal.SIGUSR1,)
        assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.subprocess
def test_slurm_example_saves_on_usr1_and_resumes(tmp_path: Path) -> None:
    example = str(ROOT / "examples" / "slurm_preemption.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, example, "--dir", str(run_dir), "--step-seconds", "0.002"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for_line(proc, "step 100")
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=GRACE_SECONDS)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + err
    assert "saved step-" in out and "not under SLURM" in out
    saved = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("step-"))
    assert len(saved) == 1
    step = int(saved[0].split("-")[1])
    assert step >= 100
    again = subprocess.run([*cmd, "--steps", str(step + 50)], capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from {saved[0]} at step {step}" in again.stdout
    assert "training finished" in again.stdout
    final = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("step-"))[-1]
    assert savegame.load(run_dir / final, {"model": _example_model()}, strict=False).state["step"] == step + 50


def _example_model() -> object:
    from torch import nn

    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
