"""The cyclic garbage collector is paused during a save or load (and only then), never left changed."""

from __future__ import annotations

import gc
import linecache
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import savegame
from savegame._util.gcpause import gc_paused
from savegame.engine.background import PendingSave

PACKAGE = Path(savegame.__file__).parent


def _inside_savegame() -> bool:
    """Whether the calling thread runs savegame code, other than entering or leaving a pause (creating
    the context manager allocates before the collector is off; the deferred collection starts after it
    is on again) and a background save's wait for the previous one (not paused, by design)."""
    frame = sys._getframe(1)
    inside = False
    while frame is not None:
        file = Path(frame.f_code.co_filename)
        if file.name in ("gcpause.py", "contextlib.py"):
            return False
        if (file.name, frame.f_code.co_name) == ("background.py", "wait"):
            return False
        if linecache.getline(str(file), frame.f_lineno).strip().startswith("with gc_paused()"):
            return False
        inside = inside or file.is_relative_to(PACKAGE)
        frame = frame.f_back  # type: ignore[assignment]
    return inside


@pytest.fixture
def collections() -> Iterator[list[str]]:
    """Record every collection that starts in the main thread while it runs savegame code; collect
    after every 25 net allocations (a save or load of 400 tensors would collect many times)."""
    seen: list[str] = []

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and threading.current_thread() is threading.main_thread() and _inside_savegame():
            seen.append(f"generation {info['generation']} in:\n" + "".join(traceback.format_stack(limit=8)))

    threshold = gc.get_threshold()
    was_enabled = gc.isenabled()
    gc.enable()
    gc.set_threshold(25, 2, 2)
    gc.callbacks.append(callback)
    try:
        yield seen
    finally:
        gc.callbacks.remove(callback)
        gc.set_threshold(*threshold)
        if not was_enabled:
            gc.disable()


def many_tensors() -> nn.Module:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(200)])
    return model


def test_no_collection_during_save_and_load(
    tmp_path: Path, collections: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = many_tensors()
    # Baseline: without the pause, the same save collects many times (so the check below can fail).
    with monkeypatch.context() as patch:
        patch.setattr(gc, "disable", lambda: None)
        savegame.save(tmp_path / "unpaused", {"model": model})
    assert len(collections) > 10

    # The process's background writer (its thread, its pools) is made by the first background save: a
    # one-time setup, not the work of a save; made here so the test does not depend on the tests before it.
    savegame.save(tmp_path / "warm", {"x": torch.ones(1)}, background=True).result()
    pending: list[PendingSave] = []
    for i, op in enumerate((
        lambda: savegame.save(tmp_path / "ckpt", {"model": model, "step": 3}),
        lambda: savegame.load(tmp_path / "ckpt", {"model": many_tensors()}),
        lambda: savegame.load(tmp_path / "ckpt"),
        lambda: savegame.verify(tmp_path / "ckpt"),
        lambda: pending.append(savegame.save(tmp_path / "bg", {"model": model}, background=True)),
    )):
        gc.collect()  # start each operation with empty counts: the few allocations before a pause
        collections.clear()  # begins cannot collect
        op()
        assert collections == [], f"a collection ran during operation {i}: " + "\n".join(collections)
        assert gc.isenabled()
    pending[0].result()  # the write itself ran on the writer thread, collector enabled
    restored = many_tensors()
    savegame.load(tmp_path / "bg", {"model": restored})
    for a, b in zip(model.parameters(), restored.parameters(), strict=True):
        assert torch.equal(a, b)
    restored = many_tensors()
    savegame.load(tmp_path / "ckpt", {"model": restored})
    for a, b in zip(model.parameters(), restored.parameters(), strict=True):
        assert torch.equal(a, b)


def test_collector_restored_after_failure(tmp_path: Path) -> None:
    assert gc.isenabled()
    with pytest.raises(savegame.CheckpointError):
        savegame.load(tmp_path / "missing")
    assert gc.isenabled()
    with pytest.raises(savegame.CheckpointError):
        savegame.save(tmp_path / "x", {"bad": object()})
    assert gc.isenabled()


def test_a_program_that_disabled_the_collector_keeps_it_disabled(tmp_path: Path) -> None:
    gc.disable()
    try:
        savegame.save(tmp_path / "ckpt", {"x": torch.arange(4)})
        savegame.load(tmp_path / "ckpt")
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_nested_and_concurrent_pauses_end_with_the_last() -> None:
    assert gc.isenabled()
    inside = threading.Event()
    release = threading.Event()

    def other() -> None:
        with gc_paused():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    with gc_paused():
        thread.start()
        assert inside.wait(10)
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert not gc.isenabled(), "re-enabled while the other thread's pause is still running"
    release.set()
    thread.join(10)
    assert gc.isenabled()
