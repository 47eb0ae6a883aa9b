"""Issue 15 item 6: read-only users racing a writer's retention.

A writer process saves small states as fast as it can with ``keep_last=2``, so its retention deletes a
checkpoint right after every commit. Readers in this process restore with ``Checkpointer(root,
lock=False)`` and list with ``savegame ls --json`` at the same time. A checkpoint deleted between
listing and reading is not damage: ``restore`` re-lists and takes the newest again (never raising
NotACheckpointError / CheckpointNotFoundError, never returning None while checkpoints exist), and
``ls`` leaves it out instead of calling it ``corrupt``. A reader with ``lock=False`` never renames or
removes anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from savegame.cli.scan import scan_root
from savegame.run.checkpointer import Checkpointer, ResumeWarning

SRC = str(Path(__file__).resolve().parents[1] / "src")
RACE_SECONDS = 8.0

WRITER = textwrap.dedent(
    """
    import sys, time, torch
    from savegame.run.checkpointer import Checkpointer
    root, ready, stop = sys.argv[1:4]
    deadline = time.monotonic() + 60  # never outlive the test
    with Checkpointer(root, keep_last=2, rng=False, every_n_epochs=1) as ckpt:
        step = 0
        while time.monotonic() < deadline:
            step += 1
            ckpt.save({"x": torch.full((16,), float(step)), "step": step}, epoch=step, step=step)
            if step == 3:
                open(ready, "w").close()
            try:
                open(stop).close()
                break
            except FileNotFoundError:
                pass
    print(step)
    """
)


def _poll_ls(root: Path, until: float, failures: list[str], polls: list[int]) -> None:
    """``savegame ls --json`` in a loop: every poll must exit 0 with no checkpoint called corrupt."""
    env = {**os.environ, "PYTHONPATH": SRC}
    while time.monotonic() < until:
        result = subprocess.run([sys.executable, "-m", "savegame.cli", "ls", str(root), "--json"],
                                capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
        polls[0] += 1
        if result.returncode != 0:
            failures.append(f"exit {result.returncode}: {result.stderr.strip()[:300]}")
            continue
        listing = json.loads(result.stdout)
        bad = [c["name"] for c in listing["checkpoints"] if c["status"] != "unverified"]
        if bad or not listing["checkpoints"]:
            failures.append(f"ls called {bad} not healthy / listed none")


@pytest.mark.timeout(120)
def test_readers_racing_a_pruning_writer_see_no_errors(tmp_path: Path) -> None:
    root, ready, stop = tmp_path / "run", tmp_path / "ready", tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(ready), str(stop)],
                              env={**os.environ, "PYTHONPATH": SRC}, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert writer.poll() is None, "the writer died"
            assert time.monotonic() < deadline, "the writer did not start"
            time.sleep(0.05)
        until = time.monotonic() + RACE_SECONDS
        ls_failures: list[str] = []
        polls = [0]
        poller = threading.Thread(target=_poll_ls, args=(root, until, ls_failures, polls))
        poller.start()
        errors: list[str] = []
        nones = restores = scans = 0
        reused = Checkpointer(root, lock=False, rng=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResumeWarning)  # nothing healthy may be called damaged
            while time.monotonic() < until:
                for reader in (Checkpointer(root, lock=False, rng=False), reused):
                    state = {"x": torch.zeros(16), "step": 0}
                    try:
                        restored = reader.restore(state)
                    except Exception as exc:
                        errors.append(f"{type(exc).__name__}: {exc}")
                        continue
                    restores += 1
                    if restored is None:
                        nones += 1
                    elif not torch.equal(state["x"], torch.full((16,), float(restored.data["step"]))):
                        errors.append(f"{restored.name}: tensor and step of different checkpoints")
                scan = scan_root(str(root))
                scans += 1
                bad = [e.name for e in scan.entries if e.status != "unverified"]
                if bad or not scan.readable:
                    errors.append(f"scan: {bad} not healthy / none readable")
        poller.join(timeout=90)
    finally:
        stop.touch()
        out, _ = writer.communicate(timeout=60)
    saves = int(out.strip() or 0)
    assert saves > 20, f"the writer saved only {saves} times: no race to speak of"
    # the command's start-up (imports) takes a second or two on a loaded machine: few real polls, but
    # each one lists the racing root, and scan_root (what ls runs) was polled thousands of times above
    assert restores > 50 and scans > 50 and polls[0] >= 2
    assert not errors, f"{len(errors)} of {restores + len(errors)} restores/{scans} scans failed: {errors[:5]}"
    assert nones == 0, f"{nones} of {restores} restores returned None while checkpoints existed"
    assert not ls_failures, f"{len(ls_failures)} of {polls[0]} ls polls failed: {ls_failures[:3]}"
    assert not [p for p in os.listdir(root) if p.startswith(".quarantine")]


def test_a_reader_without_the_lock_skips_a_damaged_checkpoint_and_renames_nothing(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with Checkpointer(root, rng=False) as writer:
        writer.save({"x": torch.ones(4)}, epoch=1)
        writer.save({"x": torch.full((4,), 2.0)}, epoch=2)
    data = next((root / "epoch=002").glob("*.safetensors"), None) or next(
        p for p in (root / "epoch=002").iterdir() if p.name != "manifest.json"
    )
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF  # a flipped byte in the tensor data: the newest checkpoint is really damaged
    data.write_bytes(bytes(raw))
    before = sorted(os.listdir(root))
    state = {"x": torch.zeros(4)}
    with pytest.warns(ResumeWarning, match="left in place"):
        restored = Checkpointer(root, lock=False, rng=False).restore(state)
    assert restored is not None and restored.name == "epoch=001"
    assert torch.equal(state["x"], torch.ones(4))
    assert sorted(os.listdir(root)) == before  # not quarantined, no lock file, nothing cleaned up
    with pytest.warns(ResumeWarning, match="moved to"):  # the directory's owner does quarantine it
        assert Checkpointer(root, rng=False).restore(state) is not None
    assert any(p.startswith(".quarantine") for p in os.listdir(root))
