""":class:`BackupAndRestore`: a drop-in for ``keras.callbacks.BackupAndRestore`` that resumes an
interrupted ``fit`` exactly (mid-epoch included) from savegame checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import keras

from savegame.errors import ConfigError
from savegame.keras.callback import (
    SavegameCallback,
    event_kwargs,
)
from savegame.keras.files import (
    FIT_ITEM,
    SaveFreq,
)
from savegame.keras.template import (
    numeric_logs,
)
from savegame.policies import Never
from savegame.run.checkpointer import Checkpointer

# --------------------------------------------------------------------------------------------------
# BackupAndRestore


class BackupAndRestore(SavegameCallback):
    """``keras.callbacks.BackupAndRestore``, done fully, with savegame checkpoints.

    Saves the full training state into ``backup_dir`` at the end of every epoch (``save_freq="epoch"``)
    or every N batches; at the start of ``fit`` restores the newest backup: weights, optimizer variables,
    random state, the epoch *and batch* to continue from, and the state of every savegame
    :class:`ModelCheckpoint` of the same ``fit`` (its best value and batch counters). Backups are
    atomic and verified; a damaged newest backup is quarantined and the previous one used.

    ``double_checkpoint``: keep the two newest backups instead of one. ``delete_checkpoint``: remove
    ``backup_dir`` when ``fit`` completes (Keras's default, True). ``save_freq=False`` disables saving
    (restore only). ``verify``: check hashes before restoring. ``callbacks`` (savegame event callbacks,
    :mod:`savegame.events`) and ``quiet`` are passed on to the underlying Checkpointer.
    """

    def __init__(
        self,
        backup_dir: str | os.PathLike[str],
        save_freq: SaveFreq | Literal[False] = "epoch",
        double_checkpoint: bool = False,
        delete_checkpoint: bool = True,
        *,
        verify: bool = True,
        verbose: int = 0,
        callbacks: Iterable[object] | None = None,
        quiet: bool = False,
    ) -> None:
        super().__init__()
        if not backup_dir:
            raise ConfigError(
                "BackupAndRestore: Empty `backup_dir` argument passed (give the directory of the backups)"
            )
        if save_freq is not False and save_freq != "epoch" and (
            isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1
        ):
            raise ConfigError(
                f"BackupAndRestore: Invalid value for argument `save_freq`. Received: save_freq={save_freq}. "
                "Expected either 'epoch', an integer value >= 1 (a number of batches) or False (restore only)."
            )
        self.backup_dir = os.fspath(backup_dir)
        self.save_freq = save_freq
        self.double_checkpoint = bool(double_checkpoint)
        self.delete_checkpoint = bool(delete_checkpoint)
        self.verify = bool(verify)
        self.verbose = verbose
        self.checkpointer = Checkpointer(
            self.backup_dir, save=Never(), keep_last=2 if double_checkpoint else 1, rng=False, verify=verify,
            metadata={"keras": {"backend": keras.backend.backend(), "backup": True}}, lock=False,
            **event_kwargs(callbacks, quiet),
        )  # fmt: skip
        self._batches_seen_since_last_saving = 0
        self._last_batch_seen = 0

    @property
    def state_key(self) -> str:
        return f"BackupAndRestore:{self.backup_dir}"

    def callback_state(self) -> dict[str, Any]:
        return {
            "batches_seen_since_last_saving": self._batches_seen_since_last_saving,
            "last_batch_seen": self._last_batch_seen,
        }

    def load_callback_state(self, state: Mapping[str, Any]) -> None:
        self._batches_seen_since_last_saving = int(state.get("batches_seen_since_last_saving") or 0)
        self._last_batch_seen = int(state.get("last_batch_seen") or 0)

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        model = self.model
        if not getattr(model, "built", False):
            raise ConfigError(
                "BackupAndRestore: the model must be built before fit() (call it on a batch, or use keras.Input)"
            )
        self._hold_lock(self.backup_dir)
        self._resumed_from = self._restore_full(self.checkpointer)
        if self._resumed_from is not None and self.verbose > 0:
            fit_epoch = self._resumed_from.epoch
            print(f"BackupAndRestore: resumed from {self._resumed_from.path} (epoch {fit_epoch})")

    def _should_save_on_batch(self, batch: int) -> bool:
        if self.save_freq == "epoch" or self.save_freq is False:
            return False
        return self._count_batch(batch, self.save_freq)

    def _handle_batch_end(self, batch: int, logs: Mapping[str, Any] | None) -> None:
        if self._should_save_on_batch(batch):
            self._backup(at_epoch_end=False, batch=batch, logs=logs)

    def _handle_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None) -> None:
        self._last_batch_seen = 0
        if self.save_freq == "epoch":
            self._backup(at_epoch_end=True, batch=None, logs=logs)

    def _backup(self, *, at_epoch_end: bool, batch: int | None, logs: Mapping[str, Any] | None) -> None:
        self._settle_siblings(batch=batch, epoch=self._epoch if at_epoch_end else None, logs=logs)
        state = self._full_state(at_epoch_end=at_epoch_end, logs=logs)
        fit = state[FIT_ITEM]
        self.checkpointer.save(
            state, epoch=int(fit["epoch"]), step=self._step, metrics=numeric_logs(logs), epoch_end=at_epoch_end
        )

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        super().on_train_end(logs)
        if self.delete_checkpoint and os.path.isdir(self.backup_dir):
            import shutil

            shutil.rmtree(self.backup_dir)


