"""A read-only view of a checkpoint root for the command line: list, rank, check, verify.

:class:`savegame.checkpointer.Checkpointer` creates its directory and removes dead writers' staging
leftovers when it is constructed; ``savegame ls``, ``verify``, ``plot`` and ``prune --dry-run`` must not
change anything, so they read the root here instead. The rules mirror the Checkpointer exactly (and
``tests/test_cli.py`` checks that they agree with ``Checkpointer.list()`` and ``prune(dry_run=True)``):

* a checkpoint's progress is the manifest's ``progress`` in the layout documented in
  :mod:`savegame.checkpointer`; it was written by a Checkpointer when ``progress.checkpointer`` is
  :data:`~savegame.checkpointer.PROGRESS_VERSION` and ``progress.sequence`` a non-negative int;
* order (oldest first): sequence (-1 for checkpoints not written by a Checkpointer), commit time, name;
  the latest is the last readable one;
* a checkpoint's run is ``progress.run`` (None for manifests older than run ids);
* the best for a monitor: the best recorded by the newest Checkpointer manifest when it is for the same
  monitor and mode and that checkpoint still exists, otherwise recomputed over the checkpoints of the
  newest checkpoint's run (strict improvement, NaN never improves);
* retention (``savegame prune``) is ``Checkpointer.prune(all_runs=True)``: the keep policy applied to
  each run's unpinned Checkpointer checkpoints separately, never deleting the newest, the best, a
  run's best by the monitor nor a best the manifests record;
* a checkpoint that disappears while it is read (a writer's retention deleted it) is left out of the
  listing, not reported as corrupt.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from . import api, verifier
from .checkpointer import (
    PROGRESS_VERSION,
    RecordedBest,
    build_keep_policy,
    parse_best,
    parse_run,
    plan_deletions,
    progress_int,
    progress_metrics,
    recorded_best_names,
    recorded_metrics,
    unrecorded_monitor_error,
)
from .cli_common import UsageError, is_checkpoint_dir, local_path
from .errors import CheckpointError, InvalidNameError
from .manifest import Manifest
from .policies import CheckpointInfo, is_better, resolve_mode
from .storage import is_url
from .storage.base import MANIFEST, QUARANTINE_PREFIX, STAGING_PREFIX, TRASH_PREFIX

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
            from .storage import storage_for

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

    def names(self) -> tuple[list[str], list[str], list[str]]:
        """(committed, quarantined, staging/trash leftovers) folder names, sorted."""
        if self.remote:
            return list(self.storage.committed()), list(self.storage.quarantined()), []
        return _committed_names(self.location)


def classify(arg: str) -> tuple[str, str]:
    """``("checkpoint" | "root" | "missing" | "other", location)`` for a path or URL argument."""
    if is_url(arg):
        from .storage import locate

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

    def order(self) -> tuple[int, float, str]:
        """The Checkpointer's sort key, oldest first."""
        return (self.sequence if self.sequence is not None else -1, self.timestamp, self.name)


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


def fill_progress(entry: Entry) -> None:
    """Copy what the manifest's ``progress`` says (epoch, step, metrics, best...) into ``entry``."""
    manifest = entry.manifest
    progress = manifest.progress if manifest is not None and isinstance(manifest.progress, Mapping) else {}
    entry.ours = progress.get("checkpointer") == PROGRESS_VERSION and progress_int(progress.get("sequence")) is not None
    entry.sequence = progress_int(progress.get("sequence")) if entry.ours else None
    entry.epoch = progress_int(progress.get("epoch"))
    entry.step = progress_int(progress.get("step"))
    entry.metrics = progress_metrics(progress.get("metrics"))
    entry.weights_only = progress.get("weights_only") is True
    entry.pinned = progress.get("pinned") is True
    entry.recorded_best = parse_best(progress.get("best")) if entry.ours else None
    entry.run = parse_run(progress.get("run")) if entry.ours else None


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


def _read(root: Root, name: str, *, quarantined: bool) -> Entry | None:
    """The entry of folder ``name``; None when a committed checkpoint vanished while being read (a
    writer's retention deleted it: that is not damage)."""
    entry = _read_entry(root, name, quarantined=quarantined)
    if not quarantined and entry.status == "corrupt" and not root.still_committed(name):
        return None
    return entry


def _read_entry(root: Root, name: str, *, quarantined: bool) -> Entry:
    path = root.where(name)
    mtime = 0.0
    if not root.remote:
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            pass
    entry = Entry(name=name, path=path, manifest=None, quarantined=quarantined, mtime=mtime)
    if quarantined and root.remote:
        entry.status = "quarantined"
        return entry
    entry.ref = path if quarantined else root.ref(name)
    try:
        entry.manifest = api.read_manifest(entry.ref)
    except (CheckpointError, OSError) as exc:
        entry.status = "quarantined" if quarantined else "corrupt"
        entry.problem = str(exc)
        return entry
    fill_progress(entry)
    problem = cheap_problem(entry.ref, entry.manifest)
    if quarantined:
        entry.status = "quarantined"
        entry.problem = problem
    elif problem is not None:
        entry.status, entry.problem = "corrupt", problem
    return entry


def _committed_names(root: str) -> tuple[list[str], list[str], list[str]]:
    """(committed, quarantined, leftovers) folder names of ``root``, like ``LocalStorage`` sees them."""
    committed, quarantined, leftovers = [], [], []
    for e in os.scandir(root):
        if e.name.startswith(QUARANTINE_PREFIX):
            if e.is_dir(follow_symlinks=False):  # a symlink could point out of the root: never followed
                quarantined.append(e.name)
        elif e.name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
            leftovers.append(e.name)
        elif not e.name.startswith(".") and e.is_dir(follow_symlinks=False):
            if os.path.isfile(os.path.join(e.path, MANIFEST)):
                committed.append(e.name)
    return sorted(committed), sorted(quarantined), sorted(leftovers)


_RELIST_ROUNDS = 100
_EMPTY_RELISTS = 2


def _read_committed(root: Root, committed: list[str]) -> list[Entry]:
    """The entries of the ``committed`` folders. When some vanished while being read (a writer's
    retention runs right after its commits), the root is listed again and the new folders are read
    too, so the listing shows what the writer committed meanwhile rather than nothing; an empty
    listing is taken again twice, 10 ms apart (a scan overtaken by a writer's saves and deletions)."""
    entries: list[Entry] = []
    seen: set[str] = set()
    todo = committed
    for attempt in range(_RELIST_ROUNDS):
        vanished = False
        for name in todo:
            seen.add(name)
            entry = _read(root, name, quarantined=False)
            if entry is None:
                vanished = True
            else:
                entries.append(entry)
        if not vanished and (entries or attempt >= _EMPTY_RELISTS):
            break
        if not vanished:
            time.sleep(0.01)
        todo = [n for n in root.names()[0] if n not in seen]
    return entries


def rank_best(entries: list[Entry], monitor: str | None, mode: Literal["min", "max"] | None) -> Entry | None:
    """The best of the readable ``entries`` (oldest first) for ``monitor`` (see the module docstring)."""
    if monitor is None or mode is None:
        return None
    ours = [e for e in entries if e.ours and e.manifest is not None]
    by_name = {e.name: e for e in entries if e.manifest is not None}
    if ours:
        ours = [e for e in ours if e.run == ours[-1].run]  # the newest checkpoint's run
        recorded = ours[-1].recorded_best
        if recorded is not None and recorded.monitor == monitor and recorded.mode == mode and recorded.name in by_name:
            return by_name[recorded.name]
    best: Entry | None = None
    best_value: float | None = None
    for entry in ours:
        value = entry.metrics.get(monitor)
        if value is not None and is_better(value, best_value, mode):
            best, best_value = entry, value
    return best


def recorded_monitor(entries: list[Entry]) -> tuple[str, Literal["min", "max"]] | None:
    """The monitor and mode of the newest Checkpointer manifest that records a best, if any."""
    for entry in reversed(entries):
        if entry.ours and entry.recorded_best is not None:
            return entry.recorded_best.monitor, entry.recorded_best.mode
    return None


def scan_root(arg: str, *, monitor: str | None = None, mode: str = "auto") -> Scan:
    """Read every manifest of the checkpoint root ``arg`` (a path or URL; no data files are read and
    nothing is written).

    ``monitor``: the metric that ranks the best (default: the one the run's Checkpointer recorded);
    ``mode``: ``min``, ``max`` or ``auto`` (from the name, as the library decides).
    """
    root = arg if isinstance(arg, Root) else Root.open(arg)
    committed, quarantined, leftovers = root.names()
    entries = _read_committed(root, committed)
    readable = sorted((e for e in entries if e.manifest is not None), key=Entry.order)
    unreadable = sorted((e for e in entries if e.manifest is None), key=lambda e: (e.mtime, e.name))
    quarantine = sorted((_read_entry(root, n, quarantined=True) for n in quarantined),
                        key=lambda e: (e.timestamp, e.name))  # fmt: skip
    resolved: Literal["min", "max"] | None
    if monitor is not None:
        resolved = resolve_mode(monitor, mode)
    else:
        found = recorded_monitor(readable)
        monitor, resolved = found if found is not None else (None, None)
        if found is not None and mode != "auto":
            resolved = resolve_mode(found[0], mode)
    best = rank_best(readable, monitor, resolved)
    latest = readable[-1] if readable else None
    if best is not None:
        best.is_best = True
    if latest is not None:
        latest.is_latest = True
    return Scan(root.location, root, readable + unreadable, quarantine, leftovers, monitor, resolved, best, latest)


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
    ours = [e for e in scan.readable if e.ours]
    protected = recorded_best_names((e.run, e.recorded_best) for e in ours)
    protected.update(e.name for e in (scan.best, scan.latest) if e is not None)
    candidates = [e for e in ours if not e.pinned and e.sequence is not None]
    groups: dict[str | None, list[CheckpointInfo]] = {}
    for e in candidates:
        if e.sequence is not None:
            groups.setdefault(e.run, []).append(CheckpointInfo(e.name, e.sequence, e.epoch, e.step, e.metrics,
                                                               e.timestamp))  # fmt: skip
    names = set(plan_deletions(groups, policy, now=time.time() if now is None else now, protected=protected,
                               monitor=scan.monitor, mode=scan.mode))  # fmt: skip
    return [e for e in candidates if e.name in names]


def check_monitor_recorded(scan: Scan) -> None:
    """ConfigError when the scan's monitor is one that none of the Checkpointer's checkpoints recorded."""
    ours = [e for e in scan.readable if e.ours]
    recorded = recorded_metrics((e.metrics for e in ours), (e.recorded_best for e in ours))
    if scan.monitor is not None and ours and scan.monitor not in recorded:
        raise unrecorded_monitor_error(scan.root, scan.monitor, recorded)


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
    scan = scan_root(root_arg)
    pick = pick or "latest"
    if not scan.readable:
        raise UsageError(f"{scan.root}: not a checkpoint and holds no readable checkpoints")
    if pick == "latest":
        assert scan.latest is not None
        return scan.latest.path
    if pick == "best":
        if scan.best is None:
            raise UsageError(f"{scan.root}: no best checkpoint (no monitored metric was recorded)")
        return scan.best.path
    entry = scan.find(pick)
    if entry is None:
        names = ", ".join(e.name for e in scan.entries[:10])
        raise UsageError(f"{scan.root}: no checkpoint named {pick!r} (found: {names})")
    return entry.path


def _has_checkpoints(url: str) -> bool:
    from .storage import storage_for

    return bool(storage_for(url).committed())


# --------------------------------------------------------------------------------------------------
# Verification with progress


def verify_checkpoint(location: Any, *, progress: Callable[[int], None] | None = None) -> Manifest:
    """:func:`savegame.verifier.verify_checkpoint` (what :func:`savegame.verify` checks) for a path, URL
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
        "files": entry.files,
        "is_best": entry.is_best,
        "is_latest": entry.is_latest,
        "pinned": entry.pinned,
        "weights_only": entry.weights_only,
        "run": entry.run,
        "status": entry.status,
        "problem": entry.problem,
    }
