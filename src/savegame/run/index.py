"""RunIndex: the one read-only view of a run root -- what it holds and what "latest" / "best" mean.

A *run root* is a directory (or fsspec URL) of checkpoints, usually written by a
:class:`~savegame.run.checkpointer.Checkpointer`. This module owns the rules that answer, from the
manifests alone (no data file is read):

* **entries**: the committed checkpoints with their progress (the ``progress`` layout documented in
  :mod:`savegame.run.checkpointer`). A checkpoint was written by a Checkpointer ("ours") when
  ``progress.checkpointer`` is :data:`PROGRESS_VERSION` and ``progress.sequence`` a non-negative int;
  its run is ``progress.run`` (None for manifests older than run ids). A committed folder whose
  manifest cannot be read is kept aside in :attr:`RunIndex.unreadable` with the error;
* **order**, oldest first: sequence (-1 for checkpoints not written by a Checkpointer), commit time,
  name; **latest** is the last one;
* **best** for a monitor and mode: the best recorded by the run's newest Checkpointer manifest when it
  is for that monitor and mode and that checkpoint still exists, otherwise recomputed over the run's
  checkpoints (strict improvement beyond ``min_delta`` and ``threshold``; NaN never improves). The run
  is the newest checkpoint's run unless the caller names one. Without a monitor, the one the newest
  Checkpointer manifest recording a best was ranked by;
* **doomed**: what retention deletes -- the keep policy applied to one run's checkpoints, or to each
  run separately; only unpinned Checkpointer checkpoints are candidates, and the newest checkpoint,
  the given best, each run's recorded best (and with all runs, each run's best by the monitor) are kept;
* **resolve**: which checkpoint ``"latest"``, ``"best"`` or a name means.

Reading never writes: building, refreshing or asking a RunIndex takes no lock, cleans nothing up and
creates no directory or file (:func:`open_storage` opens a local root without creating it). The
Checkpointer keeps one as its view of its directory (telling it about its own commits and deletions
with :meth:`RunIndex.note_committed` / :meth:`RunIndex.note_gone`); ``savegame ls``/``prune``/
``inspect``/``verify``/``diff`` (:mod:`savegame.cli.scan`) and :mod:`savegame.keras`'s loaders build one.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from savegame import api
from savegame._util.logs import get_logger
from savegame.errors import CheckpointError, CheckpointNotFoundError, ConfigError, CorruptCheckpointError
from savegame.format.manifest import Manifest
from savegame.policies import (
    CheckpointInfo,
    KeepPolicy,
    Progress,
    is_better,
    resolve_mode,
    select_for_deletion,
)
from savegame.storage import LocalStorage, is_url, storage_for
from savegame.storage.base import CheckpointRef, Storage

__all__ = [
    "ALIASES",
    "PROGRESS_VERSION",
    "IndexEntry",
    "RecordedBest",
    "RunIndex",
    "entry_from_manifest",
    "open_storage",
    "plan_deletions",
    "recorded_best_names",
]

log = get_logger("savegame.run.index")

PROGRESS_VERSION = 1
"""Version of the ``progress`` layout the Checkpointer writes (``progress["checkpointer"]``)."""

ALIASES = ("latest", "best")
"""Names that resolve inside a root (``ROOT/best``), never checkpoints of their own."""
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_RELIST_ROUNDS = 100
"""Listings :meth:`RunIndex.refresh` makes while a writer's retention deletes what it is reading."""
_EMPTY_RELISTS = 2


@dataclass(frozen=True)
class RecordedBest:
    """The best checkpoint for the monitored metric (persisted in every manifest's progress)."""

    monitor: str
    mode: Literal["min", "max"]
    value: float
    name: str
    epoch: int | None
    step: int | None

    def to_json(self) -> dict[str, Any]:
        """The manifest form."""
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "value": self.value,
            "name": self.name,
            "epoch": self.epoch,
            "step": self.step,
        }


@dataclass(frozen=True)
class IndexEntry:
    """A committed checkpoint with the progress its manifest records."""

    name: str
    manifest: Manifest
    ours: bool
    """Written by a Checkpointer (see the module docstring)."""
    sequence: int | None
    epoch: int | None
    step: int | None
    metrics: Mapping[str, float]
    epoch_end: bool
    weights_only: bool
    pinned: bool
    best: RecordedBest | None
    """The best the manifest records (Checkpointer checkpoints only)."""
    run: str | None = None

    @property
    def created(self) -> float:
        """Commit time as unix seconds."""
        return self.manifest.created.timestamp()

    def order(self) -> tuple[int, float, str]:
        """Sort key, oldest first: Checkpointer sequence, then commit time (foreign ones first)."""
        return (self.sequence if self.sequence is not None else -1, self.created, self.name)

    def progress(self) -> Progress:
        """The position as a save policy sees it; the time is unknown (another process's clock)."""
        return Progress(
            epoch=self.epoch, step=self.step, metrics=self.metrics, time=-math.inf, epoch_end=self.epoch_end
        )

    def info(self) -> CheckpointInfo:
        """The checkpoint as a keep policy sees it (Checkpointer checkpoints only: they have a sequence)."""
        assert self.sequence is not None
        return CheckpointInfo(self.name, self.sequence, self.epoch, self.step, self.metrics, self.created)


# --------------------------------------------------------------------------------------------------
# Parsing untrusted progress


def progress_int(value: object) -> int | None:
    """A non-negative int from untrusted progress, or None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def progress_metrics(value: object) -> dict[str, float]:
    """Metrics from untrusted progress: string keys, numeric values (others dropped)."""
    if not isinstance(value, Mapping):
        return {}
    out: dict[str, float] = {}
    for key, raw in value.items():
        if isinstance(key, str) and isinstance(raw, (int, float)) and not isinstance(raw, bool):
            out[key] = float(raw)
    return out


def parse_best(value: object) -> RecordedBest | None:
    """The ``best`` field of a manifest's progress, or None if absent or malformed."""
    if not isinstance(value, Mapping):
        return None
    monitor, mode, raw, name = value.get("monitor"), value.get("mode"), value.get("value"), value.get("name")
    if not isinstance(monitor, str) or mode not in ("min", "max") or not isinstance(name, str):
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        return None
    return RecordedBest(monitor, "min" if mode == "min" else "max", float(raw), name,
                        progress_int(value.get("epoch")), progress_int(value.get("step")))  # fmt: skip


def parse_run(value: object) -> str | None:
    """The ``run`` field of untrusted progress: a short id of letters, digits and ``_.:-``, or None."""
    if isinstance(value, str) and _RUN_ID.fullmatch(value):
        return value
    return None


def entry_from_manifest(name: str, manifest: Manifest) -> IndexEntry:
    """What the index knows of checkpoint ``name`` from its manifest (foreign checkpoints have no progress)."""
    progress = manifest.progress if isinstance(manifest.progress, Mapping) else {}
    ours = progress.get("checkpointer") == PROGRESS_VERSION and progress_int(progress.get("sequence")) is not None
    return IndexEntry(
        name=name,
        manifest=manifest,
        ours=ours,
        sequence=progress_int(progress.get("sequence")) if ours else None,
        epoch=progress_int(progress.get("epoch")),
        step=progress_int(progress.get("step")),
        metrics=MappingProxyType(progress_metrics(progress.get("metrics"))),
        epoch_end=progress.get("epoch_end") is not False,
        weights_only=progress.get("weights_only") is True,
        pinned=progress.get("pinned") is True,
        best=parse_best(progress.get("best")) if ours else None,
        run=parse_run(progress.get("run")) if ours else None,
    )


# --------------------------------------------------------------------------------------------------
# Rules shared by every reader of a run root


def recorded_best_names(bests: Iterable[tuple[str | None, RecordedBest | None]]) -> set[str]:
    """The checkpoints that the manifests record as best: per run (``(run, best)`` pairs, oldest
    first) and per monitor and mode it was ranked by, the best named by the newest manifest that names
    one. Retention never deletes these, whatever monitor or keep policy it was given: a run resumed with
    another monitor (or the other mode) records bests of its own, and the one the earlier ranking found
    stays too."""
    latest: dict[tuple[str | None, str, str], str] = {}
    for run, best in bests:
        if best is not None:
            latest[(run, best.monitor, best.mode)] = best.name
    return set(latest.values())


def best_by_metric(infos: Iterable[CheckpointInfo], monitor: str, mode: Literal["min", "max"]) -> str | None:
    """The name of the first checkpoint (oldest first) with the best ``monitor`` value (strict improvement)."""
    best: str | None = None
    value: float | None = None
    for info in infos:
        raw = info.metrics.get(monitor)
        if raw is not None and is_better(raw, value, mode):
            best, value = info.name, raw
    return best


def plan_deletions(
    groups: Mapping[str | None, Iterable[CheckpointInfo]], policy: KeepPolicy, *, now: float,
    protected: Collection[str], monitor: str | None = None, mode: Literal["min", "max"] | None = None,
) -> list[str]:  # fmt: skip
    """What retention deletes, oldest first: ``policy`` applied to each run's candidates separately
    (``groups``: run -> its deletable checkpoints, oldest first). Each run's newest, its best by
    ``monitor`` (when given) and every ``protected`` name are kept."""
    doomed: list[CheckpointInfo] = []
    for infos in groups.values():
        members = list(infos)
        best = best_by_metric(members, monitor, mode) if monitor is not None and mode is not None else None
        doomed.extend(select_for_deletion(members, policy, now=now, best_name=best))
    doomed.sort(key=lambda c: c.sequence)
    return [c.name for c in doomed if c.name not in protected]


def recorded_metrics(metrics: Iterable[Mapping[str, float]], bests: Iterable[RecordedBest | None]) -> set[str]:
    """Every metric name the given checkpoints recorded (their metrics and their recorded best's monitor)."""
    names = {name for values in metrics for name in values}
    names.update(best.monitor for best in bests if best is not None)
    return names


def unrecorded_monitor_error(where: str, monitor: str, recorded: Collection[str]) -> ConfigError:
    """The error for pruning by a metric no checkpoint recorded (a typo would otherwise rank nothing
    and let retention delete the real best)."""
    known = ", ".join(repr(n) for n in sorted(recorded)) or "none"
    return ConfigError(
        f"{where}: no checkpoint recorded the metric {monitor!r} (recorded metrics: {known}); "
        "check the spelling of the monitor. Nothing was deleted"
    )


def open_storage(root: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None) -> Storage:
    """The storage of run root ``root`` for reading: a URL's storage, or a local directory that is
    not created when missing (it then lists as empty)."""
    if isinstance(root, str) and is_url(root):
        return storage_for(root, storage_options=storage_options)
    if storage_options:
        return storage_for(root, storage_options=storage_options)  # raises the ConfigError for local paths
    text = os.fspath(root)
    for prefix in ("file://", "local://"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    return LocalStorage(text, create=False)


# --------------------------------------------------------------------------------------------------
# The index


class RunIndex:
    """A read-only view of the committed checkpoints of one run root (rules in the module docstring).

    ``RunIndex(storage).refresh()`` (or :meth:`open`) lists the root and reads each new manifest once;
    later refreshes read only the manifests of checkpoints that appeared since. Nothing is ever written.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.local = isinstance(storage, LocalStorage)
        self.entries: dict[str, IndexEntry] = {}
        """Readable committed checkpoints by name (in listing order; :meth:`ordered` sorts them)."""
        self.unreadable: dict[str, CheckpointError | OSError] = {}
        """Committed checkpoints whose manifest could not be read, with the error."""
        self.max_sequence = 0
        """The largest Checkpointer sequence seen in this root (also of checkpoints deleted since)."""

    @classmethod
    def open(cls, root: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None) -> RunIndex:
        """The index of run root ``root`` (a path or URL), read now."""
        index = cls(open_storage(root, storage_options=storage_options))
        index.refresh(relist=True)
        return index

    @property
    def root(self) -> str:
        """The root's path or URL (for messages)."""
        return str(getattr(self.storage, "root", ""))

    def ref(self, name: str) -> str | CheckpointRef:
        """What :mod:`savegame.api` reads checkpoint ``name`` through: its local path, or a reference
        to it through this index's (configured) remote storage."""
        return self.storage.path(name) if self.local else self.storage.ref(name)

    # ----------------------------------------------------------------------------------------------
    # Reading the root

    def refresh(self, *, relist: bool = False) -> dict[str, CheckpointError | OSError]:
        """Sync with the committed checkpoints of the root; return the newly unreadable ones.

        A checkpoint deleted while its manifest is read (a writer's retention) is left out, not
        reported. ``relist``: when that happened, list the root again (so the view shows what the
        writer committed meanwhile rather than nothing), and take an empty listing twice more, 10 ms
        apart (a listing overtaken by a writer's saves and deletions).
        """
        found: dict[str, CheckpointError | OSError] = {}
        names = self.storage.committed()
        present = set(names)
        for cache in (self.entries, self.unreadable):
            for gone in [n for n in cache if n not in present]:
                del cache[gone]
        seen: set[str] = set()
        for attempt in range(_RELIST_ROUNDS):
            vanished = False
            for name in names:
                seen.add(name)
                if name not in self.entries and name not in self.unreadable:
                    vanished = not self._read(name, found) or vanished
            if not relist or (not vanished and (self.entries or attempt >= _EMPTY_RELISTS)):
                break
            if not vanished:
                time.sleep(0.01)
            names = [n for n in self.storage.committed() if n not in seen]
        return found

    def _read(self, name: str, found: dict[str, CheckpointError | OSError]) -> bool:
        """Read checkpoint ``name``'s manifest into the index; False when it vanished meanwhile."""
        try:
            manifest = api.read_manifest(self.ref(name))
        except (CheckpointError, OSError) as exc:
            if not self._still_committed(name):  # deleted by a writer's retention while being read
                return False
            self.unreadable[name] = found[name] = exc
            return True
        entry = entry_from_manifest(name, manifest)
        self.entries[name] = entry
        if entry.sequence is not None:
            self.max_sequence = max(self.max_sequence, entry.sequence)
        return True

    def _still_committed(self, name: str) -> bool:
        try:
            return bool(self.storage.exists(name))
        except (CheckpointError, OSError):
            return False

    def note_committed(self, name: str, manifest: Manifest) -> IndexEntry:
        """Record a checkpoint the caller just committed (saves re-listing the root after each save)."""
        entry = entry_from_manifest(name, manifest)
        self.entries[name] = entry
        self.unreadable.pop(name, None)
        if entry.sequence is not None:
            self.max_sequence = max(self.max_sequence, entry.sequence)
        return entry

    def note_gone(self, name: str) -> None:
        """Forget a checkpoint the caller deleted, quarantined or found deleted."""
        self.entries.pop(name, None)
        self.unreadable.pop(name, None)

    # ----------------------------------------------------------------------------------------------
    # Order, runs, latest

    def ordered(self) -> list[IndexEntry]:
        """The readable checkpoints, oldest first."""
        return sorted(self.entries.values(), key=IndexEntry.order)

    @property
    def latest(self) -> IndexEntry | None:
        """The newest readable checkpoint (not verified), or None."""
        return max(self.entries.values(), key=IndexEntry.order, default=None)

    def names(self) -> set[str]:
        """Every committed name this index knows (readable or not): names a new checkpoint must avoid."""
        return set(self.entries) | set(self.unreadable)

    def newest_run(self) -> list[IndexEntry]:
        """The Checkpointer checkpoints of the newest one's run, oldest first (empty if there is none)."""
        ours = [e for e in self.ordered() if e.ours]
        return [e for e in ours if e.run == ours[-1].run] if ours else []

    def run_entries(self, run: str, *, or_newest: bool = False) -> list[IndexEntry]:
        """The Checkpointer checkpoints of run ``run``, oldest first; with ``or_newest``, those of the
        newest one's run when ``run`` has none yet (a Checkpointer that may resume, before its first save)."""
        own = [e for e in self.ordered() if e.ours and e.run == run]
        return own if own or not or_newest else self.newest_run()

    # ----------------------------------------------------------------------------------------------
    # Best

    def recorded_monitor(self) -> tuple[str, Literal["min", "max"]] | None:
        """The monitor and mode of the newest Checkpointer manifest that records a best, if any."""
        for entry in reversed(self.ordered()):
            if entry.ours and entry.best is not None:
                return entry.best.monitor, entry.best.mode
        return None

    def monitor_for(self, monitor: str | None, mode: str = "auto") -> tuple[str | None, Literal["min", "max"] | None]:
        """The monitor and mode that rank the best: ``monitor``, else the recorded one
        (:meth:`recorded_monitor`). ``mode`` ``"min"``/``"max"`` decides; ``"auto"`` takes the mode recorded
        for that monitor, else the one its name tells (:func:`resolve_mode`, ConfigError when it cannot)."""
        found = self.recorded_monitor()
        if monitor is not None:
            if mode == "auto" and found is not None and found[0] == monitor:
                return found
            try:
                return monitor, resolve_mode(monitor, mode, owner=f"best by monitor={monitor!r}")
            except ConfigError:
                ours = [e for e in self.ordered() if e.ours]
                recorded = recorded_metrics((e.metrics for e in ours), (e.best for e in ours))
                if ours and monitor not in recorded:  # more likely a typo: say so, with the recorded names
                    known = ", ".join(repr(n) for n in sorted(recorded)) or "none"
                    raise ConfigError(
                        f"{self.root}: no checkpoint recorded the metric {monitor!r} (recorded metrics: {known}); "
                        "check its spelling"
                    ) from None
                raise
        if found is None:
            return None, None
        return found[0], found[1] if mode == "auto" else resolve_mode(found[0], mode)

    def best(
        self, monitor: str | None, mode: Literal["min", "max"] | None, *, entries: Iterable[IndexEntry] | None = None,
        min_delta: float = 0.0, threshold: float | None = None,
    ) -> RecordedBest | None:  # fmt: skip
        """The best checkpoint for ``monitor`` among ``entries`` (a run's checkpoints, oldest first;
        default: the newest run's), by the rule of the module docstring; None without a monitor."""
        if monitor is None or mode is None:
            return None
        run = list(self.newest_run() if entries is None else entries)
        if run:
            recorded = run[-1].best
            if recorded is not None and recorded.monitor == monitor and recorded.mode == mode \
                    and recorded.name in self.entries:  # fmt: skip
                return recorded
        best: RecordedBest | None = None
        for entry in run:
            value = entry.metrics.get(monitor)
            if value is None:
                continue
            reference = best.value if best is not None else threshold
            if is_better(value, reference, mode, min_delta):
                best = RecordedBest(monitor, mode, value, entry.name, entry.epoch, entry.step)
        return best

    # ----------------------------------------------------------------------------------------------
    # Retention

    def doomed(
        self, keep: KeepPolicy, *, run: str | None, best: str | None = None, monitor: str | None = None,
        mode: Literal["min", "max"] | None = None, now: float | None = None,
    ) -> list[str]:  # fmt: skip
        """What retention would delete now, oldest first (nothing is deleted here).

        ``run``: apply ``keep`` to that run's checkpoints (retention after a save), or None: to each
        run separately, each run's best by ``monitor`` kept too (``savegame prune``,
        ``Checkpointer.prune(all_runs=True)``). Only unpinned Checkpointer checkpoints are candidates;
        the newest checkpoint, ``best``, the bests the manifests record and copies of a checkpoint (two
        folders with the same run and sequence) are always kept.
        """
        entries = self.ordered()
        protected = recorded_best_names((e.run, e.best) for e in entries if e.ours)
        if best is not None:
            protected.add(best)
        if entries:
            protected.add(entries[-1].name)
        # A Checkpointer never writes two checkpoints of one run with one sequence number: two such folders
        # are a copy the user made (cp -r of the best, to keep it) and the original. Neither is deleted.
        seen = Counter((e.run, e.sequence) for e in entries if e.ours)
        groups: dict[str | None, list[CheckpointInfo]] = {}
        for e in entries:
            if e.ours and not e.pinned and e.sequence is not None and (run is None or e.run == run) \
                    and seen[(e.run, e.sequence)] == 1:  # fmt: skip
                groups.setdefault(e.run, []).append(e.info())
        return plan_deletions(groups, keep, now=time.time() if now is None else now, protected=protected,
                              monitor=monitor if run is None else None, mode=mode)  # fmt: skip

    def check_monitor_recorded(self, monitor: str | None, *, run: str | None, where: str) -> None:
        """ConfigError (naming ``where``) when ``monitor`` is set but none of the Checkpointer
        checkpoints retention looks at (run ``run``'s, or every run's for None) recorded it."""
        if monitor is None:
            return
        scope = [e for e in self.ordered() if e.ours and (run is None or e.run == run)]
        recorded = recorded_metrics((e.metrics for e in scope), (e.best for e in scope))
        if scope and monitor not in recorded:
            raise unrecorded_monitor_error(where, monitor, recorded)

    # ----------------------------------------------------------------------------------------------
    # Resolving

    def check_best_readable(
        self, monitor: str | None, mode: str | None, *, entries: list[IndexEntry] | None = None
    ) -> None:
        """:class:`CorruptCheckpointError` when the newest manifest of the run (``entries``, default the
        newest run's) names as best by ``monitor`` and ``mode`` a checkpoint whose manifest is damaged:
        a lookup of the best must say so, not serve the runner-up in silence."""
        run = self.newest_run() if entries is None else entries
        recorded = run[-1].best if run else None
        if recorded is not None and (recorded.monitor, recorded.mode) == (monitor, mode) \
                and recorded.name in self.unreadable:  # fmt: skip
            raise CorruptCheckpointError(
                f"{self.root}: the best checkpoint {recorded.name} (by {monitor}, {mode}) is damaged: "
                f"{self.unreadable[recorded.name]}; pass its name or another one instead of 'best'"
            )

    def resolve(self, which: str, *, monitor: str | None = None, mode: str = "auto") -> str:
        """The name of the checkpoint ``which`` means: ``"latest"`` (the newest), ``"best"`` (the best
        of the newest run by ``monitor``, default the recorded one) or a checkpoint's name.

        A committed checkpoint whose manifest is unreadable resolves by its name (reading it then
        reports the damage). :class:`CheckpointNotFoundError` when there is no such checkpoint.
        """
        if which not in ALIASES and (which in self.entries or which in self.unreadable):
            return which
        if not self.entries:
            raise CheckpointNotFoundError(f"{self.root}: not a checkpoint and holds no readable checkpoints")
        if which == "latest":
            latest = self.latest
            assert latest is not None
            return latest.name
        if which == "best":
            ranked, resolved = self.monitor_for(monitor, mode)
            self.check_best_readable(ranked, resolved)
            best = self.best(ranked, resolved)
            if best is None:
                raise CheckpointNotFoundError(f"{self.root}: no best checkpoint (no monitored metric was recorded)")
            return best.name
        known = [e.name for e in self.ordered()] + sorted(self.unreadable)
        names = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "")
        raise CheckpointNotFoundError(
            f"{self.root}: no checkpoint {which!r} (no checkpoint named {which!r} among the {len(known)} "
            f"committed: {names})"
        )
