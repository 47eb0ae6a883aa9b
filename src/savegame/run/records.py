"""The values the Checkpointer hands back and the progress it records: :class:`CheckpointRecord`
(``list()``), :class:`SaveResult` (``save()`` / ``step()``), :class:`RestoredProgress` (``restore()``), the
``progress`` dict written into each manifest (:func:`progress_json`, read back by
:mod:`savegame.run.index`) and run ids (:func:`new_run_id`).

Plain frozen values with no behaviour, so every part of the run layer (the Checkpointer, resume, the
Keras callbacks) can build or read them without importing the Checkpointer. The public names stay
importable from :mod:`savegame.run.checkpointer`.

What the Checkpointer writes into each manifest's ``progress`` (readable by any process with
:func:`savegame.read_manifest`)::

    {"checkpointer": 1, "sequence": 12, "run": "20261201T213012-a1b2c3", "epoch": 4, "step": 1200,
     "metrics": {"val_loss": 0.31},
     "epoch_end": true, "final": false, "weights_only": false, "pinned": false, "is_best": true,
     "best": {"monitor": "val_loss", "mode": "min", "value": 0.31, "name": "epoch=004-step=001200",
              "epoch": 4, "step": 1200}}

``run`` identifies the training run that wrote the checkpoint: a Checkpointer continues the run of the
newest checkpoint (``restart="auto"`` / ``"required"``) or starts a new one (``restart="off"``, or an
empty directory). Best tracking and retention only look at the current run's checkpoints, so a fresh
run in a used directory has its own best and never deletes an earlier run's checkpoints. Manifests
written before run ids existed have no ``run``: they belong to no current run and retention never
deletes them (a run resumed from them keeps their recorded best, though; ``savegame prune`` can
thin them out).
"""

from __future__ import annotations

import datetime as _dt
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from savegame.engine.background import PendingSave
from savegame.policies import Progress
from savegame.run.index import PROGRESS_VERSION, IndexEntry, RecordedBest

__all__ = ["CheckpointRecord", "RestoredProgress", "Resumed", "SaveResult", "new_run_id", "progress_json", "record_for"]


@dataclass(frozen=True)
class CheckpointRecord:
    """One committed checkpoint of the directory, as :meth:`Checkpointer.list` reports it.

    ``sequence`` is the save counter (None for checkpoints not written by a Checkpointer), ``created``
    the commit time (UTC), ``size`` the bytes of its data files, ``is_best`` / ``is_latest`` whether it
    is the directory's best / newest checkpoint.
    """

    name: str
    path: str
    sequence: int | None
    epoch: int | None
    step: int | None
    metrics: Mapping[str, float]
    created: _dt.datetime
    size: int
    is_best: bool
    is_latest: bool
    weights_only: bool
    pinned: bool
    run: str | None = None
    """The run that wrote it (see the module docstring); None for checkpoints older than run ids."""


@dataclass(frozen=True)
class SaveResult:
    """What a save did: the new checkpoint, whether it is the new best, what retention deleted.

    ``seconds`` is how long training was blocked. For a background save (``background=True``)
    ``pending`` is its handle (``pending.result()`` waits for the durable commit), ``size`` is None and
    ``deleted`` is empty: retention runs once the commit is done, at the next save, ``wait()`` or
    ``close()``. Should another writer take the name while the checkpoint is written, it is committed
    under the next free name (``epoch=003-v1``; a warning is logged), by sync, background and per-rank
    saves alike: a sync save's ``name`` is where it went, a background save's the name it started with
    (``latest`` and ``list()`` show where it went once it is settled).
    ``skipped``: True when ``step`` wanted to save but coalesced the save into the background save still
    in flight (``Checkpointer(if_busy="skip")``): nothing was written for this call; ``name``, ``path``
    and ``pending`` are those of the save in flight, ``epoch``, ``step`` and ``metrics`` this call's.
    """

    name: str
    path: str
    epoch: int | None
    step: int | None
    metrics: Mapping[str, float]
    is_best: bool
    size: int | None
    seconds: float
    deleted: tuple[str, ...] = ()
    pending: PendingSave | None = None
    skipped: bool = False


@dataclass(frozen=True)
class RestoredProgress:
    """Where the restored checkpoint left off, so the training loop can continue.

    ``epoch`` (completed epochs) and ``step`` are what was passed when it was saved; ``data`` holds the
    saved values of the plain items of the state (ints, floats, dicts of numbers...), which ``restore``
    also put into the state itself (``restored.data["loss"] == state["loss"]``; a dict of the state is
    filled in place and keeps keys the checkpoint lacks), and of the checkpoint's plain items that the
    state did not name (read, not restored anywhere). ``quarantined`` lists broken checkpoints moved
    aside on the way (skipped and left in place by a Checkpointer with ``lock=False``).
    """

    name: str
    path: str
    epoch: int | None
    step: int | None
    metrics: Mapping[str, float]
    data: Mapping[str, Any] = field(default_factory=dict)
    quarantined: tuple[str, ...] = ()


@dataclass(frozen=True)
class Resumed:
    """What ``restore`` resumed from: the progress returned to the caller and the run it belongs to."""

    progress: RestoredProgress
    run: str | None


def new_run_id() -> str:
    """A new run id: the UTC start time and a random suffix (``20261201T213012-a1b2c3``), sortable and unique."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def progress_json(
    progress: Progress, *, sequence: int, run: str, weights_only: bool, best: RecordedBest | None, name: str,
    pin: bool, timing: Mapping[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The ``progress`` dict stored in the manifest of checkpoint ``name`` (layout in
    :mod:`savegame.run.checkpointer`'s docstring; ``timing``: see :mod:`savegame.run.timing`)."""
    recorded = {
        "checkpointer": PROGRESS_VERSION,
        "sequence": sequence,
        "run": run,
        "epoch": progress.epoch,
        "step": progress.step,
        "metrics": dict(progress.metrics),
        "epoch_end": progress.epoch_end,
        "final": progress.final,
        "weights_only": weights_only,
        "pinned": pin,
        "is_best": best is not None and best.name == name,
        "best": best.to_json() if best is not None else None,
    }
    if timing is not None:
        recorded["timing"] = dict(timing)
    return recorded


def record_for(entry: IndexEntry, *, path: str, best: str | None, newest: str | None) -> CheckpointRecord:
    """The :class:`CheckpointRecord` of an index entry stored at ``path``; ``best`` / ``newest``: the
    names of the directory's best and newest checkpoints."""
    return CheckpointRecord(
        name=entry.name,
        path=path,
        sequence=entry.sequence,
        epoch=entry.epoch,
        step=entry.step,
        metrics=entry.metrics,
        created=entry.manifest.created,
        size=entry.manifest.total_bytes,
        is_best=best is not None and best == entry.name,
        is_latest=entry.name == newest,
        weights_only=entry.weights_only,
        pinned=entry.pinned,
        run=entry.run,
    )
