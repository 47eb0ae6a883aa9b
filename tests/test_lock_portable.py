"""``import savegame`` and the writer lock where :mod:`fcntl` does not exist (Windows), simulated.

Each child process here makes ``import fcntl`` fail and removes what Windows lacks (``os.fork``,
``os.register_at_fork``, ``SIGUSR1``, ``SIGKILL``, ``SIGSTOP``) *before* importing savegame. Then
``import savegame`` must work, the Checkpointer must save and load, and the writer lock must fall back
to its exclusive lock record: a second holder gets ``LockedError`` naming the first, a clean release
frees it, and the record of a holder killed with SIGKILL is broken as stale by the next one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from savegame.run.lock import HELD_FILE

pytestmark = pytest.mark.subprocess

SRC = str(Path(__file__).resolve().parents[1] / "src")

NO_FCNTL = """\
import os, signal, sys
sys.modules["fcntl"] = None  # import fcntl -> ImportError, as on Windows
for name in ("SIGUSR1", "SIGKILL", "SIGSTOP"):
    delattr(signal, name)
del os.fork, os.register_at_fork
import savegame
from savegame.errors import LockedError
from savegame.run.lock import WriterLock
assert "fcntl" not in sys.modules or sys.modules["fcntl"] is None
root = sys.argv[2]
"""

HOLD = NO_FCNTL + """\
lock = WriterLock(root).acquire()
print("locked", lock.mode, os.getpid(), flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
"""

TRY = NO_FCNTL + """\
try:
    lock = WriterLock(root).acquire()
except LockedError as exc:
    print("LockedError", exc, flush=True)
else:
    print("acquired", lock.mode, lock.previous.pid if lock.previous else None, flush=True)
    lock.release()
"""

CHECKPOINTER = NO_FCNTL + """\
import numpy as np
with savegame.Checkpointer(root, keep_last=2) as ckpt:
    for epoch in range(1, 4):
        ckpt.step({"w": np.arange(4.0) * epoch}, epoch=epoch, step=epoch)
    print("held", sorted(os.listdir(root)), flush=True)
print("after", sorted(os.listdir(root)), flush=True)
print("loaded", savegame.load(ckpt.latest.path)["w"].tolist(), flush=True)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)}


def run(code: str, root: Path) -> str:
    result = subprocess.run([sys.executable, "-c", code, "x", str(root)], capture_output=True, text=True,
                            env=_env(), timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def hold(root: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, "x", str(root)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=_env())  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line[:2] == ["locked", "link"], line
    return proc, int(line[2])


def test_import_and_checkpointer_work_without_fcntl(tmp_path: Path) -> None:
    out = run(CHECKPOINTER, tmp_path / "run").splitlines()
    assert out[0].startswith("held") and repr(HELD_FILE) in out[0]  # the lock record while the writer runs
    assert out[1] == "after ['epoch=002-step=000002', 'epoch=003-step=000003']"  # released: no record left
    assert out[2] == "loaded [0.0, 3.0, 6.0, 9.0]"


def test_lock_without_fcntl_excludes_a_second_holder_and_is_released(tmp_path: Path) -> None:
    holder, pid = hold(tmp_path)
    try:
        out = run(TRY, tmp_path)
        assert out.startswith("LockedError") and f"pid {pid} " in out, out
        assert (tmp_path / HELD_FILE).exists()
    finally:
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
        assert holder.wait(timeout=60) == 0
    assert not (tmp_path / HELD_FILE).exists()
    assert run(TRY, tmp_path).split() == ["acquired", "link", "None"]  # free, and nothing stale


def test_lock_without_fcntl_breaks_the_record_of_a_killed_holder(tmp_path: Path) -> None:
    holder, pid = hold(tmp_path)
    holder.kill()
    holder.wait()
    assert (tmp_path / HELD_FILE).exists()  # a crashed holder cannot remove its record...
    assert run(TRY, tmp_path).split() == ["acquired", "link", str(pid)]  # ...the next one breaks it as stale
