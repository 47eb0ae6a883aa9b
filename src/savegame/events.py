"""Tell the tools people watch training with what the Checkpointer did: the event protocol and
loggers for TensorBoard, MLflow and Weights & Biases.

Pass any objects as ``Checkpointer(..., callbacks=[...])`` (or to the Keras callbacks'
``callbacks=``); each hook a callback defines is called with a frozen info, the others are skipped,
so a callback defines only what it uses::

    class Alert:
        def on_save_failed(self, info: savegame.events.SaveFailedInfo) -> None:
            page_me(f"checkpoint {info.name} failed: {info.error}")

    ckpt = Checkpointer("runs/exp", callbacks=[Alert(), TensorBoardLogger("runs/tb")])

The hooks and their infos (:data:`HOOKS`): ``on_save_started`` (:class:`SaveStartedInfo`),
``on_save_committed`` (:class:`SaveCommittedInfo`: name, path, bytes, blocking and durable seconds,
throughput), ``on_save_failed`` (:class:`SaveFailedInfo`, with the error), ``on_deleted``
(:class:`DeletedInfo`, retention), ``on_quarantined`` (:class:`QuarantinedInfo`), ``on_restored``
(:class:`RestoredInfo`: from what, how long) and ``on_preemption_saved`` (:class:`PreemptionInfo`).
:class:`Callback` is a base class with every hook a no-op, for those who like to subclass.

Threads and errors (details in :mod:`savegame.run.events` and docs/events.md): hooks run on the
thread that calls the Checkpointer, inside that call -- a background save's commit is delivered by the
next call on the training thread, with its durable time measured on the writer thread; a hook that
raises is logged (ERROR, logger ``savegame.events``) and recorded in
``Checkpointer.callback_failures``, never re-raised, so a logger that fails cannot lose a checkpoint
or stop training. Every event also makes one log line with the same data (logger
``savegame.run.checkpointer``).

The loggers write the save metrics at the training step of the save (its ``step``; its ``epoch`` when
it has no step): ``savegame/bytes``, ``savegame/blocking_seconds``, ``savegame/durable_seconds``,
``savegame/throughput_mb_per_s`` (10^6 bytes per second) and, on a resume, ``savegame/restore_seconds``.
Their libraries are imported when a logger is made (``pip install 'savegame[tensorboard]'``,
``'savegame[mlflow]'``, ``'savegame[wandb]'``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from savegame.errors import ConfigError
from savegame.run.events import (
    HOOKS,
    CallbackFailure,
    DeletedInfo,
    EventDispatcher,
    PreemptionInfo,
    QuarantinedInfo,
    RestoredInfo,
    SaveCommittedInfo,
    SaveFailedInfo,
    SaveStartedInfo,
    describe,
)

__all__ = [
    "HOOKS",
    "Callback",
    "CallbackFailure",
    "DeletedInfo",
    "EventDispatcher",
    "MLflowLogger",
    "PreemptionInfo",
    "QuarantinedInfo",
    "RestoredInfo",
    "SaveCommittedInfo",
    "SaveFailedInfo",
    "SaveStartedInfo",
    "TensorBoardLogger",
    "WandbLogger",
    "describe",
    "save_metrics",
    "training_step",
]


class Callback:
    """A callback with every hook defined as a no-op: subclass it and override the hooks you need
    (optional: any object that defines some of the hooks works as well)."""

    def on_save_started(self, info: SaveStartedInfo) -> None:
        """A save begins."""

    def on_save_committed(self, info: SaveCommittedInfo) -> None:
        """A save is committed and durable."""

    def on_save_failed(self, info: SaveFailedInfo) -> None:
        """A save failed (the Checkpointer raises the error to its caller as well)."""

    def on_deleted(self, info: DeletedInfo) -> None:
        """Retention deleted a checkpoint."""

    def on_quarantined(self, info: QuarantinedInfo) -> None:
        """A damaged checkpoint was moved aside while resuming."""

    def on_restored(self, info: RestoredInfo) -> None:
        """A checkpoint was restored into the live state."""

    def on_preemption_saved(self, info: PreemptionInfo) -> None:
        """A preemption signal's checkpoint is durable."""


def training_step(info: SaveCommittedInfo | RestoredInfo) -> int:
    """The step a logger writes an event at: the save's step, else its epoch, else 0."""
    if info.step is not None:
        return info.step
    return info.epoch if info.epoch is not None else 0


def save_metrics(info: SaveCommittedInfo, prefix: str = "savegame/") -> dict[str, float]:
    """The metrics the loggers write for a committed save."""
    return {
        f"{prefix}bytes": float(info.bytes),
        f"{prefix}blocking_seconds": info.blocking_seconds,
        f"{prefix}durable_seconds": info.durable_seconds,
        f"{prefix}throughput_mb_per_s": info.throughput / 1e6,
    }


def _missing(extra: str, what: str) -> ConfigError:
    return ConfigError(f"savegame.events: {what} is not installed: pip install 'savegame[{extra}]'")


class TensorBoardLogger:
    """Writes the save metrics as TensorBoard scalars.

    ``log_dir``: a directory for a new ``torch.utils.tensorboard.SummaryWriter`` (closed by
    :meth:`close`), or ``writer``: one you already have (anything with ``add_scalar``, e.g. your own
    ``SummaryWriter``; it stays yours to close). Each event is flushed, so TensorBoard shows it at once.
    """

    def __init__(self, log_dir: str | os.PathLike[str] | None = None, *, writer: Any = None,
                 prefix: str = "savegame/") -> None:  # fmt: skip
        if (log_dir is None) == (writer is None):
            raise ConfigError("TensorBoardLogger: give either log_dir (a directory) or writer (a SummaryWriter)")
        self.prefix = prefix
        self._owned = writer is None
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise _missing("tensorboard", f"TensorBoard ({exc})") from None
            writer = SummaryWriter(log_dir=os.fspath(log_dir))  # type: ignore[arg-type]
        self.writer = writer

    def _scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        if hasattr(self.writer, "flush"):
            self.writer.flush()

    def on_save_committed(self, info: SaveCommittedInfo) -> None:
        self._scalars(save_metrics(info, self.prefix), training_step(info))

    def on_restored(self, info: RestoredInfo) -> None:
        self._scalars({f"{self.prefix}restore_seconds": info.seconds}, training_step(info))

    def close(self) -> None:
        """Close the writer this logger made (a writer passed in is left open)."""
        if self._owned:
            self.writer.close()


class MLflowLogger:
    """Logs the save metrics to an MLflow run.

    ``run_id``: the run to log to (with ``tracking_uri``, e.g. ``"file:/tmp/mlruns"`` or your server);
    None: the run active (``mlflow.start_run()``) when the event comes. Values are logged with the
    event's step, so ``MlflowClient.get_metric_history`` returns them at the training steps.
    """

    def __init__(self, run_id: str | None = None, *, tracking_uri: str | None = None,
                 prefix: str = "savegame/") -> None:  # fmt: skip
        try:
            import mlflow
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise _missing("mlflow", f"MLflow ({exc})") from None
        self._mlflow = mlflow
        self.run_id = run_id
        self.prefix = prefix
        self.client = MlflowClient(tracking_uri=tracking_uri)

    def _run(self) -> str:
        if self.run_id is not None:
            return self.run_id
        active = self._mlflow.active_run()
        if active is None:
            raise ConfigError("MLflowLogger: no run_id was given and no MLflow run is active (mlflow.start_run())")
        return str(active.info.run_id)

    def _log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self._run(), metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def on_save_committed(self, info: SaveCommittedInfo) -> None:
        self._log(save_metrics(info, self.prefix), training_step(info))

    def on_restored(self, info: RestoredInfo) -> None:
        self._log({f"{self.prefix}restore_seconds": info.seconds}, training_step(info))


class WandbLogger:
    """Logs the save metrics to a Weights & Biases run (``mode="offline"`` works).

    ``run``: the run (what ``wandb.init`` returned); None: ``wandb.run`` when the event comes. The
    metrics are plotted against their own x-axis ``savegame/step`` (the training step of the save,
    declared with ``define_metric``), so they never clash with the step counter of your own
    ``run.log`` calls.
    """

    def __init__(self, run: Any = None, *, prefix: str = "savegame/") -> None:
        try:
            import wandb
        except ImportError as exc:
            raise _missing("wandb", f"Weights & Biases ({exc})") from None
        self._wandb = wandb
        self.run = run
        self.prefix = prefix
        self._defined: set[int] = set()

    def _log(self, values: dict[str, float], step: int) -> None:
        run = self.run if self.run is not None else self._wandb.run
        if run is None:
            raise ConfigError("WandbLogger: no run was given and no W&B run is active (wandb.init())")
        if id(run) not in self._defined:
            run.define_metric(f"{self.prefix}step")
            run.define_metric(f"{self.prefix}*", step_metric=f"{self.prefix}step")
            self._defined.add(id(run))
        run.log({**values, f"{self.prefix}step": step})

    def on_save_committed(self, info: SaveCommittedInfo) -> None:
        self._log(save_metrics(info, self.prefix), training_step(info))

    def on_restored(self, info: RestoredInfo) -> None:
        self._log({f"{self.prefix}restore_seconds": info.seconds}, training_step(info))
