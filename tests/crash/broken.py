"""Deliberately broken commit protocols, to show that each harness catches the loss they cause.

Nothing here is used by savegame itself: the harnesses install these in a child process (or, with
``monkeypatch``, in a test) to prove they are able to fail.

* ``publish-early``: the checkpoint folder is renamed into place (after deleting any old one of the
  same name) and its manifest written *before* the data files, which follow slowly. A kill or a reader
  in that window sees a "committed" checkpoint with missing or short files, or no checkpoint at all
  where a committed one used to be.
* ``no-fsync`` / ``no-dirsync``: :class:`SkippingOps` drops file or directory fsyncs. A kill cannot see
  that (the page cache survives the process); the power-loss replay (``powerloss.py``) does.
"""

from __future__ import annotations

import os
import time
from typing import Any

from savegame.storage.base import MANIFEST
from savegame.storage.local import FileOps, LocalTransaction

BROKEN_KINDS = ("publish-early", "no-fsync", "no-dirsync")


class _BufferSink:
    """Keeps a data file in memory until the broken commit writes it (after publishing)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.data += data
        return len(data)

    def close(self) -> None:
        pass

    def discard(self) -> None:
        pass


def _early_open(self: LocalTransaction, file: str) -> Any:
    sink = _BufferSink()
    self.__dict__.setdefault("_early_files", {})[file] = sink
    return sink


def _write_file(ops: FileOps, path: str, data: bytes | bytearray, *, pause: float) -> None:
    fd = ops.open_new(path)
    try:
        view = memoryview(data)
        for start in range(0, len(view), 64 << 10):
            ops.write(fd, view[start : start + (64 << 10)])
            if pause:
                time.sleep(pause)
        ops.fsync(fd)
    finally:
        ops.close(fd)


def _early_commit(self: LocalTransaction, manifest: bytes) -> str:
    ops = self.storage.ops
    final = os.path.join(self.storage.root, self.name)
    if os.path.lexists(final):
        ops.rmtree(final)  # BROKEN: the old checkpoint is gone before the new one is complete
    ops.rename(self.staging, final)  # BROKEN: visible before its data is written
    _write_file(ops, os.path.join(final, MANIFEST), manifest, pause=0.0)
    pause = float(os.environ.get("SAVEGAME_BROKEN_PAUSE", "0.002"))
    for file, sink in self.__dict__.get("_early_files", {}).items():
        _write_file(ops, os.path.join(final, file), sink.data, pause=pause)
    ops.fsync_dir(final)
    ops.fsync_dir(self.storage.root)
    self._done = True
    return final


def install_publish_early(monkeypatch: Any = None) -> None:
    """Replace the commit protocol by the broken one (process-wide; or undone by ``monkeypatch``)."""
    if monkeypatch is not None:
        monkeypatch.setattr(LocalTransaction, "open", _early_open)
        monkeypatch.setattr(LocalTransaction, "commit", _early_commit)
    else:
        LocalTransaction.open = _early_open  # type: ignore[method-assign]
        LocalTransaction.commit = _early_commit  # type: ignore[method-assign]


class SkippingOps(FileOps):
    """File operations that silently skip file fsyncs (``no-fsync``) or directory fsyncs (``no-dirsync``)."""

    def __init__(self, kind: str, base: FileOps | None = None) -> None:
        if kind not in ("no-fsync", "no-dirsync"):
            raise ValueError(kind)
        self.kind = kind
        self.base = base or FileOps()

    def open_new(self, path: str) -> int:
        return self.base.open_new(path)

    def write(self, fd: int, data: memoryview) -> int:
        return self.base.write(fd, data)

    def set_direct(self, fd: int, on: bool) -> bool:
        return self.base.set_direct(fd, on)

    def truncate(self, fd: int, size: int) -> None:
        self.base.truncate(fd, size)

    def fsync(self, fd: int) -> None:
        if self.kind != "no-fsync":
            self.base.fsync(fd)

    def close(self, fd: int) -> None:
        self.base.close(fd)

    def mkdir(self, path: str) -> None:
        self.base.mkdir(path)

    def rename(self, src: str, dst: str) -> None:
        self.base.rename(src, dst)

    def exchange(self, a: str, b: str) -> bool:
        return self.base.exchange(a, b)

    def fsync_dir(self, path: str) -> None:
        if self.kind != "no-dirsync":
            self.base.fsync_dir(path)

    def rmtree(self, path: str) -> None:
        self.base.rmtree(path)
