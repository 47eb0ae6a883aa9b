"""Child process for tests/test_background_exit.py: a background save still in flight when the process ends.

Usage: ``python _exit_child.py MODE ROOT``. Writes are slowed down (``SLOW_WRITE_SECONDS`` each) so the
save is still being written when the parent interrupts the child or when the script ends. The first
data write prints ``WRITING`` on stdout.

Modes:
  ckpt-sigint     Checkpointer(background=True).save(...), then "train" (sleep) until SIGINT; the README's
                  plain ``ckpt.close()`` after the loop is never reached.
  ckpt-close      the same, but the loop's ``except KeyboardInterrupt`` calls ``ckpt.close()`` and re-raises.
  ckpt-forgotten  Checkpointer(background=True, keep_last=1): epoch 1 committed, epoch 2 in flight when
                  the script ends without ever calling ckpt.close().
  save-no-wait    savegame.save(..., background=True) and the script ends without waiting on the handle.
  save-fails-late the same, but the save fails at its commit (after its data was written): never collected.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time

import numpy as np

import savegame
import savegame.storage.local.ops as local_ops
from savegame.storage.local import FileOps

SLOW_WRITE_SECONDS = 0.25


class SlowOps(FileOps):
    """A slow disk: every data write takes a while; the first one is announced on stdout."""

    def __init__(self, *, fail_commit: bool = False) -> None:
        self.started = threading.Event()
        self.fail_commit = fail_commit

    def write(self, fd: int, data: memoryview) -> int:
        if not self.started.is_set():
            self.started.set()
            print("WRITING", flush=True)
        time.sleep(SLOW_WRITE_SECONDS)
        return super().write(fd, data)

    def fsync_dir(self, path: str) -> None:
        if self.fail_commit and os.path.basename(path).startswith(".staging-"):
            raise OSError(errno.EIO, "Input/output error (injected)", path)
        super().fsync_dir(path)


def state() -> dict[str, object]:
    rng = np.random.default_rng(0)
    return {"weights": {f"w{i}": rng.standard_normal(50_000) for i in range(12)}, "epoch": 1}


def main() -> None:
    mode, root = sys.argv[1], sys.argv[2]
    if mode in ("ckpt-sigint", "ckpt-close"):
        ckpt = savegame.Checkpointer(root, background=True)
        ckpt.storage.ops = SlowOps()  # type: ignore[attr-defined]
        ckpt.save(state(), epoch=1)
        print("SUBMITTED", flush=True)
        try:
            time.sleep(120)  # training goes on until Ctrl-C
        except KeyboardInterrupt:
            if mode == "ckpt-close":
                ckpt.close()
                print("CLOSED", flush=True)
            raise
        ckpt.close()
    elif mode == "ckpt-forgotten":
        ckpt = savegame.Checkpointer(root, background=True, keep_last=1)
        ckpt.save(state(), epoch=1)
        ckpt.wait()
        ckpt.storage.ops = SlowOps()  # type: ignore[attr-defined]
        ckpt.save(state(), epoch=2)
        print("SUBMITTED", flush=True)  # and the script ends without ckpt.close()
    elif mode in ("save-no-wait", "save-fails-late"):
        local_ops.DEFAULT_OPS = SlowOps(fail_commit=mode == "save-fails-late")
        savegame.save(os.path.join(root, "c"), state(), background=True)
        print("SUBMITTED", flush=True)  # and the script ends, the handle never waited for
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
