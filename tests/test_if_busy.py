"""Saving every step: ``Checkpointer(if_busy="skip")`` coalesces a save requested while the previous
background save is still being written, and ``writer_nice`` lowers the writer threads' priority.

The save in flight is held open by a gate on the persist job (no sleeps, no timed assertions).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import savegame
from savegame.engine import writer as engine_writer
from savegame.engine.background import BackgroundWriter, Snapshot
from savegame.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """While the event is clear, every background persist job waits before writing anything."""
    event = threading.Event()
    real = engine_writer.write_encoded

    def gated(*args: Any, **kwargs: Any) -> Any:
        assert event.wait(60), "test gate never opened"
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_writer, "write_encoded", gated)
    yield event
    event.set()


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    return {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}


def _fill(state: dict[str, Any], value: float) -> None:
    with torch.no_grad():
        for p in state["model"].parameters():
            p.fill_(value)


def _weights(path: str) -> torch.Tensor:
    """Every tensor of the saved model, flattened into one."""
    loaded = savegame.load(path)
    return torch.cat([t.reshape(-1) for t in loaded["model"].values()])


def test_a_save_requested_while_one_is_written_is_coalesced(tmp_path: Path, gate: threading.Event) -> None:
    state = _state()
    ckpt = savegame.Checkpointer(tmp_path, every_n_steps=1, background=True, if_busy="skip", rng=False)
    _fill(state, 1.0)
    first = ckpt.step(state, step=1, epoch_end=False)
    assert first is not None and not first.skipped and first.pending is not None

    _fill(state, 2.0)  # the live state moves on while step 1 is still being written
    second = ckpt.step(state, step=2, epoch_end=False)
    assert second is not None and second.skipped
    assert second.step == 2 and second.name == first.name and second.pending is first.pending
    assert second.seconds == 0.0 and ckpt.skipped_saves == 1
    assert not first.pending.done()  # the call returned without waiting for the write

    gate.set()
    first.pending.result()
    third = ckpt.step(state, step=3, epoch_end=False)  # the next step after the commit saves again
    assert third is not None and not third.skipped
    ckpt.close()

    records = savegame.Checkpointer(tmp_path).list()
    assert [r.step for r in records] == [1, 3]  # nothing was written for step 2
    assert torch.all(_weights(records[0].path) == 1.0)  # the snapshot of step 1, not torn by step 2
    assert torch.all(_weights(records[1].path) == 2.0)


def test_final_step_and_explicit_save_always_wait(tmp_path: Path, gate: threading.Event) -> None:
    state = _state()
    ckpt = savegame.Checkpointer(tmp_path, every_n_steps=1, background=True, if_busy="skip", rng=False)
    _fill(state, 1.0)
    first = ckpt.step(state, step=1, epoch_end=False)
    assert first is not None and not first.skipped
    _fill(state, 3.0)
    results: list[savegame.SaveResult | None] = []
    final = threading.Thread(target=lambda: results.append(ckpt.step(state, step=2, final=True)))
    final.start()
    final.join(0.2)
    assert final.is_alive()  # waits for step 1's commit: the gate is closed, so it cannot have finished
    gate.set()
    final.join(60)
    assert results and results[0] is not None and not results[0].skipped
    ckpt.close()  # after close the last requested state is durable
    latest = savegame.Checkpointer(tmp_path).latest
    assert latest is not None and latest.step == 2
    assert torch.all(_weights(latest.path) == 3.0)


def test_wait_is_the_default_and_never_skips(tmp_path: Path) -> None:
    state = _state()
    with savegame.Checkpointer(tmp_path, every_n_steps=1, background=True, rng=False) as ckpt:
        assert ckpt.if_busy == "wait"
        for step in range(1, 5):
            result = ckpt.step(state, step=step, epoch_end=False)
            assert result is not None and not result.skipped
    assert [r.step for r in savegame.Checkpointer(tmp_path).list()] == [1, 2, 3, 4]


@pytest.mark.parametrize("kwargs", [{"if_busy": "queue"}, {"writer_nice": -1}, {"writer_nice": 20},
                                    {"writer_nice": 2.5}, {"writer_nice": True}])
def test_bad_options_raise_config_error(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        savegame.Checkpointer(tmp_path, **kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"if_busy": "skip"}, "if_busy='skip' needs background=True"),
    ({"writer_nice": 10}, "writer_nice needs background=True"),
    ({"background": "false"}, "background must be True, False or a savegame.Background"),
    ({"background": 1}, "background must be True, False"),
])  # fmt: skip
def test_background_options_without_a_background_save_raise_config_error(
    tmp_path: Path, kwargs: dict[str, Any], match: str
) -> None:
    """Each of these was accepted and did nothing (a sync save is never skipped nor reniced; any truthy
    ``background``, the string "false" too, meant True)."""
    with pytest.raises(ConfigError, match=match):
        savegame.Checkpointer(tmp_path, **kwargs)
    with savegame.Checkpointer(tmp_path, background=True, if_busy="skip", writer_nice=10) as ckpt:
        assert ckpt.background and ckpt.if_busy == "skip" and ckpt.writer_nice == 10


def test_save_background_must_be_a_bool(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="background must be True or False"):
        savegame.save(tmp_path / "c", {"x": 1}, background="false")
    assert not (tmp_path / "c").exists()


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")


def _thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@linux_only
def test_writer_thread_runs_at_the_lowered_priority() -> None:
    writer = BackgroundWriter(nice=3)
    base = _thread_nice()
    handle = writer.submit("x", Snapshot(writer.pool), _thread_nice, blocking_seconds=0.0)
    assert handle.result() == min(19, base + 3)
    assert _thread_nice() == base  # the caller's thread keeps its priority
    unchanged = BackgroundWriter()
    assert unchanged.submit("y", Snapshot(unchanged.pool), _thread_nice, blocking_seconds=0.0).result() == base


@linux_only
def test_checkpointer_writer_nice_applies_to_its_writer_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, int]] = []
    real = engine_writer.write_encoded

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append((threading.current_thread().name, _thread_nice()))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_writer, "write_encoded", recording)
    base = _thread_nice()
    with savegame.Checkpointer(tmp_path, background=True, writer_nice=4, rng=False) as ckpt:
        ckpt.save(_state(), step=1)
    assert seen and seen[0][0].startswith("savegame-writer") and seen[0][1] == min(19, base + 4)
    assert _thread_nice() == base


_CHILD = textwrap.dedent("""
    import sys, torch
    from torch import nn
    import savegame
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    state = {"model": model, "optimizer": torch.optim.AdamW(model.parameters())}
    ckpt = savegame.Checkpointer(sys.argv[1], every_n_steps=1, background=True, if_busy="skip",
                                 writer_nice=5, keep_last=3)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        result = ckpt.step(state, step=step, epoch_end=False)
        if result is not None and not result.skipped:
            result.pending.result()  # committed: tell the parent, then go on saving
            print(step, flush=True)
""")


@pytest.mark.subprocess
def test_kill_during_coalesced_saves_leaves_only_complete_checkpoints(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                             env=env)
    try:
        assert child.stdout is not None
        committed = [int(child.stdout.readline()) for _ in range(4)]
        child.send_signal(signal.SIGKILL)  # most likely mid-write of the next save or mid-snapshot
    finally:
        child.kill()
        child.wait(60)
    records = savegame.Checkpointer(tmp_path).list()
    assert records and records[-1].step is not None and records[-1].step >= committed[-1]
    for record in records:  # every visible checkpoint is whole and holds the state of its own step
        savegame.verify(record.path)
        assert torch.all(_weights(record.path.rstrip("/")) == float(record.step or 0))


def test_background_saves_hash_no_data_on_the_training_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from savegame.format import tensorfile

    threads: list[str] = []
    real_new, real_buffer = tensorfile.new_write_hasher, tensorfile.hash_buffer

    class Recording:
        def __init__(self) -> None:
            self.inner = real_new()

        def update(self, data: Any) -> None:
            threads.append(threading.current_thread().name)
            self.inner.update(data)

        def hexdigest(self) -> str:
            threads.append(threading.current_thread().name)
            return self.inner.hexdigest()

    def buffer(*args: Any, **kwargs: Any) -> str:
        threads.append(threading.current_thread().name)
        return real_buffer(*args, **kwargs)

    monkeypatch.setattr(tensorfile, "new_write_hasher", Recording)
    monkeypatch.setattr(tensorfile, "hash_buffer", buffer)
    state = _state()
    with savegame.Checkpointer(tmp_path, every_n_steps=1, background=True, if_busy="skip") as ckpt:
        for step in range(1, 4):
            ckpt.step(state, step=step, epoch_end=False)
    assert threads, "the data was hashed somewhere"
    assert threading.main_thread().name not in threads
