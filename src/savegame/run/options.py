"""The Checkpointer's options: its keywords checked and resolved once, and their reference.

:class:`CheckpointerOptions` is what :class:`~savegame.run.checkpointer.Checkpointer` builds from its
keywords before it does anything else: each keyword checked (a :class:`~savegame.errors.ConfigError`
naming it), the grouped forms resolved into the flat ones, the knobs turned into the save and keep
policies. The Checkpointer keeps the result as ``ckpt.options`` and only orchestrates.

Three groups of keywords can also be given as one object each, alongside the flat keywords (every flat
keyword keeps working; a flat keyword that is not at its default and says something else than its
group's object is a :class:`ConfigError`):

* ``preemption=Preemption(signals=True, action="exit", exit_code=None)``: ``save_on_signal``,
  ``signal_action``, ``signal_exit_code``;
* ``background=Background(if_busy="wait", nice=None, snapshot="eager", write_rate=None)``:
  ``background=True`` with ``if_busy``, ``writer_nice``, ``snapshot`` and ``write_rate``;
* ``storage=StorageOptions(options=None, mirror=None, mirror_options=None)``: ``storage_options``,
  ``mirror``, ``mirror_options``.

Adding a keyword: one line in ``Checkpointer.__init__``'s signature (with the same default), and here a
field of :class:`CheckpointerOptions`, its check in ``_check`` and its paragraph in
:data:`KEYWORDS_REFERENCE`; the code reads it as ``ckpt.options.NAME``.
``tests/test_checkpointer_options.py`` checks that the signature and the fields agree.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from savegame.engine.lazy import SnapshotMode, check_snapshot_mode
from savegame.errors import ConfigError
from savegame.policies import KeepPolicy, Mode, SavePolicy, check_count
from savegame.policies.autointerval import DEFAULT_MTBF_SECONDS
from savegame.policies.knob_policies import KnobPolicies, policies_from_knobs
from savegame.policies.knobs import Restart

__all__ = ["KEYWORDS_REFERENCE", "Background", "CheckpointerOptions", "Preemption", "StorageOptions"]

SignalAction = Literal["exit", "reraise", "continue"]
IfBusy = Literal["wait", "skip"]


def _check_background(value: object) -> bool:
    """``background=`` given as a flag (a :class:`Background` is spread by the caller): True or False.
    Anything else is a :class:`ConfigError` (a string such as ``"false"`` would otherwise be true)."""
    if value is None:  # not given
        return False
    if not isinstance(value, bool):
        raise ConfigError(f"Checkpointer: background must be True, False or a savegame.Background(...), got {value!r}")
    return value


def _check_if_busy(if_busy: object, *, background: bool = True) -> None:
    if if_busy not in ("wait", "skip"):
        raise ConfigError(f"Checkpointer: if_busy must be 'wait' or 'skip', got {if_busy!r}")
    if if_busy == "skip" and not background:
        raise ConfigError("Checkpointer: if_busy='skip' needs background=True (a synchronous save is never in "
                          "flight when the next one is wanted, so nothing would be skipped)")  # fmt: skip


def _check_nice(nice: object, *, background: bool = True) -> None:
    if nice is not None and (isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= 19):
        raise ConfigError(f"Checkpointer: writer_nice must be an int from 0 to 19 or None, got {nice!r}")
    if nice is not None and not background:
        raise ConfigError("Checkpointer: writer_nice needs background=True (a synchronous save is written by the "
                          "calling thread, whose priority savegame leaves alone)")  # fmt: skip


def _check_write_rate(rate: object, *, background: bool) -> None:
    if rate is None:
        return
    try:
        valid = not isinstance(rate, bool) and isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0
    except OverflowError:  # an int too large for a float
        valid = False
    if not valid:
        raise ConfigError(f"Checkpointer: write_rate must be a number of MB/s > 0 or None, got {rate!r}")
    if not background:
        raise ConfigError("Checkpointer: write_rate needs background=True (a synchronous save is not paced: "
                          "the caller waits for it)")


def _check_signal_action(action: object) -> None:
    if action not in ("exit", "reraise", "continue"):
        raise ConfigError(f"Checkpointer: signal_action must be 'exit', 'reraise' or 'continue', got {action!r}")


def _check_mapping(what: str, value: object) -> None:
    if value is not None and not isinstance(value, Mapping):
        raise ConfigError(f"Checkpointer: {what} must be a dict, got {type(value).__name__}")


@dataclass(frozen=True)
class Preemption:
    """Save on a preemption signal: ``save_on_signal``, ``signal_action`` and ``signal_exit_code`` in one.

    ``signals``: True for SIGTERM and SIGUSR1, or the signals to catch (names or numbers); ``action``:
    ``"exit"``, ``"reraise"`` or ``"continue"``; ``exit_code``: the ``SystemExit`` code of ``"exit"``
    (None: 128 + the signal number). See the ``Preemption`` keywords of the Checkpointer.
    """

    signals: bool | int | str | tuple[int | str, ...] = True
    action: SignalAction = "exit"
    exit_code: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.signals, (bool, int, str)):
            object.__setattr__(self, "signals", tuple(self.signals))
        _check_signal_action(self.action)
        if self.exit_code is not None and (isinstance(self.exit_code, bool) or not isinstance(self.exit_code, int)):
            raise ConfigError(f"Checkpointer: signal_exit_code must be an int or None, got {self.exit_code!r}")


@dataclass(frozen=True)
class Background:
    """Write in the background (``background=True``) with ``if_busy``, ``writer_nice``, ``snapshot`` and
    ``write_rate`` in one: ``background=Background(if_busy="skip", nice=10, snapshot="lazy")``."""

    if_busy: IfBusy = "wait"
    nice: int | None = None
    snapshot: SnapshotMode = "eager"
    write_rate: float | None = None

    def __post_init__(self) -> None:
        _check_if_busy(self.if_busy)
        _check_nice(self.nice)
        check_snapshot_mode(self.snapshot, background=True, where="Checkpointer")
        _check_write_rate(self.write_rate, background=True)


@dataclass(frozen=True)
class StorageOptions:
    """Where checkpoints go besides ``directory``: ``storage_options``, ``mirror`` and ``mirror_options``
    in one: ``storage=StorageOptions(mirror="s3://bucket/run", mirror_options={...})``. ``options``
    holds the fsspec options of a URL ``directory``."""

    options: Mapping[str, Any] | None = None
    mirror: str | os.PathLike[str] | None = None
    mirror_options: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        _check_mapping("storage_options", self.options)
        _check_mapping("mirror_options", self.mirror_options)
        if self.mirror is not None and not isinstance(self.mirror, (str, os.PathLike)):
            raise ConfigError(f"Checkpointer: mirror must be a path or URL, got {type(self.mirror).__name__}")

    def __repr__(self) -> str:  # storage options hold credentials: never shown
        shown = "{...}" if self.options else None
        return f"StorageOptions(options={shown}, mirror={self.mirror!r}, mirror_options=...)"


# (flat keyword, field of the group object) for each group; the group's keyword comes first.
_GROUPS: dict[str, tuple[type, tuple[tuple[str, str], ...]]] = {
    "preemption": (
        Preemption,
        (("save_on_signal", "signals"), ("signal_action", "action"), ("signal_exit_code", "exit_code")),
    ),
    "background": (
        Background,
        (("if_busy", "if_busy"), ("writer_nice", "nice"), ("snapshot", "snapshot"), ("write_rate", "write_rate")),
    ),
    "storage": (
        StorageOptions,
        (("storage_options", "options"), ("mirror", "mirror"), ("mirror_options", "mirror_options")),
    ),
}


@dataclass(frozen=True)
class CheckpointerOptions:
    """The Checkpointer's keywords, checked, with the grouped forms resolved into the flat fields.

    One field per flat keyword, same name and default as in ``Checkpointer.__init__``; the group
    keywords (``preemption``, ``storage``; ``background`` as a :class:`Background`) are not fields:
    :meth:`from_keywords` spreads them. The reference of every keyword is :data:`KEYWORDS_REFERENCE`.
    """

    save: SavePolicy | None = None
    keep: KeepPolicy | None = None
    monitor: str | None = None
    mode: Mode = "auto"
    min_delta: float = 0.0
    threshold: float | None = None
    every_n_epochs: int | None = None
    every_n_steps: int | None = None
    every_seconds: float | None = None
    every: Literal["auto"] | None = None
    mtbf_seconds: float = DEFAULT_MTBF_SECONDS
    max_overhead: float = 0.05
    save_best_only: bool = False
    save_at_end: bool | None = None
    skip_first_epochs: int = 0
    keep_last: int | None = None
    keep_best: int | None = None
    name: str | None = None
    weights_only: bool = False
    rng: bool = True
    background: bool = False
    if_busy: IfBusy = "wait"
    writer_nice: int | None = None
    write_rate: float | None = None
    incremental: bool = False
    snapshot: SnapshotMode = "eager"
    restart: Restart = "auto"
    verify: bool = True
    max_epochs: int | None = None
    metadata: Mapping[str, Any] | None = None
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time
    storage_options: Mapping[str, Any] | None = None
    mirror: str | os.PathLike[str] | None = None
    mirror_options: Mapping[str, Any] | None = None
    lock: bool = True
    save_on_signal: bool | Iterable[int | str] = False
    signal_action: SignalAction = "exit"
    signal_exit_code: int | None = None
    group: Any = None
    per_rank: Collection[str] = ()
    callbacks: Iterable[object] | None = None
    quiet: bool = False

    @classmethod
    def from_keywords(cls, keywords: Mapping[str, Any]) -> CheckpointerOptions:
        """The options of a Checkpointer constructed with ``keywords`` (its keyword arguments, the
        group keywords among them, each at its value or default)."""
        flat = dict(keywords)
        for group, (kind, pairs) in _GROUPS.items():
            given = flat.pop(group, None)
            if group == "background" and not isinstance(given, Background):
                flat["background"] = _check_background(given)
                continue
            if given is None:
                continue
            if not isinstance(given, kind):
                raise ConfigError(f"Checkpointer: {group}= must be a {kind.__name__}, got {type(given).__name__}")
            for keyword, attribute in pairs:
                _merge(flat, group, keyword, getattr(given, attribute))
            if group == "background":
                flat["background"] = True
        options = cls(**flat)
        options._check()
        return options

    def _check(self) -> None:
        """Each keyword on its own (the policies check theirs in :meth:`policies`)."""
        if self.restart not in ("auto", "required", "off"):
            raise ConfigError(f"Checkpointer: restart must be 'auto', 'required' or 'off', got {self.restart!r}")
        if self.mode not in ("auto", "min", "max"):
            raise ConfigError(f"Checkpointer: mode must be 'auto', 'min' or 'max', got {self.mode!r}")
        check_count("Checkpointer", "max_epochs", self.max_epochs, minimum=1)
        _check_mapping("metadata", self.metadata)
        _check_if_busy(self.if_busy, background=self.background)
        _check_nice(self.writer_nice, background=self.background)
        _check_write_rate(self.write_rate, background=self.background)
        if not isinstance(self.incremental, bool):
            raise ConfigError(f"Checkpointer: incremental must be True or False, got {self.incremental!r}")
        check_snapshot_mode(self.snapshot, background=self.background, where="Checkpointer")
        _check_signal_action(self.signal_action)

    def policies(self) -> KnobPolicies:
        """The save and keep policies (and the monitor they track) of ``save=``/``keep=`` or the knobs."""
        names = ("save", "keep", "monitor", "mode", "min_delta", "threshold", "every_n_epochs", "every_n_steps",
                 "every_seconds", "every", "mtbf_seconds", "max_overhead", "save_best_only", "save_at_end",
                 "skip_first_epochs", "keep_last", "keep_best")  # fmt: skip
        return policies_from_knobs(**{n: getattr(self, n) for n in names})


_DEFAULTS = {f.name: f.default for f in fields(CheckpointerOptions)}


def _merge(flat: dict[str, Any], group: str, keyword: str, value: Any) -> None:
    """Put a group object's ``value`` for ``keyword`` into ``flat``; a flat value not at its default
    that differs from it is a conflict."""
    current = flat.get(keyword, _DEFAULTS[keyword])
    if not _same(current, _DEFAULTS[keyword]) and not _same(current, value):
        raise ConfigError(
            f"Checkpointer: {keyword}={current!r} conflicts with {group}= (which says {value!r}); give one of them"
        )
    flat[keyword] = value


def _same(a: object, b: object) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    try:
        return bool(a == b)
    except Exception:
        return a is b


KEYWORDS_REFERENCE = """\
When to save -- either ``save=`` (any :class:`~savegame.policies.SavePolicy`, e.g.
``AnyOf(EveryNSteps(500), OnImprovement("val_acc"))``) or the knobs below, not both:

* ``every_n_epochs``: save at the ends of epochs N, 2N, 3N, ... whatever else was saved in between
  (``0``: never by epoch count). When no ``every_*`` knob is given and ``save_best_only`` is False,
  it defaults to 1.
* ``every_n_steps``: save once N global steps have passed since the last save (also mid-epoch
  calls); ``0``/None: off.
* ``every_seconds``: save when this much (monotonic) time has passed since the last save.
* ``every="auto"``: save at the Young/Daly optimal interval ``T = sqrt(2 C M)`` (Daly's refinement)
  from the measured blocking cost ``C`` of each save and the mean time between failures
  ``M = mtbf_seconds`` (default a day), never spending more than ``max_overhead`` (default 5 %) of the
  time blocked in saves (:class:`savegame.policies.autointerval.AutoInterval`).
* ``save_best_only``: save only when ``monitor`` improves (Keras's ``save_best_only``; no periodic
  saves allowed with it). Whatever the knobs, a ``monitor`` makes every improvement save, so the best
  model is always on disk.
* ``save_at_end``: save at the final call (``step(..., final=True)`` or ``epoch == max_epochs``).
  None (default) means True unless ``save_best_only``.
* ``skip_first_epochs``: no periodic or best saves before this many epochs completed (CANDLE's
  ``ckpt_skip_epochs``); the end-of-training save still happens.

What to keep -- either ``keep=`` (any :class:`~savegame.policies.KeepPolicy`, e.g.
``KeepUnion(KeepLast(3), KeepExponential())``) or the knobs, not both:

* ``keep_last``: keep the N newest; ``keep_best``: keep the K best by ``monitor``. Both: the union.
  Neither: keep everything. Only the current run's checkpoints are candidates (see ``restart``). In
  every case the newest and the best checkpoint, the bests recorded by any run's manifests and
  pinned ones (``save(..., pin=True)``) are kept, and checkpoints not written by a Checkpointer are
  never deleted. Retention runs right after each commit (never before it; for background saves, at the
  next call that waits for the commit).

Best tracking:

* ``monitor``: the metric that defines "best" (e.g. ``"val_loss"``, ``"val_accuracy"``). When None
  it is taken from an ``OnImprovement`` in ``save=`` or a ``KeepBest`` in ``keep=`` if present.
* ``mode``: ``"min"``, ``"max"`` or ``"auto"`` (from the name: accuracy-like metrics are maximised,
  losses minimised; see :func:`savegame.policies.resolve_mode`).
* ``min_delta``: an improvement must exceed this; ``threshold``: the value to beat before any
  checkpoint exists (Keras's ``initial_value_threshold``).
  The best value and name are stored in every manifest, so they survive restarts.

Background writing (``background=Background(if_busy=..., nice=...)`` says the three in one):

* ``background``: block training only while the state is copied to host memory and write it in a
  background thread (one save in flight; the next save, ``wait()``, ``restore`` and ``close()`` wait
  for it). A failed background save raises :class:`BackgroundSaveError` at the next of those calls
  (or the next ``step``), unless ``SaveResult.pending.result()`` already raised it; retention for a
  background save runs once it is committed, at that call. Call ``close()`` (or use ``with``) so the
  last save is integrated and retention applied; a save still in flight when the process ends is
  finished at exit all the same (:mod:`savegame.engine.background`).
* ``if_busy`` (``"skip"`` needs ``background``): what a save that ``step`` wants does while the
  previous background save is still being written. ``"wait"`` (the default): it waits for that one
  to commit, then snapshots and writes. ``"skip"`` (for saving every step or every few steps): it is
  coalesced into the save in flight and returns at once: nothing is written for that call,
  ``SaveResult.skipped`` is True (its ``name``, ``path`` and ``pending`` are those of the save in
  flight), and the policy still counts from the last save that was written, so the next ``step``
  after that one committed saves the state as it is then. Never a queue: at most one save in flight,
  at most one snapshot in memory. ``save()``, a final ``step(final=True)``, preemption saves and
  sync saves always wait, so after ``close()`` the state of the last call that was not reported
  skipped is durable.
* ``writer_nice`` (with ``background``): lower the scheduling priority of the background writer
  threads by this much (0-19, Linux only; None: unchanged) so that the write competes less with training for the CPUs.
  A training thread that waits for the writer (``if_busy="wait"``, ``wait()``) waits longer on a
  busy machine: pair it with ``if_busy="skip"``.
* ``write_rate`` (with ``background``): write each background save at most this many MB/s (10**6
  bytes), in chunks of at most 4 MiB, so the write's CPU work and disk traffic are spread over time
  instead of bursting into the training steps (:mod:`savegame.engine.pacing`); None (default): full
  speed. Choose about state size / the interval between saves, and pair it with ``if_busy="skip"``
  (under ``"wait"`` the next save waits for the paced one, which then finishes at full speed). Pacing
  never costs the last state: whenever anything waits for the save (``wait()``, ``save()``,
  ``close()``, ``restore``, a preemption or signal save, interpreter exit) the rest is written at
  full speed. It needs ``background`` (ConfigError otherwise: the caller waits for a sync save);
  saves in a process group are synchronous and so not paced; ``per_rank`` items of a single-process background save are.
* ``incremental``: each save hard-links the files of this run's previous checkpoint that hold the
  arrays whose dtype, shape and bytes did not change (every array is hashed; see
  :mod:`savegame.engine.incremental`) instead of writing them again; every checkpoint stays complete
  and deleting one never affects another. Pays off when much of the state is frozen (fine-tuning);
  costs one hash of the whole state per save and, for the linked files, one verification read.
  Multi-process saves (``torch.distributed``) are written in full.
* ``snapshot`` (with ``background``): ``"eager"`` copies the whole state before the save returns;
  ``"lazy"`` copies parameters and optimizer state during the next forward/backward, and the next
  ``optimizer.step()`` waits for it (:mod:`savegame.engine.lazy`, which says what it cannot detect).
  The final save (``step(final=True)``) is always eager: no step follows it, and what the end of a run
  does to the model (loading the best weights back) would otherwise fail it.

Other options:

* ``name``: a template such as ``"mobilenet_v2_{epoch:02d}_{val_accuracy:.3f}"`` (placeholders
  ``epoch``, ``step`` and metric names; checked now). None: ``epoch=004-step=001200``. When a save
  lacks a value the template needs (a mid-epoch save without validation metrics), the default
  name is used and a warning issued instead of failing the run.
* ``weights_only``: save only the ``nn.Module`` items of the state (no optimizer, no RNG).
* ``rng``: add :class:`savegame.RNGState` as item ``"rng"`` to full-state checkpoints (unless the
  state already has an ``"rng"`` item) and restore it, so dropout and shuffles continue exactly.
* ``restart``: what ``restore(state)`` (``which="latest"``) does: ``"auto"`` resumes from the newest
  valid checkpoint if there is one, ``"required"`` raises :class:`CheckpointNotFoundError` if there
  is none; both continue the run of the newest checkpoint (its best, its retention). ``"off"``
  never resumes (returns None) and starts a new run in the directory: its best is tracked from its
  own saves only and its retention never deletes the checkpoints of earlier runs, which stay
  (``savegame ls`` shows the run of each checkpoint). A name an earlier run used gets ``-v1``...
  Explicit ``which="best"`` (this run's best) and names always load.
* ``verify``: check every file's hash before restoring (a failing newest checkpoint is quarantined
  and the next one tried).
* ``max_epochs``: when given, an epoch-end call with ``epoch >= max_epochs`` counts as the final call.
* ``metadata``: JSON-like data stored in every manifest (run id, host, config...).
* ``callbacks``: objects told what happens (a save started, committed, failed; retention deleted;
  a damaged checkpoint quarantined; restored; preemption saved) through the hooks they define
  (:mod:`savegame.events`: the protocol, TensorBoard / MLflow / W&B loggers). Hooks run on the
  calling thread; one that raises is logged and ignored (``callback_failures``).
* ``quiet``: do not print the one line on stderr saying what ``restore`` resumed from.
* ``clock``: monotonic seconds for ``every_seconds``; ``wall_clock``: unix seconds of "now" for
  time-based retention (``KeepPerInterval``, ``KeepWithin``), whose checkpoint ages come from the creation
  times their manifests record (the real clock's). Injectable for tests.

Where checkpoints live (``storage=StorageOptions(options=..., mirror=..., mirror_options=...)`` says
``storage_options``, ``mirror`` and ``mirror_options`` in one):

* ``directory``: a local path, or any fsspec URL (``s3://bucket/run``, ``gs://...``, ``memory://...``;
  needs the ``s3`` extra) written with the manifest as commit marker (:mod:`savegame.storage.remote`).
* ``storage_options``: passed to fsspec for a URL ``directory`` (credentials, endpoint); never logged.
* ``mirror``: a URL (or path) that committed checkpoints are copied to in the background
  (:class:`savegame.engine.mirror.Mirror`): training resumes after the fast local commit, the upload
  follows; local deletions by retention are mirrored once a newer checkpoint is there. ``restore``
  then resumes from the newest valid checkpoint of either side, so a fresh node with an empty disk
  resumes from the mirror. ``mirror_options``: fsspec options for ``mirror``. ``close()`` waits
  for the uploads.
* ``lock``: hold the directory's writer lock (:class:`savegame.run.lock.WriterLock`) from construction
  to ``close()``, so a second writer process on the same local directory fails at once with
  :class:`LockedError` naming the holder (a crashed holder's lock is released by the kernel).
  Checkpointers of one process share it (a restart in a notebook is not a rival writer).
  Read-only users (``list``, ``restore``) may pass False: such a Checkpointer does not own the
  directory, so it never renames or removes anything there on its own (no clean-up of dead
  writers' leftovers until its first save, no quarantine: a damaged checkpoint is skipped with a
  warning and left in place), and a checkpoint that a writer's retention deletes while it is being
  read is not damage: ``restore`` re-lists and takes the newest again. One that saves or prunes is a
  writer all the same (its retention deletes), without the guard against a second writer process: the
  caller keeps others out. Not used for URL roots.

Preemption (SLURM, Kubernetes: a signal, then SIGKILL some 30 s later;
``preemption=Preemption(signals=..., action=..., exit_code=...)`` says the three in one):

* ``save_on_signal``: True for SIGTERM and SIGUSR1, or the signals to catch (names or numbers);
  False (default) leaves signal handling alone. On such a signal the next ``step`` (a safe point:
  the state is consistent there) saves a full checkpoint -- unless that call saved anyway -- waits
  until it is durable, then acts per ``signal_action``: ``"exit"`` raises ``SystemExit``
  (``signal_exit_code``, default 128 + the signal number), ``"reraise"`` ends the process by the
  signal itself, ``"continue"`` keeps training. :meth:`between_steps` opts a region between steps
  (data loading, evaluation) in to saving at once. Handlers need the main thread.

Several processes (``torch.distributed``): every rank constructs the Checkpointer and makes the same
calls. Rank 0 decides (whether to save, names, what to resume from, retention) and commits once all
ranks have written (:mod:`savegame.distributed`); replicated items are written once, sharded ones
(FSDP2, DTensor) by each rank, ``rng`` per rank. ``group``: the process group (None: the default
one; False: ignore torch.distributed and act as a single process). ``per_rank``: further items that
differ between ranks (a per-rank sampler). Saves are synchronous in a process group.
"""
"""The reference of every Checkpointer keyword, by group; ``Checkpointer.__doc__`` ends with it."""
