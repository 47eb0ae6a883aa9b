"""The Checkpointer's save paths: what to write (the state's items, the RNGs), the new best, and the
three ways to write it -- synchronously (:func:`savegame.api.write_items`), in the background
(:func:`savegame.engine.writer.save_in_background`, settled by :func:`settle` at the next save, ``wait()``,
``restore``, ``close()`` or interpreter exit) and from every rank of a process group
(:func:`savegame.distributed.write_state`) -- each committing under the next free name should another
writer take the name meanwhile (:class:`savegame.run.save_naming.SaveNaming`), then updating the
Checkpointer's view and applying retention (:mod:`savegame.run.retention`).

The functions take the :class:`~savegame.run.checkpointer.Checkpointer` they save for (its settings,
storage, :class:`~savegame.run.index.RunIndex`, coordinator, background writer and mirror); moved here
verbatim from its methods.
"""

from __future__ import annotations

import builtins
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from savegame import api
from savegame._util.logs import get_logger
from savegame.adapters import is_model_weights
from savegame.adapters.rng import RNGState
from savegame.engine.background import BackgroundWriter, PendingSave, close_at_exit
from savegame.engine.writer import save_in_background
from savegame.errors import BackgroundSaveError, ConfigError
from savegame.format.manifest import Manifest
from savegame.policies import Progress, SaveContext, is_better
from savegame.policies.autointerval import record_save_cost
from savegame.policies.knob_policies import find_improvement
from savegame.policies.values import missing_monitor_message
from savegame.run.events import SaveCommittedInfo, SaveFailedInfo, SaveStartedInfo, frozen_metrics
from savegame.run.incremental import incremental_for
from savegame.run.index import RecordedBest
from savegame.run.records import SaveResult, progress_json
from savegame.run.resume import RNG_ITEM
from savegame.run.retention import retain
from savegame.run.save_naming import SaveNaming, name_for, renamed

if TYPE_CHECKING:
    from savegame.run.checkpointer import Checkpointer

__all__ = ["InFlight", "already_saved", "busy", "save_state", "settle", "skipped"]

log = get_logger("savegame.run.checkpointer")


@dataclass(frozen=True)
class InFlight:
    """A background save submitted but not yet integrated (entries, best, retention, its events)."""

    naming: SaveNaming
    handle: PendingSave
    progress: Progress | None = None
    started: float = 0.0
    """``time.perf_counter()`` when the save call began."""
    blocking: float = 0.0
    """How long the save call blocked training."""

    @property
    def name(self) -> str:
        """The name it is committed under (read once the handle is done)."""
        return self.naming.name


def already_saved(ckpt: Checkpointer, progress: Progress) -> bool:
    """True when this process's last save was at the same epoch and step (no duplicate end save)."""
    last = ckpt._last_saved
    if not ckpt._saved_here or last is None:
        return False
    if progress.epoch is None and progress.step is None:
        return False
    return last.epoch == progress.epoch and last.step == progress.step

def items_to_save(ckpt: Checkpointer, state: Mapping[str, Any]) -> dict[str, Any]:
    """The items to write: the whole state plus the RNGs, or only the modules for weights_only."""
    if not isinstance(state, Mapping):
        raise ConfigError(f"state must be a dict of items (e.g. {{'model': model}}), not {type(state).__name__}")
    if ckpt.weights_only:
        items = {k: v for k, v in state.items() if is_model_weights(v)}
        if not items:
            raise ConfigError(
                "weights_only=True but the state has no torch.nn.Module item to take weights from"
            )
        return items
    items = dict(state)
    if ckpt.rng and RNG_ITEM not in items:
        items[RNG_ITEM] = RNGState()
    return items

def new_best(ckpt: Checkpointer, progress: Progress, name: str) -> RecordedBest | None:
    """The best after saving ``progress`` as ``name`` (this one if it improves on the old best)."""
    if ckpt.monitor is None or ckpt.mode is None:
        return None
    value = progress.metrics.get(ckpt.monitor)
    current = ckpt._best
    if value is not None:
        reference = current.value if current is not None else ckpt.threshold
        if is_better(value, reference, ckpt.mode, ckpt.min_delta):
            return RecordedBest(ckpt.monitor, ckpt.mode, float(value), name, progress.epoch, progress.step)
    return current

@dataclass
class _Attempt:
    """How far a save got, for its failure event: settled the previous one, named."""

    settled: bool = False
    name: str | None = None
    path: str | None = None


def save_state(
    ckpt: Checkpointer, state: Mapping[str, Any], progress: Progress, *, name: str | None,
    metadata: Mapping[str, Any] | None, pin: bool,
) -> SaveResult:  # fmt: skip
    """Save ``state`` at ``progress`` (sync, background or from every rank); a save that fails once the
    previous background save was settled (whose own failure :func:`settle` reports) emits
    ``on_save_failed`` and raises."""
    attempt = _Attempt()
    try:
        return _save_state(ckpt, state, progress, name=name, metadata=metadata, pin=pin, attempt=attempt)
    except Exception as exc:
        if attempt.settled:
            ckpt._events.emit("on_save_failed", SaveFailedInfo(
                attempt.name, attempt.path, progress.epoch, progress.step, exc, ckpt.background))  # fmt: skip
        raise


def _save_state(
    ckpt: Checkpointer, state: Mapping[str, Any], progress: Progress, *, name: str | None,
    metadata: Mapping[str, Any] | None, pin: bool, attempt: _Attempt,
) -> SaveResult:  # fmt: skip
    started = time.perf_counter()
    started_wall, started_mono = time.time(), time.monotonic()
    settle(ckpt)
    attempt.settled = True
    ckpt._clean_up()
    items = items_to_save(ckpt, state)
    distributed = ckpt._coord.distributed
    encoded = None if ckpt.background or distributed else api.encode_state(items)
    ckpt._refresh()
    sequence = ckpt._index.max_sequence + 1
    base = name_for(ckpt.template, progress, sequence, name)
    meta = {**ckpt.metadata, **dict(metadata or {})}
    naming = SaveNaming.start(base, ckpt._index.names())
    best = new_best(ckpt, progress, naming.name)
    attempt.name, attempt.path = naming.name, ckpt.storage.path(naming.name)
    ckpt._events.emit("on_save_started", SaveStartedInfo(
        naming.name, attempt.path, progress.epoch, progress.step, encoded is None and not distributed))  # fmt: skip
    ckpt._run_clock.begin(ckpt._run_entries())
    timing = ckpt._run_clock.record(started_wall=started_wall, started_mono=started_mono, blocking=None)
    naming.payload = lambda n: progress_json(
        progress, sequence=sequence, run=ckpt.run_id, weights_only=ckpt.weights_only,
        best=renamed(best, naming.first, n), name=n, pin=pin, timing=timing,
    )  # fmt: skip
    payload = naming.payload(naming.name)
    if encoded is None and not distributed:
        return submit(ckpt, naming, items, meta, payload, progress, best, started, timing)
    if encoded is None:
        path, manifest = write_distributed(ckpt, naming, items, meta, payload)
        final_name = os.path.basename(path.rstrip("/"))  # rank 0's name
    else:
        path, manifest = api.write_items(
            ckpt.storage, naming.name, encoded, metadata=meta, progress=payload, overwrite=False,
            next_name=naming.next, incremental=incremental_for(ckpt),
        )  # fmt: skip
        final_name = naming.name
    durable = time.perf_counter() - started
    committed(ckpt, final_name, manifest)
    ckpt._last_saved = progress
    ckpt._saved_here = True
    deleted = retain(ckpt)
    is_best = ckpt._best is not None and ckpt._best.name == final_name
    seconds = time.perf_counter() - started
    record_save_cost(ckpt.save_policy, seconds)
    ckpt._run_clock.finished(seconds)
    ckpt._events.emit("on_save_committed", committed_info(
        final_name, path, progress, manifest, blocking=seconds, durable=durable, is_best=is_best, background=False))
    return SaveResult(
        name=final_name, path=path, epoch=progress.epoch, step=progress.step,
        metrics=MappingProxyType(dict(progress.metrics)), is_best=is_best,
        size=manifest.total_bytes, seconds=seconds, deleted=tuple(deleted),
    )  # fmt: skip

def write_distributed(
    ckpt: Checkpointer, naming: SaveNaming, items: Mapping[str, Any], metadata: Mapping[str, Any],
    payload: Mapping[str, Any],
) -> tuple[str, Manifest]:
    """Write ``items`` from every rank as one checkpoint (rank 0's name and progress count)."""
    from savegame import distributed as sgd
    from savegame.run.coordination import Ranks

    assert isinstance(ckpt._coord, Ranks)
    return sgd.write_state(
        ckpt.storage, naming.name, items, metadata=metadata, progress=payload, overwrite=False,
        per_rank=ckpt.per_rank, context=ckpt._coord.context, next_name=naming.next,
    )  # fmt: skip

def committed_info(
    name: str, path: str, progress: Progress, manifest: Manifest, *, blocking: float, durable: float,
    is_best: bool, background: bool,
) -> SaveCommittedInfo:  # fmt: skip
    """The ``on_save_committed`` info of a save (throughput: the bytes written over the durable time; the
    files an incremental save linked were not written)."""
    size = manifest.total_bytes
    linked = manifest.linked_bytes
    return SaveCommittedInfo(
        name=name, path=path, epoch=progress.epoch, step=progress.step, metrics=frozen_metrics(progress.metrics),
        bytes=size, blocking_seconds=blocking, durable_seconds=durable,
        throughput=(size - linked) / max(durable, 1e-9), is_best=is_best, background=background, linked_bytes=linked,
    )  # fmt: skip


def committed(ckpt: Checkpointer, name: str, manifest: Manifest) -> None:
    """Record a committed checkpoint in the cache, recompute the best, wake the mirror."""
    ckpt._index.note_committed(name, manifest)
    ckpt._best = ckpt._resolve_best()
    if ckpt._mirror is not None:
        ckpt._mirror.notify()


def submit(
    ckpt: Checkpointer, naming: SaveNaming, items: Mapping[str, Any], metadata: Mapping[str, Any],
    payload: Mapping[str, Any],
    progress: Progress, best: RecordedBest | None, started: float, timing: dict[str, Any],
) -> SaveResult:  # fmt: skip
    """Start a background save (snapshot now, write later); the Checkpointer's view is updated
    optimistically (last save, best) and corrected from the directory if the save fails, or when
    another writer took its name meanwhile (then it is committed under the next free one, as a
    sync save is). The progress recorded says how long the save blocked (``timing``, filled in once
    the snapshot is taken)."""
    if ckpt._writer is None:
        ckpt._writer = BackgroundWriter(
            name=f"savegame-writer:{os.path.basename(ckpt.directory)}", nice=ckpt.writer_nice
        )
    name = naming.name

    def stamp() -> dict[str, Any]:
        timing["blocking"] = time.perf_counter() - started
        return naming.payload(naming.name)

    handle = save_in_background(
        ckpt._writer, ckpt.storage, name, items, metadata=metadata, progress=payload, overwrite=False,
        next_name=naming.next, stamp=stamp, incremental=incremental_for(ckpt),
        snapshot="eager" if progress.final else ckpt.snapshot,  # no step follows the final save
        write_rate=None if ckpt.write_rate is None else ckpt.write_rate * 1e6,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    ckpt._in_flight = InFlight(naming, handle, progress, started, seconds)
    _settle_at_exit(ckpt)
    ckpt._index.max_sequence = max(ckpt._index.max_sequence, int(payload["sequence"]))
    ckpt._last_saved = progress
    ckpt._saved_here = True
    ckpt._best = best
    record_save_cost(ckpt.save_policy, handle.blocking_seconds)
    ckpt._run_clock.finished(seconds)
    return SaveResult(
        name=name, path=ckpt.storage.path(name), epoch=progress.epoch, step=progress.step,
        metrics=MappingProxyType(dict(progress.metrics)), is_best=best is not None and best.name == name,
        size=None, seconds=seconds, pending=handle,
    )  # fmt: skip

def busy(ckpt: Checkpointer) -> bool:
    """Whether a background save is still being written (submitted, its commit not done yet); a lazy
    snapshot whose copies are done is confirmed first (:meth:`PendingSave.poll`)."""
    in_flight = ckpt._in_flight
    return in_flight is not None and not in_flight.handle.poll()


def skipped(ckpt: Checkpointer, progress: Progress) -> SaveResult:
    """A save ``step`` wanted while one was in flight, coalesced into it (``if_busy="skip"``).

    Nothing is written and nothing of the Checkpointer's view changes: the last save (what the save
    policy counts from), the best and the run's sequence stay those of the saves that were made, so
    the next ``step`` after the save in flight committed saves again. The result names the save in
    flight (its handle in ``pending``) and says ``skipped=True``."""
    in_flight = ckpt._in_flight
    assert in_flight is not None
    ckpt.skipped_saves += 1
    log.debug("save at epoch %s step %s skipped: %s is still being written", progress.epoch, progress.step,
              in_flight.name)  # fmt: skip
    return SaveResult(
        name=in_flight.name, path=ckpt.storage.path(in_flight.name), epoch=progress.epoch, step=progress.step,
        metrics=MappingProxyType(dict(progress.metrics)), is_best=False, size=None, seconds=0.0,
        pending=in_flight.handle, skipped=True,
    )  # fmt: skip


def settle(ckpt: Checkpointer) -> builtins.list[str]:
    """Wait for the background save in flight, integrate it and apply retention; return deletions.

    A failed background save raises :class:`BackgroundSaveError` here, after the Checkpointer's
    view (newest, best) was re-read from the directory.
    """
    in_flight, ckpt._in_flight = ckpt._in_flight, None
    _unsettled.discard(ckpt)
    if in_flight is None:
        return []
    seen = in_flight.handle.delivered  # the caller already got the error from the handle
    try:
        manifest = in_flight.handle.result()
    except BackgroundSaveError as exc:
        progress = in_flight.progress
        ckpt._events.emit("on_save_failed", SaveFailedInfo(
            in_flight.name, ckpt.storage.path(in_flight.name), progress.epoch if progress else None,
            progress.step if progress else None, exc, True))  # fmt: skip
        ckpt._refresh()
        newest = ckpt._index.latest
        ckpt._last_saved = newest.progress() if newest is not None else None
        ckpt._saved_here = False
        if seen:
            return []
        raise
    committed(ckpt, in_flight.name, manifest)
    deleted = retain(ckpt)
    if in_flight.progress is not None:
        finished = in_flight.handle.finished_at or time.perf_counter()
        is_best = ckpt._best is not None and ckpt._best.name == in_flight.name
        ckpt._events.emit("on_save_committed", committed_info(
            in_flight.name, ckpt.storage.path(in_flight.name), in_flight.progress, manifest,
            blocking=in_flight.blocking, durable=finished - in_flight.started, is_best=is_best, background=True,
        ))  # fmt: skip
    return deleted


_unsettled: set[Checkpointer] = set()
_unsettled_hook = False


def _settle_at_exit(checkpointer: Checkpointer) -> None:
    """Close ``checkpointer`` at interpreter exit if its background save was never settled.

    The background writer finishes the save in flight at exit by itself; closing the Checkpointer then
    also integrates it (retention once it is committed, the mirror's upload, the lock given back), as
    ``close()``, ``wait()`` or the next save would have. The reference held here (until the save is
    settled) keeps a Checkpointer that went out of scope with a save in flight alive for that.
    """
    global _unsettled_hook
    _unsettled.add(checkpointer)
    if not _unsettled_hook:
        _unsettled_hook = True
        close_at_exit(_close_unsettled)


def _close_unsettled() -> None:
    for checkpointer in list(_unsettled):
        if checkpointer._closed:
            continue
        log.info("Checkpointer(%s) was not closed: closing it at exit", checkpointer.directory)
        try:
            checkpointer.close()
        except Exception as exc:  # no caller is left to raise to: say it, and close the others
            try:
                print(f"savegame: closing Checkpointer({checkpointer.directory}) at exit: {exc}",
                      file=sys.stderr, flush=True)
            except (OSError, ValueError):
                pass


def _forget_unsettled_after_fork() -> None:
    """A forked child does not own its parent's Checkpointers: never close them at the child's exit."""
    _unsettled.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_unsettled_after_fork)


def check_monitor_passed(monitor: str | None, progress: Progress) -> None:
    """:class:`ConfigError` for an explicit ``save`` at an epoch end whose ``metrics`` lack the monitored
    one: a typo in ``monitor`` (or in the key) would track no best, and retention would delete the real
    one (``step`` raises the same). A save without metrics, or inside an epoch, is not judged."""
    if monitor is not None and progress.epoch_end and progress.metrics and monitor not in progress.metrics:
        raise ConfigError("Checkpointer.save: " + missing_monitor_message(monitor, progress.metrics))


def policy_wants_save(ckpt: Checkpointer, progress: Progress, *, said_epoch_end: bool) -> bool:
    """Whether ``step`` saves at ``progress``: the save policy's answer (not twice for the final call).

    With an improvement policy, a call that carried the monitored metric judges improvement (an epoch
    whose calls never did warns once, :class:`~savegame.run.checks.UnjudgedEpochs`); an explicit
    ``epoch_end=True`` without it raises :class:`ConfigError`."""
    monitored = find_improvement(ckpt.save_policy)
    if monitored is not None and progress.epoch is not None:
        ckpt._unjudged.note(progress.epoch, judged=monitored.monitor in progress.metrics, monitor=monitored.monitor)
    if monitored is not None and said_epoch_end and monitored.monitor not in progress.metrics:
        raise ConfigError(
            "Checkpointer.step(epoch_end=True): " + missing_monitor_message(monitored.monitor, progress.metrics)
        )
    context = SaveContext(
        last_saved=ckpt._last_saved, best=ckpt._best.value if ckpt._best is not None else None, started=ckpt._started
    )
    return ckpt.save_policy.should_save(progress, context) and not (progress.final and already_saved(ckpt, progress))
