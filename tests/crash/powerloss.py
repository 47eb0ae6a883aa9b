"""Power-loss replay: which files survive if the machine dies after any system call of a save?

SIGKILL cannot test durability: the page cache survives the process, so a protocol that never calls
``fsync`` passes every kill test. This module records every storage system call a scenario makes
(through savegame's ``FileOps`` seam), then, for every prefix of that record, builds the directory
tree a power loss at that instant could leave on disk, under two pessimistic models:

* ``lazy``: nothing is durable unless fsynced: a file's content is what it held at its last
  ``fsync`` (empty if never), a directory's entries are what they were at its last directory fsync
  (entries created, renamed or removed since are undone);
* ``eager``: every directory change is durable at once, in order (a journaling filesystem that
  commits metadata eagerly), but file contents still only up to their last ``fsync``.

Each rebuilt tree is checked like a kill (``common.check_root``): everything whose save returned is
present and verifies, and nothing visible is torn. Real filesystems sit between the two models;
savegame's protocol must pass both, and dropping any fsync (``broken.SkippingOps``) must fail one.
"""

from __future__ import annotations

import itertools
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

import savegame
from savegame.storage.local import FileOps, LocalStorage
from savegame.storage.local import ops as local_ops

from .common import CheckResult, check_root, digest


class RecordingOps(FileOps):
    """Performs each call on ``base`` and appends it to :attr:`log` (paths relative to ``root``)."""

    def __init__(self, root: str, base: FileOps | None = None) -> None:
        self.root = os.path.abspath(root)
        self.base = base or FileOps()
        self.log: list[tuple[Any, ...]] = []
        self._ids: dict[int, int] = {}
        self._next = itertools.count()

    def _rel(self, path: str) -> str:
        rel = os.path.relpath(os.path.abspath(path), self.root)
        assert not rel.startswith(".."), path
        return rel

    def mark(self, *event: object) -> None:
        """A writer event (``S``/``C``/``D`` as in ``common.py``) at this point of the record."""
        self.log.append(("event", tuple(str(e) for e in event)))

    def open_new(self, path: str) -> int:
        fd = self.base.open_new(path)
        self._ids[fd] = fid = next(self._next)
        self.log.append(("create", self._rel(path), fid))
        return fd

    def write(self, fd: int, data: memoryview) -> int:
        n = self.base.write(fd, data)
        self.log.append(("write", self._ids[fd], bytes(data[:n])))
        return n

    def set_direct(self, fd: int, on: bool) -> bool:
        return self.base.set_direct(fd, on)  # changes how bytes travel, not which: nothing to record

    def truncate(self, fd: int, size: int) -> None:
        self.base.truncate(fd, size)
        self.log.append(("truncate", self._ids[fd], size))

    def fsync(self, fd: int) -> None:
        self.base.fsync(fd)
        self.log.append(("fsync", self._ids[fd]))

    def close(self, fd: int) -> None:
        self._ids.pop(fd, None)  # first: once closed, another thread may get the same fd number at once
        self.base.close(fd)

    def mkdir(self, path: str) -> None:
        self.base.mkdir(path)
        self.log.append(("mkdir", self._rel(path)))

    def rename(self, src: str, dst: str) -> None:
        self.base.rename(src, dst)
        self.log.append(("rename", self._rel(src), self._rel(dst)))

    def exchange(self, a: str, b: str) -> bool:
        done = self.base.exchange(a, b)
        if done:
            self.log.append(("exchange", self._rel(a), self._rel(b)))
        return done

    def link(self, src: str, dst: str) -> None:
        self.base.link(src, dst)
        self.log.append(("link", self._rel(src), self._rel(dst)))

    def fsync_dir(self, path: str) -> None:
        self.base.fsync_dir(path)
        self.log.append(("fsync_dir", self._rel(path)))

    def rmtree(self, path: str) -> None:
        self.base.rmtree(path)
        self.log.append(("rmtree", self._rel(path)))


@dataclass
class _Dir:
    entries: dict[str, int] = field(default_factory=dict)


@dataclass
class _File:
    data: bytearray = field(default_factory=bytearray)


class FsModel:
    """Inodes with current and durable states, replaying a :class:`RecordingOps` log."""

    ROOT = 0

    def __init__(self) -> None:
        self.nodes: dict[int, _Dir | _File] = {self.ROOT: _Dir()}
        self.durable_entries: dict[int, dict[str, int]] = {self.ROOT: {}}
        self.durable_data: dict[int, bytes] = {}
        self.files: dict[int, int] = {}  # recorder's file id -> inode
        self._ino = itertools.count(1)

    def _dir(self, ino: int) -> _Dir:
        node = self.nodes[ino]
        assert isinstance(node, _Dir)
        return node

    def _lookup(self, rel: str) -> int:
        ino = self.ROOT
        if rel == ".":
            return ino
        for part in rel.split(os.sep):
            ino = self._dir(ino).entries[part]
        return ino

    def _parent(self, rel: str) -> tuple[_Dir, str]:
        head, name = os.path.split(rel)
        return self._dir(self._lookup(head or ".")), name

    def apply(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "create":
            parent, name = self._parent(op[1])
            ino = next(self._ino)
            self.nodes[ino] = _File()
            parent.entries[name] = ino
            self.files[op[2]] = ino
        elif kind == "write":
            node = self.nodes[self.files[op[1]]]
            assert isinstance(node, _File)
            node.data += op[2]
        elif kind == "truncate":  # a direct file's padded last block cut back (not durable before fsync)
            node = self.nodes[self.files[op[1]]]
            assert isinstance(node, _File)
            del node.data[op[2] :]
        elif kind == "fsync":
            ino = self.files[op[1]]
            node = self.nodes[ino]
            assert isinstance(node, _File)
            self.durable_data[ino] = bytes(node.data)
        elif kind == "mkdir":
            parent, name = self._parent(op[1])
            ino = next(self._ino)
            self.nodes[ino] = _Dir()
            self.durable_entries[ino] = {}
            parent.entries[name] = ino
        elif kind == "rename":
            sp, sn = self._parent(op[1])
            dp, dn = self._parent(op[2])
            dp.entries[dn] = sp.entries.pop(sn)
        elif kind == "link":  # a new entry for the same inode (its data is durable as far as it was)
            parent, name = self._parent(op[2])
            parent.entries[name] = self._lookup(op[1])
        elif kind == "exchange":
            ap, an = self._parent(op[1])
            bp, bn = self._parent(op[2])
            ap.entries[an], bp.entries[bn] = bp.entries[bn], ap.entries[an]
        elif kind == "fsync_dir":
            ino = self._lookup(op[1])
            self.durable_entries[ino] = dict(self._dir(ino).entries)
        elif kind == "rmtree":
            parent, name = self._parent(op[1])
            parent.entries.pop(name, None)
        elif kind == "event":
            pass
        else:
            raise AssertionError(op)

    def materialize(self, dest: str, *, model: str) -> None:
        """Write the tree a power loss now could leave, under ``model`` (``lazy`` or ``eager``)."""
        self._write(self.ROOT, dest, model, depth=0)

    def fingerprint(self, *, model: str) -> str:
        """A digest of the tree :meth:`materialize` would write (to skip identical crash states)."""
        h = xxhash.xxh3_128()
        self._hash(self.ROOT, h, model, depth=0)
        return h.hexdigest()

    def _hash(self, ino: int, h: Any, model: str, depth: int) -> None:
        assert depth < 20
        node = self.nodes[ino]
        if isinstance(node, _File):
            data = self.durable_data.get(ino, b"")
            h.update(b"F%d:" % len(data))
            h.update(data)
            return
        entries = node.entries if model == "eager" else self.durable_entries.get(ino, {})
        h.update(b"D%d:" % len(entries))
        for name in sorted(entries):
            h.update(name.encode() + b"/")
            self._hash(entries[name], h, model, depth + 1)

    def _write(self, ino: int, path: str, model: str, depth: int) -> None:
        assert depth < 20
        node = self.nodes[ino]
        if isinstance(node, _File):
            with open(path, "wb") as f:
                f.write(self.durable_data.get(ino, b""))
            return
        os.makedirs(path, exist_ok=True)
        entries = node.entries if model == "eager" else self.durable_entries.get(ino, {})
        for name, child in entries.items():
            self._write(child, os.path.join(path, name), model, depth + 1)


MODELS = ("lazy", "eager")


def run_scenario(root: str, *, broken: str | None = None) -> RecordingOps:
    """Saves, overwrites (with and without renameat2) and deletes; returns the recorded calls.

    ``broken``: ``"no-fsync"`` or ``"no-dirsync"`` drops those calls *before* they reach the recorder
    (and the disk), as a protocol without them would. The scenario uses NumPy state (no torch) so
    that hundreds of crash points replay in seconds.
    """
    from .broken import SkippingOps

    recorder = RecordingOps(root)
    saved_ops = local_ops.DEFAULT_OPS
    local_ops.DEFAULT_OPS = SkippingOps(broken, base=recorder) if broken else recorder
    try:
        os.makedirs(root, exist_ok=True)
        storage = LocalStorage(root)

        def save(name: str, step: int, *, overwrite: bool = True, base: str | None = None) -> None:
            state = {"step": step, "w": np.full((64, 64), step, dtype=np.float32), "v": np.arange(step + 100),
                     "frozen": {"f": np.ones((32, 32), dtype=np.float32), "g": np.full(8, step)}}
            recorder.mark("S", name, digest(state))
            savegame.save(os.path.join(root, name), state, overwrite=overwrite,
                          base=os.path.join(root, base) if base else None)  # fmt: skip
            recorder.mark("C", name)

        save("a", 1)
        save("b", 2)
        save("last", 3)
        save("last", 4)  # overwrite: renameat2(RENAME_EXCHANGE)
        class_exchange = recorder.base.exchange
        recorder.base.exchange = lambda a, b: False  # type: ignore[method-assign]
        try:
            save("last", 5)  # overwrite without renameat2: rename aside, rename in, remove
        finally:
            recorder.base.exchange = class_exchange  # type: ignore[method-assign]
        recorder.mark("D", "a")
        storage.delete("a")
        save("c", 6)
        save("d", 7, base="c")  # incremental: frozen.f is hard-linked from c
        recorder.mark("D", "c")
        storage.delete("c")
        save("e", 8, base="d")  # links the same inode again, through d
    finally:
        local_ops.DEFAULT_OPS = saved_ops
    return recorder


@dataclass
class PowerLossReport:
    crash_points: int = 0
    trees_checked: int = 0
    trees_identical: int = 0
    checkpoints_verified: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"power-loss replay: {self.crash_points} crash points x {len(MODELS)} models = {self.trees_checked} "
            f"trees ({self.trees_identical} identical to one already checked), {self.checkpoints_verified} "
            f"checkpoints verified, {len(self.problems)} problems"
        )


def replay(recorder: RecordingOps, workdir: str, *, stop_at_first: bool = False) -> PowerLossReport:
    """Check the tree left by a power loss after every recorded call, under both models."""
    report = PowerLossReport()
    ops = recorder.log
    seen: set[tuple[str, str]] = set()
    for k in range(len(ops) + 1):
        if k < len(ops) and ops[k][0] == "event":
            continue  # events are not system calls: no new crash point
        report.crash_points += 1
        events = [op[1] for op in ops[:k] if op[0] == "event"]
        for model in MODELS:
            fs = FsModel()
            for op in ops[:k]:
                fs.apply(op)
            key = (fs.fingerprint(model=model), repr(events))
            report.trees_checked += 1
            if key in seen:
                report.trees_identical += 1  # the same tree and history were checked already
                continue
            seen.add(key)
            dest = os.path.join(workdir, f"crash-{k}-{model}")
            fs.materialize(dest, model=model)
            result: CheckResult = check_root(dest, events, expect_clean=False)
            report.checkpoints_verified += result.verified
            for problem in result.problems:
                report.problems.append(f"power loss after call {k} ({_describe(ops, k)}), {model} model: {problem}")
            shutil.rmtree(dest)
        if stop_at_first and report.problems:
            break
    return report


def _describe(ops: list[tuple[Any, ...]], k: int) -> str:
    calls = [op for op in ops[:k] if op[0] != "event"]
    if not calls:
        return "before any call"
    return " ".join(str(x) for x in calls[-1][:2])
