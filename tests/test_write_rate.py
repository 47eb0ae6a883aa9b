"""Paced background writes: ``Checkpointer(background=True, write_rate=MB_per_s)``.

* the pacer's arithmetic (injected clock and sleep: no real sleeps, no timed assertions);
* a paced save writes in bounded chunks, commits, and loads the bytes that were saved;
* whatever waits for a paced save (``close()``, a preemption save, a save under ``if_busy="wait"``)
  makes it finish at full speed: with a rate of 1 byte/s the save would otherwise take weeks, so
  these tests would hang (each runs the wait on a thread and checks it ended);
* errors of a paced save propagate; bad ``write_rate`` values raise :class:`ConfigError`.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import savegame
import savegame.storage.local.ops as local_ops
from savegame import BackgroundSaveError, Checkpointer, ConfigError
from savegame.engine.pacing import CHUNK_BYTES, MAX_SLEEP, Pacer
from savegame.storage.local import FileOps

CRAWL = 1e-6
"""MB/s: one byte a second (a 6 MiB state would take ~70 days)."""


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> bool:
        self.sleeps.append(seconds)
        self.now += seconds
        return False


def test_pacer_spaces_writes_at_the_rate_without_building_credit() -> None:
    clock = FakeClock()
    pacer = Pacer(100.0, clock=clock, sleep=clock.sleep)
    pacer.before(50)  # the first write goes at once
    assert clock.sleeps == []
    clock.now = 0.1
    pacer.before(50)  # due at 0.5 (50 bytes at 100 B/s)
    assert clock.sleeps == [pytest.approx(0.4)] and clock.now == pytest.approx(0.5)
    pacer.before(100)  # due at 1.0
    assert clock.sleeps[-1] == pytest.approx(0.5)
    clock.now = 10.0  # the writes fell behind (a slow disk): no burst afterwards
    pacer.before(10)
    assert len(clock.sleeps) == 2
    pacer.before(10)  # due 0.1 s after the late write, not at once
    assert clock.sleeps[-1] == pytest.approx(0.1)
    assert pacer.slept == pytest.approx(1.0)
    pacer.hurry()
    clock.now = 10.1
    pacer.before(10**9)
    pacer.before(10**9)
    assert len(clock.sleeps) == 3 and pacer.hurried


def test_pacer_stops_sleeping_when_hurried_mid_sleep() -> None:
    clock = FakeClock()

    def hurried_sleep(seconds: float) -> bool:
        clock.sleeps.append(seconds)
        pacer.hurry()
        return True

    pacer = Pacer(1.0, clock=clock, sleep=hurried_sleep)
    pacer.before(10)
    pacer.before(10)  # due at 10 s: the sleep is cut short by hurry()
    pacer.before(10)  # and nothing sleeps any more
    assert clock.sleeps == [10.0]


def test_a_very_low_rate_sleeps_in_bounded_waits() -> None:
    """A rate so low that one chunk is due in more seconds than a timeout can express (the save failed
    with "timestamp out of range for platform time_t") sleeps in waits of at most ``MAX_SLEEP``."""
    clock = FakeClock()

    def sleep(seconds: float) -> bool:
        clock.sleep(seconds)
        return len(clock.sleeps) == 3  # hurried during the third wait

    pacer = Pacer(1e-294, clock=clock, sleep=sleep)
    pacer.before(CHUNK_BYTES)
    pacer.before(CHUNK_BYTES)  # due in ~4e300 s
    assert clock.sleeps == [MAX_SLEEP] * 3 and MAX_SLEEP <= threading.TIMEOUT_MAX
    pacer = Pacer(1.0, clock=clock, sleep=clock.sleep)
    clock.sleeps.clear()
    pacer.before(int(2.5 * MAX_SLEEP))
    pacer.before(1)  # due 2.5 * MAX_SLEEP later: three waits that end exactly then
    assert clock.sleeps == [MAX_SLEEP, MAX_SLEEP, 0.5 * MAX_SLEEP]
    assert pacer.slept == pytest.approx(2.5 * MAX_SLEEP)


def test_a_save_paced_at_a_tiny_rate_commits_when_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pacers: list[Pacer] = []
    real = Pacer.__init__

    def recording(self: Pacer, *args: Any, **kwargs: Any) -> None:
        real(self, *args, **kwargs)
        pacers.append(self)

    monkeypatch.setattr(Pacer, "__init__", recording)
    state = _state()
    expected = state["model"].weight.detach().clone()
    ckpt = Checkpointer(tmp_path, background=True, write_rate=1e-300, every_n_steps=1, rng=False, quiet=True)
    result = ckpt.step(state, step=1, epoch_end=False)
    assert result is not None and result.pending is not None
    deadline = time.monotonic() + 120
    while not pacers[0].slept and not result.pending.done():  # the second chunk is due in ~1e306 s
        assert time.monotonic() < deadline
        time.sleep(0.01)
    _ends(ckpt.close)
    assert torch.equal(_weights(result.path)["weight"], expected)


def test_pacer_chunks_are_bounded_views_of_the_same_bytes() -> None:
    pacer = Pacer(1.0, chunk_bytes=4)
    data = np.arange(5, dtype=np.float32)  # 20 bytes, item size 4: chunks are counted in bytes
    pieces = pacer.chunks(memoryview(data))
    assert [p.nbytes for p in pieces] == [4, 4, 4, 4, 4]
    assert b"".join(bytes(p) for p in pieces) == data.tobytes()
    assert [p.nbytes for p in pacer.chunks(bytearray(10))] == [4, 4, 2]
    assert [p.nbytes for p in pacer.chunks(b"")] == [0]
    with pytest.raises(ValueError):
        Pacer(0.0)


def _state(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Linear(1024, 1536)  # 6 MiB of weights: more than one chunk
    return {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}


def _weights(path: str) -> dict[str, torch.Tensor]:
    return dict(savegame.load(path)["model"])


def _ends(action: Callable[[], Any]) -> Any:
    """Run ``action`` on a thread; fail (instead of hanging) if it does not end."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = action()
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "a wait for a paced save did not make it finish at full speed"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def _done_unwaited(handle: Any) -> None:
    """Poll until the save finished without waiting on it (which would end its pacing)."""
    deadline = time.monotonic() + 120
    while not handle.done():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_paced_save_writes_bounded_chunks_and_commits_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    real = Pacer.before

    def recording(self: Pacer, nbytes: int) -> None:
        sizes.append(nbytes)
        real(self, nbytes)

    monkeypatch.setattr(Pacer, "before", recording)
    state = _state()
    expected = {k: v.clone() for k, v in state["model"].state_dict().items()}
    ckpt = Checkpointer(tmp_path, background=True, write_rate=1000.0, every_n_steps=1, rng=False, quiet=True)
    result = ckpt.step(state, step=1, epoch_end=False)
    assert result is not None and result.pending is not None
    _done_unwaited(result.pending)  # not result(): a wait would hurry the save
    ckpt.close()
    assert len(sizes) >= 2 and max(sizes) <= CHUNK_BYTES
    assert sum(sizes) == sum(e.bytes for e in savegame.read_manifest(result.path).files.values())
    loaded = _weights(result.path)
    assert set(loaded) == set(expected)
    for k, v in expected.items():
        assert torch.equal(loaded[k], v)


def test_close_finishes_a_paced_save_at_full_speed(tmp_path: Path) -> None:
    state = _state()
    expected = state["model"].weight.detach().clone()
    ckpt = Checkpointer(tmp_path, background=True, write_rate=CRAWL, if_busy="skip", every_n_steps=1, rng=False,
                        quiet=True)  # fmt: skip
    result = ckpt.step(state, step=1, epoch_end=False)
    assert result is not None and result.pending is not None and not result.pending.done()
    skipped = ckpt.step(state, step=2, epoch_end=False)  # still being written (paced): coalesced
    assert skipped is not None and skipped.skipped
    _ends(ckpt.close)
    assert torch.equal(_weights(result.path)["weight"], expected)


def test_the_next_save_under_if_busy_wait_hurries_the_paced_one(tmp_path: Path) -> None:
    state = _state()
    with Checkpointer(tmp_path, background=True, write_rate=CRAWL, every_n_steps=1, rng=False, quiet=True) as ckpt:
        ckpt.step(state, step=1, epoch_end=False)
        second = _ends(lambda: ckpt.step(state, step=2, epoch_end=False))
        assert second is not None and not second.skipped
        _ends(ckpt.wait)
    assert [r.step for r in Checkpointer(tmp_path).list()] == [1, 2]


def test_a_preemption_signal_flushes_the_paced_save_and_saves_the_last_state(tmp_path: Path) -> None:
    state = _state()
    ckpt = Checkpointer(tmp_path, background=True, write_rate=CRAWL, if_busy="skip", every_n_steps=100,
                        save_on_signal=True, signal_action="continue", rng=False, quiet=True)  # fmt: skip
    try:
        first = ckpt.step(state, step=100, epoch_end=False)
        assert first is not None and first.pending is not None and not first.pending.done()
        with torch.no_grad():
            state["model"].weight.fill_(3.0)
        os.kill(os.getpid(), signal.SIGUSR1)
        # the preemption save waits for the paced one in flight, which then runs at full speed
        preempted = ckpt.step(state, step=101, epoch_end=False)
        assert preempted is not None and not preempted.skipped
        assert ckpt.preempted == "SIGUSR1"
    finally:
        _ends(ckpt.close)
    records = Checkpointer(tmp_path).list()
    assert [r.step for r in records] == [100, 101]
    assert torch.all(_weights(records[-1].path)["weight"] == 3.0)


class FailsSecondWrite(FileOps):
    def __init__(self) -> None:
        self.calls = 0

    def write(self, fd: int, data: memoryview) -> int:
        self.calls += 1
        if self.calls >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(fd, data)


def test_an_error_of_a_paced_save_propagates_and_nothing_is_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_ops, "DEFAULT_OPS", FailsSecondWrite())
    ckpt = Checkpointer(tmp_path, background=True, write_rate=CRAWL, if_busy="skip", every_n_steps=1, rng=False,
                        quiet=True)  # fmt: skip
    result = ckpt.step(_state(), step=1, epoch_end=False)
    assert result is not None and result.pending is not None
    with pytest.raises(BackgroundSaveError, match="No space left"):
        _ends(ckpt.close)
    monkeypatch.setattr(local_ops, "DEFAULT_OPS", FileOps())
    assert Checkpointer(tmp_path).list() == []


@pytest.mark.parametrize("kwargs", [
    {"write_rate": 0}, {"write_rate": -1.0}, {"write_rate": "fast"}, {"write_rate": True},
    {"write_rate": float("nan")}, {"write_rate": float("inf")}, {"write_rate": 10**400},
    {"write_rate": 10.0, "background": False},
])  # fmt: skip
def test_bad_write_rate_raises_config_error(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    options = {"background": True, **kwargs}
    with pytest.raises(ConfigError, match="write_rate"):
        Checkpointer(tmp_path, **options)



_CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    from torch import nn
    import savegame

    directory, how = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = nn.Linear(1024, 1536)
    state = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
    ckpt = savegame.Checkpointer(directory, background=True, write_rate=1e-6, if_busy="skip", every_n_steps=1,
                                 save_on_signal=True, rng=False, quiet=True)
    first = ckpt.step(state, step=1, epoch_end=False)
    assert first is not None and not first.pending.done()
    print("saving", flush=True)
    if how == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)  # the preemption save waits for the paced one, then exits
        ckpt.step(state, step=2, epoch_end=False)
    # "exit": the interpreter finishes the save in flight at exit
""")


@pytest.mark.subprocess
@pytest.mark.parametrize("how", ["exit", "sigterm"])
def test_exit_and_sigterm_finish_a_paced_save(tmp_path: Path, how: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), how], capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip
    assert "saving" in done.stdout, done.stderr
    steps = [r.step for r in Checkpointer(tmp_path).list()]
    assert steps == ([1] if how == "exit" else [1, 2]), done.stderr
