"""Resuming a Checkpointer's run: which checkpoint to load, verifying it, quarantining damaged ones,
falling back to the next older one, and loading it into the live state.

``Checkpointer.restore`` resolves ``which`` and calls :func:`resume_latest` (``"latest"``: newest
first, damaged ones quarantined -- or, without the writer lock, skipped and left in place -- the
checkpoint another process's retention deleted while it was read re-listed rather than taken for
damage: the reader race) or :func:`load_entry` (one named checkpoint). In a process group rank 0 picks
and verifies (:func:`pick_for_resume`) and every rank loads the same one (:func:`resume_together`).
With ``mirror=``, the mirror's newest valid checkpoint is fetched first and not hashed a second time
(:func:`already_verified`).

The functions take the :class:`~savegame.run.checkpointer.Checkpointer` they work for: they read its
settings (``verify``, ``rng``, ``restart``) and collaborators (storage, :class:`~savegame.run.index.RunIndex`,
coordinator, mirror) and update its view after a restore (last save, run, best). Moved here verbatim
from the Checkpointer's methods; ``ResumeWarning`` stays importable from :mod:`savegame.run.checkpointer`.
"""

from __future__ import annotations

import builtins
import os
import sys
import time
from collections.abc import Mapping, MutableMapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from savegame import api
from savegame._util.logs import get_logger, warn
from savegame._util.safetext import escape_controls
from savegame.adapters import torch_if_imported
from savegame.adapters.rng import RNGState
from savegame.engine.capture import replaceable
from savegame.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    NotACheckpointError,
    ResumeWarning,
    StateMismatchError,
    StorageError,
    UnsupportedFormatError,
)
from savegame.format.manifest import Manifest
from savegame.policies import Progress
from savegame.run.events import QuarantinedInfo, RestoredInfo
from savegame.run.index import IndexEntry, entry_from_manifest
from savegame.run.lock import process_holds
from savegame.run.records import RestoredProgress, Resumed
from savegame.storage.base import CheckpointRef
from savegame.storage.local import LocalStorage

if TYPE_CHECKING:
    from savegame.run.checkpointer import Checkpointer

__all__ = [
    "DISTRIBUTED_ITEM",
    "RNG_ITEM",
    "ResumeWarning",
    "announce_restore",
    "entry_named",
    "load_entry",
    "quarantine",
    "resume_latest",
]

log = get_logger("savegame.run.checkpointer")

RNG_ITEM = "rng"
"""Item name under which the global RNG state is added to full-state checkpoints."""

DISTRIBUTED_ITEM = "savegame.distributed"
"""The layout item of checkpoints written by several ranks (see :mod:`savegame.distributed`)."""
_MAX_RESUME_ROUNDS = 1000
"""Re-listings ``restore`` makes while retention deletes the checkpoints it was about to read."""


def fetch_from_mirror(ckpt: Checkpointer) -> None:
    """Bring the mirror's newest valid checkpoint here when it is newer than every local one."""
    if ckpt._mirror is None:
        return
    ckpt._mirror_verified = None
    try:
        ckpt._mirror.restore_newest(verify=ckpt.verify)
        ckpt._mirror_verified = ckpt._mirror.verified
    except (CheckpointError, OSError) as exc:
        log.warning("Checkpointer(%s): could not look at the mirror %s: %s", ckpt.directory, ckpt._mirror, exc)
    ckpt._refresh()


def already_verified(ckpt: Checkpointer, name: str, manifest: Manifest) -> bool:
    """Whether the mirror's ``restore_newest`` just verified every file of checkpoint ``name`` with
    exactly this ``manifest`` (resume then does not hash them a second time). Asked once per resume."""
    verified, ckpt._mirror_verified = ckpt._mirror_verified, None
    return verified == (name, manifest)


def pick_for_resume(ckpt: Checkpointer) -> dict[str, Any]:
    """Rank 0's choice of the checkpoint all ranks resume from: the newest that verifies (broken
    ones quarantined on the way). JSON, as it is broadcast: ``{"name": ..., "quarantined": [...]}``."""
    fetch_from_mirror(ckpt)
    refuse_newer_formats(ckpt)
    warn_manifestless(ckpt)
    quarantined: builtins.list[str] = []
    for name, exc in builtins.list(ckpt._index.unreadable.items()):
        if isinstance(exc, CorruptCheckpointError):
            quarantined.append(quarantine(ckpt, name, exc))
    for entry in reversed(ckpt._index.ordered()):
        try:
            manifest = api.read_manifest(ckpt._ref(entry.name))
            if ckpt.verify and not already_verified(ckpt, entry.name, manifest):
                api.verify(ckpt._ref(entry.name))
        except CorruptCheckpointError as exc:
            quarantined.append(quarantine(ckpt, entry.name, exc))
            continue
        return {"name": entry.name, "quarantined": quarantined}
    return {"name": None, "quarantined": quarantined}


def refuse_newer_formats(ckpt: Checkpointer) -> None:
    """Raise :class:`UnsupportedFormatError` when a checkpoint of the root was written by a newer savegame:
    it is not damaged (nothing is quarantined), and resuming an older checkpoint instead, or starting over
    when there is none, would quietly lose the training since."""
    newer = sorted(name for name, exc in ckpt._index.unreadable.items() if isinstance(exc, UnsupportedFormatError))
    if newer:
        exc = ckpt._index.unreadable[newer[0]]
        raise UnsupportedFormatError(
            f"{ckpt.directory}: checkpoint {newer[0]!r}"
            + (f" (and {len(newer) - 1} more)" if len(newer) > 1 else "")
            + f" cannot be read by this savegame ({exc}); nothing was restored, so that training does not go "
            "back to an older checkpoint or start over: upgrade savegame to resume, or move the checkpoint "
            "out of the directory to resume from the older ones"
        )


def warn_manifestless(ckpt: Checkpointer) -> None:
    """Warn about folders of a local root that hold data files (``*.safetensors``) but no ``manifest.json``:
    a checkpoint whose manifest was deleted is not a checkpoint any more and the resume passes over it, which
    should not go unsaid (it is left where it is: without its manifest nothing says what it was)."""
    if not isinstance(ckpt.storage, LocalStorage):
        return
    root = ckpt.storage.root
    try:
        with os.scandir(root) as entries:
            folders = [e.path for e in entries if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
    except OSError:
        return
    for folder in sorted(folders):
        name = os.path.basename(folder)
        if name in ckpt._index.entries or name in ckpt._index.unreadable or os.path.lexists(f"{folder}/manifest.json"):
            continue
        try:
            with os.scandir(folder) as files:
                data = any(f.name.endswith(".safetensors") for f in files)
        except OSError:
            continue
        if data:
            message = (f"{folder}: holds savegame data files but no manifest.json (deleted?), so it is not a "
                       "checkpoint and the resume passes over it; it was left as it is")  # fmt: skip
            log.warning(message)
            warn(message, ResumeWarning, stacklevel=4)


def resume_latest(
    ckpt: Checkpointer, state: Mapping[str, Any], *, strict: bool, map_location: Any
) -> RestoredProgress | None:
    """``restore(state)``: the newest checkpoint that loads (see the module docstring), or None."""
    if ckpt.restart == "off":
        log.info("restart='off': not resuming from %s", ckpt.directory)
        return None
    if ckpt._coord.distributed:
        return resume_together(ckpt, state, strict=strict, map_location=map_location)
    fetch_from_mirror(ckpt)
    refuse_newer_formats(ckpt)
    warn_manifestless(ckpt)
    quarantined: builtins.list[str] = []
    for name, exc in builtins.list(ckpt._index.unreadable.items()):
        if isinstance(exc, CorruptCheckpointError):
            quarantined.append(quarantine(ckpt, name, exc))
    tried: set[str] = set(quarantined)
    empty = 0
    for _ in range(_MAX_RESUME_ROUNDS):
        restored = resume_newest(ckpt, state, tried, quarantined, strict=strict, map_location=map_location)
        if restored is not None:
            if restored.run is not None and not ckpt._saved_here:
                ckpt.run_id = restored.run  # resumed an older run (the newer ones were damaged)
                ckpt._best = ckpt._resolve_best()
            return restored.progress
        ckpt._refresh()  # a writer may have committed newer checkpoints meanwhile: look again
        if all(name in tried for name in ckpt._index.entries):
            if ckpt._index.entries or empty >= 2:
                break
            empty += 1  # nothing listed: once more, 10 ms later (a listing overtaken by a writer)
            time.sleep(0.01)
            ckpt._refresh()
    else:
        raise CheckpointError(
            f"{ckpt.directory}: the checkpoints were deleted faster than they could be read "
            f"({_MAX_RESUME_ROUNDS} attempts); is a writer's keep_last too small for its save rate?"
        )
    nothing_to_resume(ckpt, quarantined)
    return None


def resume_newest(
    ckpt: Checkpointer, state: Mapping[str, Any], tried: set[str], quarantined: builtins.list[str], *, strict: bool,
    map_location: Any,
) -> Resumed | None:  # fmt: skip
    """Load the newest listed checkpoint not in ``tried`` that loads (damaged ones quarantined and
    the next older one tried); None when none is left or one was deleted by a writer's retention
    while being read -- not damage: the caller lists the directory again."""
    for entry in reversed(ckpt._index.ordered()):
        if entry.name in tried:
            continue
        tried.add(entry.name)
        try:
            progress = load_entry(ckpt, entry, state, strict=strict, map_location=map_location,
                                  quarantined=tuple(quarantined))  # fmt: skip
        except (CorruptCheckpointError, NotACheckpointError, CheckpointNotFoundError, StorageError, OSError) as exc:
            if not ckpt.storage.exists(entry.name):
                log.info("checkpoint %s was deleted (by retention) while being restored; looking again", entry.name)
                ckpt._index.note_gone(entry.name)
                return None
            if not isinstance(exc, CorruptCheckpointError):
                raise
            quarantined.append(quarantine(ckpt, entry.name, exc))
            continue
        return Resumed(progress, entry.run)
    return None


def nothing_to_resume(ckpt: Checkpointer, quarantined: builtins.list[str]) -> None:
    """Raise (``restart="required"``) or log that training starts fresh."""
    detail = f" ({len(quarantined)} damaged checkpoint(s) quarantined)" if quarantined else ""
    if ckpt.restart == "required":
        raise CheckpointNotFoundError(
            f"{ckpt.directory}: restart='required' but there is no valid checkpoint{detail}"
        )
    log.info("no checkpoint to resume from in %s%s: starting fresh", ckpt.directory, detail)


def resume_together(
    ckpt: Checkpointer, state: Mapping[str, Any], *, strict: bool, map_location: Any
) -> RestoredProgress | None:
    """Resume in a process group: rank 0 picks (and verifies), every rank loads the same one."""
    choice = ckpt._coord.on_coordinator(lambda: pick_for_resume(ckpt))
    ckpt._refresh()
    quarantined = [str(q) for q in choice["quarantined"]]
    name = choice["name"]
    if name is None:
        nothing_to_resume(ckpt, quarantined)
        return None
    entry = ckpt._index.entries.get(str(name))
    if entry is None:
        raise CheckpointError(f"{ckpt.directory}: rank 0 resumes from {name!r}, which this rank cannot read")
    return load_entry(ckpt, entry, state, strict=strict, map_location=map_location,
                      quarantined=tuple(quarantined), verify=False)  # fmt: skip


def _owns(ckpt: Checkpointer) -> bool:
    """Whether ``ckpt`` may move damaged checkpoints aside: it (or this process) holds the writer lock."""
    return ckpt._owner or (ckpt.local and process_holds(ckpt.directory))


def quarantine(ckpt: Checkpointer, name: str, exc: Exception) -> str:
    """Move a damaged checkpoint aside (never delete it), warn and log; return its old name.

    A Checkpointer without the writer lock (``lock=False``, in a process that does not hold the lock
    otherwise) does not own the directory and leaves the checkpoint where it is: it only warns and
    skips it."""
    if not _owns(ckpt):
        message = (f"checkpoint {name} in {ckpt.directory} is damaged and was skipped (left in place: "
                   f"this Checkpointer has lock=False and does not own the directory): {exc}")  # fmt: skip
        log.warning(message)
        warn(message, ResumeWarning, stacklevel=4)
        ckpt._index.note_gone(name)
        ckpt._events.emit("on_quarantined", QuarantinedInfo(name, None, str(exc)), log_line=False)
        return name
    moved_to: str | None = None
    try:
        moved = moved_to = ckpt.storage.quarantine(name)
    except (CheckpointError, OSError) as err:
        moved = f"(could not quarantine: {err})"
    message = f"checkpoint {name} in {ckpt.directory} is damaged and was moved to {moved}: {exc}"
    log.warning(message)
    warn(message, ResumeWarning, stacklevel=4)
    ckpt._index.note_gone(name)
    ckpt._events.emit("on_quarantined", QuarantinedInfo(name, moved_to, str(exc)), log_line=False)
    return name


def load_entry(
    ckpt: Checkpointer, entry: IndexEntry, state: Mapping[str, Any], *, strict: bool, map_location: Any,
    quarantined: tuple[str, ...], verify: bool | None = None,
) -> RestoredProgress:  # fmt: skip
    path = ckpt.storage.path(entry.name)
    source = ckpt._ref(entry.name)
    verifying = ckpt.verify if verify is None else verify
    manifest = api.read_manifest(source)
    if already_verified(ckpt, entry.name, manifest):
        verifying = False  # the mirror hashed every file of this manifest moments ago
    layout = DISTRIBUTED_ITEM in manifest.items
    if layout or ckpt._coord.distributed:
        from savegame.distributed import item_names

        saved = item_names(manifest)
    else:
        saved = set(manifest.items)
    target = dict(state)  # a copy: the RNG item may be added; plain items are copied back below
    if ckpt.rng and RNG_ITEM in saved and RNG_ITEM not in state:
        target[RNG_ITEM] = RNGState()
    if verifying and (layout or ckpt._coord.distributed):
        api.verify(source)
    elif verifying:  # one pass over each file: load checks the files it reads, before restoring anything
        read_by_load = {f for k in target if k in manifest.items for f in manifest.items[k].files}
        api.verify_files(source, manifest, [f for f in manifest.files if f not in read_by_load])
    # a None item is a placeholder ("read it if it was saved"): absent, it stays None, as asked
    target = {k: v for k, v in target.items() if k in saved or v is not None}
    absent = [k for k in target if k not in saved]
    if absent and (entry.weights_only or not strict):
        message = f"checkpoint {entry.name} has no items {absent}; they were not restored"
        log.warning(message)
        warn(message, ResumeWarning, stacklevel=4)
        target = {k: v for k, v in target.items() if k in saved}
    elif absent:
        raise StateMismatchError(
            f"checkpoint {entry.name} has no items {absent} (it has {sorted(saved)}); "
            "pass strict=False to restore the rest"
        )
    if layout or ckpt._coord.distributed:
        report = load_distributed(ckpt, source, target, strict=strict, map_location=map_location)
        for key, value in report.state.items():  # top-level plain values come back, not replaced
            if key in target and replaceable(target[key]):
                target[key] = value
    else:  # plain items are filled in place or replaced in target (see savegame.load)
        report = api.load(source, target, strict=strict, verify=verifying, map_location=map_location)
    if isinstance(state, MutableMapping):
        for key in state:
            if key in target and target[key] is not state[key]:
                state[key] = target[key]  # a plain value replaced (``state["epoch"]``)
    # the plain values of the state's items, then the plain items of the checkpoint it did not name
    data = {k: report.state[k] for k in state if k in report.state and k in target}
    data.update({k: v for k, v in report.state.items() if k not in state and k not in target})
    progress = entry_from_manifest(entry.name, manifest)
    warn_if_data_position_lost(entry.name, progress.progress(), state, report.state)
    ckpt._last_saved = progress.progress()
    ckpt._saved_here = False
    return RestoredProgress(
        name=entry.name, path=path, epoch=progress.epoch, step=progress.step,
        metrics=progress.metrics, data=MappingProxyType(data), quarantined=quarantined,
    )  # fmt: skip


def announce_restore(ckpt: Checkpointer, restored: RestoredProgress, seconds: float) -> None:
    """Emit ``on_restored`` (and its log line) and say on stderr what training resumes from, unless the
    Checkpointer is ``quiet`` (one line, rank 0 only, the name's control characters escaped): a resume
    is visible without logging set up."""
    ckpt._events.emit("on_restored", RestoredInfo(
        restored.name, restored.path, restored.epoch, restored.step, seconds, restored.quarantined))  # fmt: skip
    if ckpt.quiet or not ckpt._coord.is_coordinator:
        return
    where = [f"{what} {value}" for what, value in (("epoch", restored.epoch), ("step", restored.step))
             if value is not None]  # fmt: skip
    line = f"savegame: resumed from {escape_controls(restored.name)}" + (f" ({', '.join(where)})" if where else "")
    if restored.quarantined:
        done = "quarantined" if _owns(ckpt) else "skipped (left in place: lock=False)"
        line += f"; {len(restored.quarantined)} damaged checkpoint(s) {done}"
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr closed: the log line above still says it
        pass


def load_distributed(
    ckpt: Checkpointer, path: str | CheckpointRef, target: Mapping[str, Any], *, strict: bool, map_location: Any
) -> Any:
    """Restore a checkpoint written by several ranks (or restore on several ranks): every rank
    its own per-rank items, sharded items resharded to this job's layout. ``path``: what
    :meth:`_ref` gives (a local path, or a reference that reads through this Checkpointer's configured
    storage: a remote root's credentials live in its storage_options)."""
    from savegame import distributed as sgd
    from savegame.run.coordination import Ranks

    context = ckpt._coord.context if isinstance(ckpt._coord, Ranks) else sgd.RankContext()
    return sgd.load_state(path, target, strict=strict, verify=False, map_location=map_location, context=context)


def entry_named(ckpt: Checkpointer, which: str) -> IndexEntry:
    """The checkpoint ``restore(state, which)`` loads for ``"best"`` (this run's best) or a name;
    :class:`CheckpointNotFoundError` saying why there is none, the verification error for a damaged one."""
    if which == "best":
        run = ckpt._index.run_entries(ckpt.run_id, or_newest=True)
        ckpt._index.check_best_readable(ckpt.monitor, ckpt.mode, entries=run)
        if ckpt._best is None or ckpt._best.name not in ckpt._index.entries:
            if not ckpt.monitor:
                why = " (no monitor= was given, so nothing is ranked)"
            elif ckpt.restart == "off":
                why = (" of this run (restart='off' started a new run, which has none yet; an earlier run's "
                       "checkpoints load by name)")  # fmt: skip
            else:
                why = ""
            raise CheckpointNotFoundError(f"{ckpt.directory}: no best checkpoint{why}")
        return ckpt._index.entries[ckpt._best.name]
    else:
        if which in ckpt._index.unreadable:  # there but damaged: its error, not "not found"
            ckpt._index.note_committed(which, api.read_manifest(ckpt._ref(which)))
        entry_or_none = ckpt._index.entries.get(which)
        if entry_or_none is None:
            raise CheckpointNotFoundError(f"{ckpt.directory}: no committed checkpoint named {which!r}")
        return entry_or_none


def restore_named(
    ckpt: Checkpointer, which: str, state: Mapping[str, Any], *, strict: bool, map_location: Any
) -> RestoredProgress:
    """``restore(state, "best" | NAME)``: exactly that checkpoint (:class:`CheckpointNotFoundError` if
    absent, the verification error if damaged). In a process group rank 0 verifies, then every rank loads."""
    entry = entry_named(ckpt, which)
    if ckpt._coord.distributed and ckpt.verify:  # rank 0 checks; a damaged file raises on every rank
        ckpt._coord.on_coordinator(lambda: api.verify(ckpt._ref(entry.name)) and None)
        return load_entry(ckpt, entry, state, strict=strict, map_location=map_location, quarantined=(), verify=False)
    return load_entry(ckpt, entry, state, strict=strict, map_location=map_location, quarantined=())


_warned_data_position = False


POSITION_KEYS = frozenset({"batch", "batches", "batch_idx", "batch_index", "batches_seen", "iteration", "position"})
"""Names of a plain value that records where the loop is in the epoch (a top-level item, or a key of a
plain dict item such as ``{"epoch": 3, "batches_seen": 120}``): a loop that saves one skips itself."""


def warn_if_data_position_lost(
    name: str, progress: Progress, state: Mapping[str, Any], restored: Mapping[str, Any]
) -> None:
    """Warn once per process (:class:`ResumeWarning`) when a PyTorch training state is resumed from a
    checkpoint saved mid-epoch but nothing in it carries the data position: the loop's ``DataLoader``
    would start the epoch again from its first batch (replaying what was trained on, and stepping a
    per-batch scheduler past its end), which is silently wrong.

    The position counts as carried by an item that is a resumable loader or a sampler with state
    (``adapters.dataloader.holds_data_position``), or by a plain value named in :data:`POSITION_KEYS`
    (``restored``: the plain values the checkpoint gave back; accelerate's ``position`` item, a loop's
    own ``batch_idx``). Not for states without a torch module or optimizer (the Keras callbacks skip the
    consumed batches themselves)."""
    global _warned_data_position
    torch = torch_if_imported()
    if _warned_data_position or progress.epoch_end or torch is None:
        return
    if not any(isinstance(v, (torch.nn.Module, torch.optim.Optimizer)) for v in state.values()):
        return
    from savegame.adapters.dataloader import holds_data_position

    if any(holds_data_position(v) for v in state.values()) or _records_position(restored):
        return
    _warned_data_position = True
    where = ", ".join(f"{k} {v}" for k, v in (("epoch", progress.epoch), ("step", progress.step)) if v is not None)
    message = (
        f"checkpoint {name} was saved mid-epoch ({where}), but the state has no data position: a plain "
        "DataLoader starts the epoch again from its first batch. Wrap the loader once, "
        "loader = savegame.data.resumable(loader), and put it in the state (state['loader'] = loader) to "
        "resume at the next unseen batch; if the loop skips the consumed batches itself, ignore this warning"
    )
    log.warning(message)
    warn(message, ResumeWarning, stacklevel=4)


def _records_position(values: Mapping[str, Any]) -> bool:
    """Whether a plain item (or a key of a plain dict item) is named like a batch position."""
    return any(
        key in POSITION_KEYS or (isinstance(value, Mapping) and any(k in POSITION_KEYS for k in value))
        for key, value in values.items()
    )
