"""A read-only view of a checkpoint root for the command line: list, rank, check, verify.

:class:`savegame.run.checkpointer.Checkpointer` creates its directory and removes dead writers' staging
leftovers when it is constructed; ``savegame ls``, ``verify``, ``plot`` and ``prune --dry-run`` must not
change anything, so they read the root here instead, through the same :class:`~savegame.run.index.RunIndex`
the Checkpointer keeps (entries, order, latest, best, what retention deletes, resolving ``latest`` /
``best`` / a name: the rules are documented there). This module adds what only the command line shows:
quarantined checkpoints, staging and trash leftovers, a cheap check of each checkpoint's file sizes and
the status column. A checkpoint that disappears while it is read (a writer's retention deleted it) is
left out of the listing, not reported as corrupt.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from savegame import api
from savegame.cli.common import UsageError, is_checkpoint_dir, local_path
from savegame.engine import verifier
from savegame.errors import CheckpointError, CheckpointNotFoundError, InvalidNameError
from savegame.format.manifest import Manifest
from savegame.run.checkpointer import build_keep_policy
from savegame.run.index import IndexEntry, RecordedBest, RunIndex, entry_from_manifest
from savegame.run.timing import RecordedTiming, recorded_timing
from savegame.storage import is_url
from savegame.storage.base import MANIFEST, QUARANTINE_PREFIX
from savegame.storage.local import LocalStorage, leftover_kind

__all__ = ["Entry", "RecordedBest", "Root", "Scan", "check_monitor_recorded", "classify", "doomed_by_retention",
           "resolve_checkpoint", "scan_root", "verify_checkpoint"]  # fmt: skip

Status = Literal["ok", "unverified", "corrupt", "quarantined"]


@dataclass(frozen=True)
class Root:
    """A root of checkpoints: a local directory, or an fsspec URL (``storage`` is its RemoteStorage)."""

    location: str
    storage: Any = None

    @property
    def remote(self) -> bool:
        """Whether the root is an fsspec URL."""
        return self.storage is not None

    @classmethod
    def open(cls, arg: str) -> Root:
        """The root an argument names; UsageError if it does not exist or is a checkpoint itself."""
        if is_url(arg):
            from savegame.storage import storage_for

            kind, _ = classify(arg)
            if kind == "checkpoint":
                raise UsageError(f"{arg} is a checkpoint, not a directory of checkpoints (try 'savegame inspect')")
            storage: Any = storage_for(arg)
            return cls(str(storage.root), storage)
        root = local_path(arg)
        if not os.path.isdir(root):
            raise UsageError(f"{root}: no such directory" if not os.path.exists(root) else f"{root}: not a directory")
        if is_checkpoint_dir(root):
            raise UsageError(f"{root} is a checkpoint, not a directory of checkpoints (try 'savegame inspect {root}')")
        return cls(root)

    def where(self, name: str) -> str:
        """Path or URL of folder ``name``."""
        return f"{self.location}/{name}" if self.remote else os.path.join(self.location, name)

    def ref(self, name: str) -> Any:
        """What :mod:`savegame.api` reads checkpoint ``name`` through (a path, or a CheckpointRef)."""
        return self.storage.ref(name) if self.remote else os.path.join(self.location, name)

    def still_committed(self, name: str) -> bool:
        """Whether checkpoint ``name`` is still committed (a writer's retention may have deleted it)."""
        if self.remote:
            return bool(self.storage.exists(name))
        path = os.path.join(self.location, name)
        return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))

    def index(self) -> RunIndex:
        """A :class:`RunIndex` of the root, read now (a local root through a storage that creates nothing)."""
        index = RunIndex(self.storage if self.remote else LocalStorage(self.location, create=False))
        index.refresh(relist=True)
        return index

    def aside(self) -> tuple[list[str], list[str]]:
        """(quarantined, staging/trash leftovers) folder names, sorted (committed ones: :meth:`index`)."""
        if self.remote:
            return list(self.storage.quarantined()), []
        return _aside_names(self.location)


def classify(arg: str) -> tuple[str, str]:
    """``("checkpoint" | "root" | "missing" | "other", location)`` for a path or URL argument."""
    if is_url(arg):
        from savegame.storage import locate

        try:
            storage, name = locate(arg)
        except InvalidNameError:
            return "root", arg
        return ("checkpoint" if storage.exists(name) else "root"), arg
    path = local_path(arg)
    if is_checkpoint_dir(path):
        return "checkpoint", path
    if os.path.isdir(path):
        return "root", path
    return ("missing" if not os.path.lexists(path) else "other"), path


@dataclass
class Entry:
    """One folder of the root: a committed checkpoint, or a quarantined one (``quarantined=True``)."""

    name: str
    path: str
    manifest: Manifest | None
    ref: Any = None
    quarantined: bool = False
    ours: bool = False
    sequence: int | None = None
    epoch: int | None = None
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    weights_only: bool = False
    pinned: bool = False
    recorded_best: RecordedBest | None = None
    run: str | None = None
    status: Status = "unverified"
    problem: str | None = None
    is_best: bool = False
    is_latest: bool = False
    mtime: float = 0.0

    @property
    def created(self) -> _dt.datetime | None:
        """Commit time (UTC) from the manifest, None if it could not be read."""
        return self.manifest.created if self.manifest is not None else None

    @property
    def timestamp(self) -> float:
        """Commit time as unix seconds (the folder's mtime when the manifest is unreadable)."""
        return self.manifest.created.timestamp() if self.manifest is not None else self.mtime

    @property
    def size(self) -> int:
        """Bytes of the data files the manifest lists."""
        return self.manifest.total_bytes if self.manifest is not None else 0

    @property
    def files(self) -> int:
        """Number of data files the manifest lists."""
        return len(self.manifest.files) if self.manifest is not None else 0

    @property
    def timing(self) -> RecordedTiming | None:
        """How long the save took (:mod:`savegame.run.timing`); None for checkpoints that did not record it."""
        if self.manifest is None:
            return None
        return recorded_timing(self.manifest.progress, self.manifest.created.timestamp())

    def order(self) -> tuple[int, float, str]:
        """The Checkpointer's sort key, oldest first."""
        return (self.sequence if self.sequence is not None else -1, self.timestamp, self.name)


def stored_files(entry: Entry) -> list[tuple[tuple[int, int], int]]:
    """``((st_dev, st_ino), bytes)`` of each data file of the local checkpoint ``entry`` that is there: the
    files of incremental checkpoints are hard links of earlier ones, so one inode can be in several."""
    out: list[tuple[tuple[int, int], int]] = []
    for file in entry.manifest.files if entry.manifest is not None else ():
        try:
            st = os.stat(os.path.join(entry.path, file), follow_symlinks=False)
        except OSError:
            continue  # missing: nothing stored
        out.append(((st.st_dev, st.st_ino), st.st_size))
    return out


def distinct_bytes(entries: list[Entry], *, local: bool) -> int:
    """Bytes the data files of ``entries`` take: locally each inode once (a file linked by several
    incremental checkpoints is stored once); a remote checkpoint's files are its own."""
    if not local:
        return sum(e.size for e in entries)
    seen: set[tuple[int, int]] = set()
    total = 0
    for entry in entries:
        for inode, size in stored_files(entry):
            if inode not in seen:
                seen.add(inode)
                total += size
    return total


@dataclass
class Scan:
    """What a root holds: committed checkpoints (readable ones in order, unreadable ones last),
    quarantined ones, staging and trash leftovers, and the monitor the best is ranked by."""

    root: str
    source: Root
    entries: list[Entry]
    quarantined: list[Entry]
    leftovers: list[str]
    monitor: str | None
    mode: Literal["min", "max"] | None
    best: Entry | None
    latest: Entry | None
    index: RunIndex
    """The root's index (the rules of best and retention)."""

    @property
    def readable(self) -> list[Entry]:
        """Committed checkpoints whose manifest could be read, oldest first."""
        return [e for e in self.entries if e.manifest is not None]

    def find(self, name: str) -> Entry | None:
        """The committed checkpoint called ``name``, if any."""
        for entry in self.entries:
            if entry.name == name:
                return entry
        return None


def fill_progress(entry: Entry, known: IndexEntry) -> None:
    """Copy what the index read from the manifest's ``progress`` (epoch, step, metrics, best...) into ``entry``."""
    entry.manifest = known.manifest
    entry.ours, entry.sequence, entry.epoch, entry.step = known.ours, known.sequence, known.epoch, known.step
    entry.metrics = dict(known.metrics)
    entry.weights_only, entry.pinned = known.weights_only, known.pinned
    entry.recorded_best, entry.run = known.best, known.run


def cheap_problem(ref: Any, manifest: Manifest) -> str | None:
    """A problem visible without reading data (a file missing, of the wrong type or size), or None."""
    reader = api.open_checkpoint(ref, check=False)
    for file, info in manifest.files.items():
        where = reader.file_where(file)
        try:
            size = reader.file_size(file)
        except FileNotFoundError:
            return f"{where}: listed in the manifest but missing (or not a regular file)"
        except (CheckpointError, OSError) as exc:
            return f"{where}: {exc}"
        if size != info.bytes:
            return f"{where}: {size} bytes, the manifest says {info.bytes}"
    return None


def _committed_entry(root: Root, index: RunIndex, name: str) -> Entry | None:
    """The listing entry of committed checkpoint ``name``; None when it vanished while being read (a
    writer's retention deleted it: that is not damage)."""
    entry = Entry(name=name, path=root.where(name), manifest=None, ref=root.ref(name), mtime=_mtime(root, name))
    known = index.entries.get(name)
    if known is None:
        entry.status, entry.problem = "corrupt", str(index.unreadable[name])
        return entry
    fill_progress(entry, known)
    try:
        problem = cheap_problem(entry.ref, known.manifest)
    except (CheckpointError, OSError) as exc:
        problem = str(exc)
    if problem is not None:
        if not root.still_committed(name):
            return None
        entry.status, entry.problem = "corrupt", problem
    return entry


def _mtime(root: Root, name: str) -> float:
    if root.remote:
        return 0.0
    try:
        return os.stat(root.where(name)).st_mtime
    except OSError:
        return 0.0


def _quarantined_entry(root: Root, name: str) -> Entry:
    """The listing entry of quarantined folder ``name`` (its manifest read when local)."""
    path = root.where(name)
    entry = Entry(name=name, path=path, manifest=None, quarantined=True, mtime=_mtime(root, name),
                  status="quarantined")  # fmt: skip
    if root.remote:
        return entry
    entry.ref = path
    try:
        manifest = api.read_manifest(path)
    except (CheckpointError, OSError) as exc:
        entry.problem = str(exc)
        return entry
    fill_progress(entry, entry_from_manifest(name, manifest))
    entry.problem = cheap_problem(path, manifest)
    return entry


def _aside_names(root: str) -> tuple[list[str], list[str]]:
    """(quarantined, staging/trash leftovers) folder names of local ``root``."""
    quarantined, leftovers = [], []
    for e in os.scandir(root):
        if e.name.startswith(QUARANTINE_PREFIX):
            if e.is_dir(follow_symlinks=False):  # a symlink could point out of the root: never followed
                quarantined.append(e.name)
        elif leftover_kind(e) is not None:
            leftovers.append(e.name)
    return sorted(quarantined), sorted(leftovers)


_RESCANS = 100


def _readable_entries(root: Root, index: RunIndex) -> list[Entry]:
    """The listing entries of the index's readable checkpoints, oldest first. When some vanished
    while their files were looked at (a writer's retention runs right after its commits), the root
    is listed again, so the listing shows what the writer committed meanwhile rather than nothing."""
    for _ in range(_RESCANS):
        listed = [(e.name, _committed_entry(root, index, e.name)) for e in index.ordered()]
        vanished = [name for name, entry in listed if entry is None]
        if not vanished:
            break
        for name in vanished:
            index.note_gone(name)
        index.refresh(relist=True)
    return [entry for _, entry in listed if entry is not None]


def scan_root(arg: str, *, monitor: str | None = None, mode: str = "auto") -> Scan:
    """Read every manifest of the checkpoint root ``arg`` (a path or URL; no data files are read and
    nothing is written).

    ``monitor``: the metric that ranks the best (default: the one the run's Checkpointer recorded);
    ``mode``: ``min``, ``max`` or ``auto`` (from the name, as the library decides).
    """
    root = arg if isinstance(arg, Root) else Root.open(arg)
    quarantined, leftovers = root.aside()
    index = root.index()
    readable = _readable_entries(root, index)
    damaged = (_committed_entry(root, index, n) for n in index.unreadable)
    unreadable = sorted((e for e in damaged if e is not None), key=lambda e: (e.mtime, e.name))
    quarantine = sorted((_quarantined_entry(root, n) for n in quarantined), key=lambda e: (e.timestamp, e.name))
    ranked, resolved = index.monitor_for(monitor, mode)
    best_name = index.best(ranked, resolved)
    by_name = {e.name: e for e in readable}
    best = by_name.get(best_name.name) if best_name is not None else None
    latest = readable[-1] if readable else None
    if best is not None:
        best.is_best = True
    if latest is not None:
        latest.is_latest = True
    return Scan(root.location, root, readable + unreadable, quarantine, leftovers, ranked, resolved, best, latest,
                index)  # fmt: skip


def doomed_by_retention(
    scan: Scan, *, keep_last: int | None, keep_best: int | None, now: float | None = None
) -> list[Entry]:
    """What ``Checkpointer(root, keep_last=..., keep_best=..., monitor=scan.monitor).prune(all_runs=True)``
    deletes, oldest first.

    Only checkpoints written by a Checkpointer and not pinned are candidates; the policy applies to
    each run separately; the newest, the best, each run's newest and best and every best the manifests
    record are always kept.
    """
    policy = build_keep_policy(monitor=scan.monitor, mode=scan.mode or "auto", keep_last=keep_last,
                               keep_best=keep_best)  # fmt: skip
    names = scan.index.doomed(policy, run=None, best=scan.best.name if scan.best is not None else None,
                              monitor=scan.monitor, mode=scan.mode, now=now)  # fmt: skip
    return [e for e in (scan.find(n) for n in names) if e is not None]


def check_monitor_recorded(scan: Scan) -> None:
    """ConfigError when the scan's monitor is one that none of the Checkpointer's checkpoints recorded."""
    scan.index.check_monitor_recorded(scan.monitor, run=None, where=scan.root)


# --------------------------------------------------------------------------------------------------
# Resolving a checkpoint argument


def resolve_checkpoint(arg: str, which: str | None = None) -> str:
    """The checkpoint (path or URL) an argument names.

    ``arg`` is a checkpoint; or a root, with ``which`` = ``latest`` (default), ``best`` or a checkpoint
    name; or ``ROOT/latest`` / ``ROOT/best`` when no checkpoint has that name.
    """
    kind, location = classify(arg)
    if kind == "checkpoint":
        if which is not None:
            raise UsageError(f"{location} is a checkpoint; --which only applies to a directory of checkpoints")
        return location
    root_arg, pick = arg, which
    if kind in ("missing", "root") and which is None:
        parent, slash, base = arg.rstrip("/").rpartition("/")
        parent = parent if slash else "."  # a bare "latest" / "best": in the current directory
        if base in ("latest", "best") and parent and classify(parent)[0] == "root":
            if kind == "missing" or (is_url(arg) and not _has_checkpoints(arg)):
                root_arg, pick = parent, base
    if kind == "missing" and root_arg == arg:
        raise UsageError(f"{location}: no such checkpoint or directory")
    if kind == "other":
        raise UsageError(f"{location}: not a savegame checkpoint (a checkpoint is a directory with a {MANIFEST})")
    root = Root.open(root_arg)
    try:
        return root.where(root.index().resolve(pick or "latest"))
    except CheckpointNotFoundError as exc:
        raise UsageError(str(exc)) from None


def _has_checkpoints(url: str) -> bool:
    from savegame.storage import storage_for

    return bool(storage_for(url).committed())


# --------------------------------------------------------------------------------------------------
# Verification with progress


def verify_checkpoint(location: Any, *, progress: Callable[[int], None] | None = None) -> Manifest:
    """:func:`savegame.engine.verifier.verify_checkpoint` (what :func:`savegame.verify` checks) for a path, URL
    or ref, reporting the bytes hashed to ``progress`` as it goes. Raises the library's
    :class:`~savegame.CorruptCheckpointError` subclasses naming the first problem."""
    reader = api.open_checkpoint(location)
    try:
        return verifier.verify_checkpoint(reader, progress=progress)
    finally:
        reader.close()


def entry_summary(entry: Entry) -> dict[str, Any]:
    """The JSON form of an entry (``savegame ls --json``)."""
    created = entry.created
    timing = entry.timing
    return {
        "name": entry.name,
        "path": entry.path,
        "sequence": entry.sequence,
        "epoch": entry.epoch,
        "step": entry.step,
        "metrics": dict(entry.metrics),
        "created": created,
        "age_seconds": round(time.time() - created.timestamp(), 3) if created is not None else None,
        "size": entry.size,
        "linked_bytes": entry.manifest.linked_bytes if entry.manifest is not None else 0,
        "blocking_seconds": round(timing.blocked, 6) if timing is not None else None,
        "durable_seconds": round(timing.durable, 6) if timing is not None else None,
        "files": entry.files,
        "is_best": entry.is_best,
        "is_latest": entry.is_latest,
        "pinned": entry.pinned,
        "weights_only": entry.weights_only,
        "run": entry.run,
        "status": entry.status,
        "problem": entry.problem,
    }
