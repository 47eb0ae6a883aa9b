"""The Checkpointer: when to save, what to keep, which one is best, and where to resume from.

A training loop hands the Checkpointer its state and where it is (epoch, step, metrics); the
Checkpointer asks its :class:`~savegame.policies.SavePolicy` whether to save, names the checkpoint from
a template, writes it atomically into its directory, records progress and the best checkpoint so far in
the manifest, then lets its :class:`~savegame.policies.KeepPolicy` thin out older checkpoints. After a
crash, ``restore`` loads the newest checkpoint that passes verification (quarantining broken ones) and
returns the progress so the loop continues where it stopped::

    ckpt = Checkpointer("runs/exp", monitor="val_loss", every_n_epochs=1, keep_last=3)
    state = {"model": model, "optimizer": opt, "sampler": sampler}
    restored = ckpt.restore(state)                       # None on a fresh start
    start = restored.epoch if restored else 0
    for epoch in range(start, num_epochs):
        train_one_epoch(...)
        ckpt.step(state, epoch=epoch + 1, step=global_step, metrics={"val_loss": val_loss},
                  final=epoch + 1 == num_epochs)

Conventions (shared with :mod:`savegame.policies`): ``epoch`` counts **completed** epochs (pass
``epoch + 1`` at the end of epoch ``epoch`` of a ``range`` loop; ``restored.epoch`` is then directly the
``range`` start), ``step`` is the global number of optimizer steps.

What each manifest's ``progress`` records (the run id, position, metrics and best) is described in
:mod:`savegame.run.records`; what retention guarantees never to delete, in :mod:`savegame.run.retention`.

This module only wires the collaborators that do those jobs (each with one home):
:mod:`savegame.policies.knob_policies` (knobs -> save/keep policies), :mod:`savegame.run.index` (what is
in the directory, best, what retention would delete), :mod:`savegame.run.saving` (the three save paths
and settling background saves), :mod:`savegame.run.save_naming` (names), :mod:`savegame.run.retention`,
:mod:`savegame.run.resume` (candidates, verify, quarantine, fallback, loading), :mod:`savegame.run.records`
(returned values, recorded progress), :mod:`savegame.run.preemption`, :mod:`savegame.run.checks`,
:mod:`savegame.run.resources` (lock, mirror, signal handlers), :mod:`savegame.run.events` (callbacks)
and :mod:`savegame.run.timing` (save timings). Their public names stay importable from here.

The constructor's keywords are checked, resolved and documented in :mod:`savegame.run.options`
(``CheckpointerOptions``; its ``KEYWORDS_REFERENCE`` ends the class docstring).
"""

from __future__ import annotations

import builtins
import os
import textwrap
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Literal

from savegame._util.logs import get_logger
from savegame.engine.background import BackgroundWriter
from savegame.engine.lazy import SnapshotMode
from savegame.errors import CheckpointError, ConfigError, CorruptCheckpointError, UnsupportedFormatError
from savegame.format.manifest import Manifest
from savegame.format.naming import NameTemplate, validate_name
from savegame.policies import KeepPolicy, Mode, Progress, SavePolicy, check_position
from savegame.policies.autointerval import DEFAULT_MTBF_SECONDS
from savegame.policies.knob_policies import AlignedSchedule, build_keep_policy, build_save_policy, coerce_metrics
from savegame.policies.knobs import Restart, preset_knobs
from savegame.run.checks import UnjudgedEpochs
from savegame.run.checks import check_run_root as check_run_root
from savegame.run.coordination import Coordinator, coordinator_for
from savegame.run.events import CallbackFailure, EventDispatcher
from savegame.run.index import ALIASES as ALIASES
from savegame.run.index import PROGRESS_VERSION as PROGRESS_VERSION
from savegame.run.index import IndexEntry, RunIndex
from savegame.run.index import RecordedBest as RecordedBest
from savegame.run.index import parse_best as parse_best
from savegame.run.index import parse_run as parse_run
from savegame.run.index import plan_deletions as plan_deletions
from savegame.run.index import progress_int as progress_int
from savegame.run.index import progress_metrics as progress_metrics
from savegame.run.index import recorded_best_names as recorded_best_names
from savegame.run.index import recorded_metrics as recorded_metrics
from savegame.run.index import unrecorded_monitor_error as unrecorded_monitor_error
from savegame.run.lock import ProcessShare
from savegame.run.options import KEYWORDS_REFERENCE, Background, CheckpointerOptions, Preemption, StorageOptions
from savegame.run.options import IfBusy as IfBusy
from savegame.run.options import SignalAction as SignalAction
from savegame.run.preemption import immediate_saves, save_for_preemption
from savegame.run.records import CheckpointRecord as CheckpointRecord
from savegame.run.records import RestoredProgress as RestoredProgress
from savegame.run.records import SaveResult as SaveResult
from savegame.run.records import new_run_id as new_run_id
from savegame.run.records import record_for
from savegame.run.resources import acquire, release
from savegame.run.resume import DISTRIBUTED_ITEM as DISTRIBUTED_ITEM
from savegame.run.resume import RNG_ITEM as RNG_ITEM
from savegame.run.resume import ResumeWarning as ResumeWarning
from savegame.run.resume import announce_restore, restore_named, resume_latest
from savegame.run.retention import prune
from savegame.run.save_naming import check_not_alias
from savegame.run.saving import InFlight, busy, check_monitor_passed, policy_wants_save, save_state, settle, skipped
from savegame.run.signals import PreemptionHandler
from savegame.run.timing import RunClock
from savegame.storage import LocalStorage, storage_for
from savegame.storage.base import CheckpointRef

__all__ = ["AlignedSchedule", "CheckpointRecord", "Checkpointer", "RestoredProgress", "ResumeWarning", "SaveResult",
           "build_keep_policy", "build_save_policy", "coerce_metrics"]  # fmt: skip

log = get_logger("savegame.run.checkpointer")


# --------------------------------------------------------------------------------------------------
# The Checkpointer


class Checkpointer:
    """Saves, thins out and restores the checkpoints of one training run in ``directory``.

    The keywords, by group, follow (their reference lives with their checks in
    :mod:`savegame.run.options`; the checked values are ``ckpt.options``). Three groups can also be
    given as one object each: ``preemption=Preemption(...)``, ``background=Background(...)`` and
    ``storage=StorageOptions(...)``; a flat keyword that contradicts its group's object is a
    :class:`ConfigError`.
    """

    __doc__ = f"{__doc__}\n{textwrap.indent(KEYWORDS_REFERENCE, '    ')}"

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        save: SavePolicy | None = None,
        keep: KeepPolicy | None = None,
        monitor: str | None = None,
        mode: Mode = "auto",
        min_delta: float = 0.0,
        threshold: float | None = None,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        every_seconds: float | None = None,
        every: Literal["auto"] | None = None,
        mtbf_seconds: float = DEFAULT_MTBF_SECONDS,
        max_overhead: float = 0.05,
        save_best_only: bool = False,
        save_at_end: bool | None = None,
        skip_first_epochs: int = 0,
        keep_last: int | None = None,
        keep_best: int | None = None,
        name: str | None = None,
        weights_only: bool = False,
        rng: bool = True,
        background: bool | Background = False,
        if_busy: IfBusy = "wait",
        writer_nice: int | None = None,
        write_rate: float | None = None,
        incremental: bool = False,
        snapshot: SnapshotMode = "eager",
        restart: Restart = "auto",
        verify: bool = True,
        max_epochs: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        storage_options: Mapping[str, Any] | None = None,
        mirror: str | os.PathLike[str] | None = None,
        mirror_options: Mapping[str, Any] | None = None,
        lock: bool = True,
        save_on_signal: bool | Iterable[int | str] = False,
        signal_action: SignalAction = "exit",
        signal_exit_code: int | None = None,
        group: Any = None,
        per_rank: Collection[str] = (),
        callbacks: Iterable[object] | None = None,
        quiet: bool = False,
        preemption: Preemption | None = None,
        storage: StorageOptions | None = None,
    ) -> None:
        check_run_root(directory)
        given = dict(locals())
        del given["self"], given["directory"]
        self.options = options = CheckpointerOptions.from_keywords(given)
        """The keywords, checked (:class:`~savegame.run.options.CheckpointerOptions`)."""
        self._events = EventDispatcher.of(options.callbacks)
        self._run_clock = RunClock()
        self.quiet = bool(options.quiet)
        chosen = options.policies()
        self.monitor = chosen.monitor
        self.mode: Literal["min", "max"] | None = chosen.mode
        self.min_delta = chosen.min_delta
        self.threshold = chosen.threshold
        self.save_policy: SavePolicy = chosen.save_policy
        self.keep_policy: KeepPolicy = chosen.keep_policy
        if isinstance(options.name, str):
            check_not_alias(options.name, f"Checkpointer(name={options.name!r})")
        self.template = NameTemplate(options.name) if options.name is not None else None
        self.weights_only = bool(options.weights_only)
        self.rng = bool(options.rng)
        self.restart: Restart = options.restart
        self.verify = bool(options.verify)
        self.max_epochs = options.max_epochs
        self.background = options.background
        self.if_busy: IfBusy = options.if_busy
        self.writer_nice = options.writer_nice
        self.write_rate = options.write_rate
        self.incremental = options.incremental
        self.snapshot: SnapshotMode = options.snapshot
        self.skipped_saves = 0
        """How many saves ``step`` wanted but coalesced into the save in flight (``if_busy="skip"``)."""
        self._writer: BackgroundWriter | None = None
        self._in_flight: InFlight | None = None
        self.metadata: dict[str, Any] = dict(options.metadata or {})
        self._clock = options.clock
        self._wall_clock = options.wall_clock
        self._judge_saves = True  # False: save() takes metrics without the monitor (Keras callbacks: Keras's rules)
        self.storage = storage_for(directory, storage_options=options.storage_options)
        self.directory: str = self.storage.root
        self.local = isinstance(self.storage, LocalStorage)
        self.per_rank = tuple(options.per_rank)
        self._coord: Coordinator = coordinator_for(options.group)
        if self._coord.distributed and self.background:
            log.warning("Checkpointer: background=True is not available in a process group; saving synchronously")
            self.background = False
        self._closed = False
        self._index = RunIndex(self.storage)
        """The Checkpointer's view of its directory (told about its own commits and deletions)."""
        self._mirror_verified: tuple[str, Manifest] | None = None  # see _already_verified
        self._last_saved: Progress | None = None
        self._saved_here = False
        self._best: RecordedBest | None = None
        self.run_id = ""
        """The run this Checkpointer's saves belong to (decided once the directory was read)."""
        self._owner = bool(options.lock)
        self._cleaned = False
        self._started = self._clock()
        self._unjudged = UnjudgedEpochs()
        self.preempted: str | None = None
        """The signal whose preemption save was made (with ``signal_action="continue"``), or None."""
        self._lock: ProcessShare | None = None
        self._mirror: Any = None
        self._preemption: PreemptionHandler | None = None
        acquire(self)
        self._refresh()
        self.run_id = str(self._coord.agree(self._initial_run_id()))
        self._best = self._resolve_best()
        newest = self._index.latest
        if newest is not None and self.restart != "off":
            self._last_saved = newest.progress()

    def _clean_up(self) -> None:
        """Remove dead writers' leftovers once (the directory's owner does it at construction, a
        Checkpointer without the lock before its first save)."""
        if not self._cleaned:
            self._cleaned = True
            self._coord.on_coordinator(self.storage.cleanup)

    def _initial_run_id(self) -> str:
        """The newest checkpoint's run when resuming is allowed (``restart`` not ``"off"``), else a new run."""
        if self.restart != "off":
            ours = self._index.newest_run()
            if ours and ours[-1].run is not None:
                return ours[-1].run
        return new_run_id()

    # ----------------------------------------------------------------------------------------------
    # Presets

    @classmethod
    def preset(
        cls,
        preset: str,
        directory: str | os.PathLike[str],
        *,
        monitor: str | None = None,
        mode: Mode = "auto",
        max_epochs: int | None = None,
        name: str | None = None,
        restart: Restart = "auto",
        metadata: Mapping[str, Any] | None = None,
    ) -> Checkpointer:
        """A Checkpointer for one of the training regimes ``"short"``, ``"normal"``, ``"long"``.

        ``short`` saves once at the end; ``normal`` every epoch plus every improvement of ``monitor``,
        keeping the 10 newest and the best; ``long`` every 5 epochs or 30 minutes plus improvements,
        keeping the 20 newest, a log-spaced history and the best. See :mod:`savegame.config`.
        """
        knobs = preset_knobs(
            preset, monitor=monitor, mode=mode, max_epochs=max_epochs, restart=restart, metadata=metadata
        )
        return cls(directory, name=name, **knobs.checkpointer_kwargs())

    # ----------------------------------------------------------------------------------------------
    # Directory scan and best tracking

    def _refresh(self) -> None:
        """Sync the index with the committed checkpoints of the directory and recompute the best."""
        for name, exc in self._index.refresh().items():
            if isinstance(exc, (CorruptCheckpointError, UnsupportedFormatError)):
                log.warning("checkpoint %s: unreadable manifest, ignored: %s", name, exc)
            else:  # permissions...
                log.warning("checkpoint %s: cannot read its manifest: %s", name, exc)
        self._best = self._resolve_best()

    def _ref(self, name: str) -> str | CheckpointRef:
        """What the :mod:`savegame.api` functions read checkpoint ``name`` through: its local path, or
        a reference to it on the configured remote storage."""
        return self._index.ref(name)

    def _run_entries(self) -> builtins.list[IndexEntry]:
        """The checkpoints of the current run, oldest first, whose best this Checkpointer tracks.

        Before its first save, a Checkpointer that may resume (``restart`` not ``"off"``) takes the
        newest checkpoint's run, also when that one has no run id (written before run ids existed).
        """
        return self._index.run_entries(self.run_id, or_newest=self.restart != "off")

    def _resolve_best(self) -> RecordedBest | None:
        """The best checkpoint of the current run for the monitor (see :meth:`RunIndex.best`; with
        this Checkpointer's ``min_delta`` and ``threshold``)."""
        return self._index.best(self.monitor, self.mode, entries=self._run_entries(), min_delta=self.min_delta,
                                threshold=self.threshold)  # fmt: skip

    # ----------------------------------------------------------------------------------------------
    # Introspection

    def list(self) -> builtins.list[CheckpointRecord]:
        """The committed checkpoints of the directory, oldest first (re-reads the directory).

        A background save in flight is waited for first, so it is listed once committed.
        """
        settle(self)
        self._refresh()
        entries = self._index.ordered()
        newest = entries[-1].name if entries else None
        best = self._best.name if self._best is not None else None
        return [record_for(e, path=self.storage.path(e.name), best=best, newest=newest) for e in entries]

    @property
    def callback_failures(self) -> builtins.list[CallbackFailure]:
        """The hook calls of ``callbacks`` that raised (logged and ignored; see :mod:`savegame.events`)."""
        return builtins.list(self._events.failures)

    @property
    def latest(self) -> CheckpointRecord | None:
        """The newest committed checkpoint (not verified; ``restore`` verifies), or None."""
        records = self.list()
        return records[-1] if records else None

    @property
    def best(self) -> CheckpointRecord | None:
        """The best checkpoint by ``monitor`` (None without a monitor or before any qualifies)."""
        for record in self.list():
            if record.is_best:
                return record
        return None

    @property
    def best_value(self) -> float | None:
        """The best value of ``monitor`` so far (persisted across restarts), or None."""
        settle(self)
        self._refresh()
        return self._best.value if self._best is not None else None

    # ----------------------------------------------------------------------------------------------
    # Saving

    def _progress(
        self, epoch: int | None, step: int | None, metrics: Mapping[str, object] | None, *, epoch_end: bool, final: bool
    ) -> Progress:
        """Where training is now, as the policies see it (metrics checked, time from ``clock``)."""
        epoch = check_position("Checkpointer", "epoch", epoch)  # messages name the argument, not Progress
        step = check_position("Checkpointer", "step", step)
        return Progress(epoch=epoch, step=step, metrics=coerce_metrics(metrics), time=self._clock(),
                        epoch_end=bool(epoch_end), final=bool(final))  # fmt: skip

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"Checkpointer({self.directory!r}) is closed")

    def step(
        self,
        state: Mapping[str, Any],
        *,
        epoch: int | None = None,
        step: int | None = None,
        metrics: Mapping[str, object] | None = None,
        epoch_end: bool | None = None,
        final: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> SaveResult | None:
        """Report progress; save if the save policy says so. Returns what was saved, or None.

        ``epoch``: completed epochs (``epoch + 1`` at the end of epoch ``epoch`` of a ``range`` loop);
        ``step``: global step; ``metrics``: e.g. ``{"val_loss": 0.3}`` (numbers or 0-d tensors);
        ``epoch_end``: False for calls from inside an epoch (per-batch saves; epoch and improvement
        policies ignore those); not given, the call counts as an epoch end for the epoch policies;
        ``final``: the last call of training (``save_at_end``);
        ``metadata``: extra JSON-like data for this checkpoint's manifest.
        With ``monitor=`` (save on improvement), a call without ``metrics=`` (per batch) does not judge
        improvement (no save for it, no new best, no error); a call whose ``metrics=`` lacks the
        monitored metric, or that says ``epoch_end=True`` without it, raises :class:`ConfigError`; a
        whole epoch whose calls never carried the metric warns once (an epoch end that forgot ``metrics=``).
        A save that fails raises and leaves every existing checkpoint as it was.
        """
        self._check_open()
        if self._in_flight is not None and self._in_flight.handle.poll():
            settle(self)
        said_epoch_end = epoch_end is not None and bool(epoch_end)
        epoch_end = True if epoch_end is None else bool(epoch_end)
        if epoch_end and not final and self.max_epochs is not None and epoch is not None:
            final = epoch >= self.max_epochs
        progress = self._progress(epoch, step, metrics, epoch_end=epoch_end, final=final)
        wanted = policy_wants_save(self, progress, said_epoch_end=said_epoch_end)
        result = None
        if wanted and not progress.final and self.if_busy == "skip" and busy(self):
            result = skipped(self, progress)
        elif self._coord.agree(wanted):
            result = save_state(self, state, progress, name=None, metadata=metadata, pin=False)
        if self._preemption is not None and self._coord.any(self._preemption.requested):
            result = save_for_preemption(self, state, progress, result, metadata)
        return result

    # ----------------------------------------------------------------------------------------------
    # Preemption

    @property
    def preemption(self) -> PreemptionHandler | None:
        """The signal handler installed by ``save_on_signal`` (``.requested``, ``.signal_name``), or None."""
        return self._preemption

    @contextmanager
    def between_steps(
        self,
        state: Mapping[str, Any],
        *,
        epoch: int | None = None,
        step: int | None = None,
        metrics: Mapping[str, object] | None = None,
    ) -> Iterator[None]:
        """A region between training steps (waiting for data, evaluating) where a preemption signal saves
        ``state`` at once instead of at the next ``step``; the body must not change the state.

        Needs ``save_on_signal``; not available in a process group (a save there involves every rank).
        """
        if self._preemption is None:
            raise ConfigError("Checkpointer.between_steps needs save_on_signal=True (or a list of signals)")
        if self._coord.distributed:
            raise ConfigError("Checkpointer.between_steps is not available in a process group; use step()")
        progress = self._progress(epoch, step, metrics, epoch_end=False, final=False)

        with immediate_saves(self, state, progress):
            yield

    def save(
        self,
        state: Mapping[str, Any],
        *,
        name: str | None = None,
        epoch: int | None = None,
        step: int | None = None,
        metrics: Mapping[str, object] | None = None,
        epoch_end: bool = True,
        pin: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> SaveResult:
        """Save now, whatever the save policy says; same arguments as :meth:`step`.

        ``name``: an explicit checkpoint name (validated; ``-v1``... appended if taken) instead of the
        template. ``pin``: retention never deletes this checkpoint (and it does not count against
        ``keep_last``). Best tracking and retention apply as for policy saves.
        """
        self._check_open()
        if name is not None:
            validate_name(name)
        progress = self._progress(epoch, step, metrics, epoch_end=epoch_end, final=False)
        check_monitor_passed(self.monitor if self._judge_saves else None, progress)
        return save_state(self, state, progress, name=name, metadata=metadata, pin=pin)

    def wait(self) -> builtins.list[str]:
        """Wait for the background save in flight (if any) and run retention; return what it deleted."""
        return settle(self)

    # ----------------------------------------------------------------------------------------------
    # Retention

    def prune(self, *, dry_run: bool = True, all_runs: bool = False) -> builtins.list[str]:
        """Apply the keep policy now; return the names deleted (or that would be).

        It applies to this run's checkpoints (as retention after each save does), or with ``all_runs``
        to each run of the directory separately, checkpoints older than run ids forming one more run
        (what ``savegame prune`` does). A ``monitor`` that none of those checkpoints recorded raises
        :class:`ConfigError` (listing the metrics that are recorded) and deletes nothing. Whatever the
        policy, the newest checkpoint, each run's recorded best and pinned checkpoints are kept.
        """
        if not dry_run:
            self._check_open()
        settle(self)
        self._refresh()
        return prune(self, dry_run=dry_run, all_runs=all_runs)

    # ----------------------------------------------------------------------------------------------
    # Restoring

    def restore(
        self,
        state: Mapping[str, Any],
        which: str = "latest",
        *,
        strict: bool = True,
        map_location: Any = None,
    ) -> RestoredProgress | None:
        """Load a checkpoint into the live objects of ``state`` in place; return its progress.

        ``which="latest"`` resumes according to ``restart`` (see the class docstring): it tries the
        checkpoints newest first; one that fails verification (or whose manifest is corrupt) is
        reported with a :class:`ResumeWarning` and a log message, moved aside with
        ``storage.quarantine`` (renamed, never deleted; left in place by a Checkpointer with
        ``lock=False``) and the next older one is tried. One that another process's retention deleted
        while it was being read is not damage: the directory is listed again and the newest taken. It
        returns None when there is nothing to resume from (``restart="auto"``/``"off"``), never while a
        committed checkpoint that loads exists. Resuming continues the restored checkpoint's run.
        ``which="best"`` or a checkpoint name loads exactly that checkpoint
        (:class:`CheckpointNotFoundError` if absent, the verification error if it is damaged).

        ``state`` is updated in place as :func:`savegame.load` updates its target (the way
        ``torch.distributed.checkpoint.load`` does): live objects (modules, optimizers, schedulers,
        samplers, tensors, Stateful objects) get their state back, dicts and lists are filled in place,
        other values are replaced in ``state`` (``state["epoch"]`` is the saved epoch afterwards). The
        items that hold no live object also come back in ``RestoredProgress.data``.
        ``strict``: an item missing from the checkpoint, keys or parameters that differ, or a value of
        another type raise :class:`StateMismatchError` before any plain value is replaced (items a
        ``weights_only`` checkpoint never had are skipped with a warning; an item whose value in ``state``
        is None is a placeholder: it gets the saved value, and stays None if the checkpoint has none, with
        no error). ``map_location``: as for
        :func:`savegame.load`.

        A restore says so: ``on_restored`` of the ``callbacks``, an INFO log line and, unless ``quiet``,
        one line on stderr (``savegame: resumed from NAME (epoch 3, step 1200)``, rank 0 only).
        """
        started = time.perf_counter()
        restored = self._restore(state, which, strict=strict, map_location=map_location)
        if restored is not None:
            announce_restore(self, restored, time.perf_counter() - started)
        return restored

    def _restore(
        self, state: Mapping[str, Any], which: str, *, strict: bool, map_location: Any
    ) -> RestoredProgress | None:
        if not isinstance(state, Mapping):
            raise ConfigError(f"state must be a dict of items, not {type(state).__name__}")
        settle(self)
        self._refresh()
        if which == "latest":
            return resume_latest(self, state, strict=strict, map_location=map_location)
        return restore_named(self, which, state, strict=strict, map_location=map_location)

    # ----------------------------------------------------------------------------------------------
    # Lifetime

    def close(self) -> None:
        """Wait for a background save in flight (raising its error), then stop accepting saves.

        The save in flight is finished even when ``close`` runs after an exception or a Ctrl-C, or is
        itself interrupted (then its writer waits again; at interpreter exit at the latest, see
        :mod:`savegame.engine.background`); the mirror, the signal handlers and the lock are released however
        the wait ended.
        """
        if self._closed:
            return
        self._closed = True
        try:
            settle(self)
        finally:
            try:
                if self._writer is not None:
                    self._writer.close()
            finally:
                release(self)

    def __del__(self) -> None:
        # A Checkpointer dropped without close() must not keep its directory locked for the rest of the
        # process (the kernel would only release the flock at exit).
        lock = getattr(self, "_lock", None)
        if lock is not None:
            try:
                lock.release()
            except Exception:
                pass

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
            return
        try:  # do not hide the exception that ended the block behind a background-save error
            self.close()
        except CheckpointError as err:
            log.error("closing %r after an error: %s", self, err)

    def __repr__(self) -> str:
        return f"Checkpointer({self.directory!r}, monitor={self.monitor!r}, mode={self.mode!r})"
