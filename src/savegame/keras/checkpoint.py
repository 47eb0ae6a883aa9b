""":class:`ModelCheckpoint`: a drop-in for ``keras.callbacks.ModelCheckpoint`` that writes savegame
checkpoints (or Keras-native files, atomically, for native suffixes).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import keras
import numpy as np

from savegame._util.logs import warn
from savegame.adapters.keras import (
    KerasState,
)
from savegame.errors import ConfigError
from savegame.keras.backup import (
    BackupAndRestore,
)
from savegame.keras.callback import (
    SavegameCallback,
    event_kwargs,
    siblings,
)
from savegame.keras.files import (
    STATE_ITEM,
    SaveFreq,
    native_kind,
    save_native,
)
from savegame.keras.template import (
    Template,
    metric_names,
    numeric_logs,
    plain_value,
)
from savegame.policies import KeepPolicy, Never, is_better, resolve_mode
from savegame.run.checkpointer import Checkpointer, build_keep_policy

# --------------------------------------------------------------------------------------------------
# ModelCheckpoint


class ModelCheckpoint(SavegameCallback):
    """Drop-in for ``keras.callbacks.ModelCheckpoint`` that writes crash-safe savegame checkpoints.

    Keras's arguments, with Keras's meaning and decisions:

    ``filepath``: where to save (see the module docstring: a template or root for savegame checkpoints,
    or a ``.weights.h5``/``.keras``/``.h5`` path for a Keras-native file). ``monitor``, ``mode``
    (``"auto"`` resolves like Keras: ``*loss`` minimised, otherwise the compiled metric's direction),
    ``verbose``, ``save_best_only`` (save only when ``monitor`` improves strictly on the best so far,
    starting from ``initial_value_threshold``; unlike Keras, a NaN ``monitor`` is never an improvement:
    it warns and does not save, so a NaN at the first epoch does not block every later save),
    ``save_weights_only`` (weights only; otherwise the full
    training state), ``save_freq`` (``"epoch"`` or every N batches, counted like Keras).

    savegame's options (keyword-only):

    ``keep_last`` / ``keep_best`` / ``keep``: retention of savegame checkpoints (the newest N; the best
    K by ``monitor``; any :class:`savegame.policies.KeepPolicy`). Default: every checkpoint for a
    templated ``filepath``, the newest one for a fixed one (what Keras's overwriting leaves), and in every
    case the best. ``resume``: at the start of ``fit``, restore the newest full-state checkpoint of this
    callback and continue from it (needs ``save_weights_only=False``; see also :class:`BackupAndRestore`).
    ``verify``: check hashes when restoring. ``metadata``: JSON-like data stored in every manifest.
    ``every_n_epochs``: with ``save_freq="epoch"``, save at the end of every N-th epoch (1-based: N, 2N...)
    and of the last epoch of ``fit``, instead of every epoch; 0 saves at the end of ``fit`` only. With
    ``keep_best``, an epoch whose ``monitor`` improves on the best so far is saved too, so the best is
    never an epoch that was skipped. (Keras's integer ``save_freq`` counts *batches*.)
    ``strict_monitor``: with ``save_best_only``, a ``monitor`` absent from the logs at the first epoch
    end raises :class:`ConfigError` instead of Keras's behaviour (the warning ``Can save best model only
    with <monitor> available.`` and a save every time, the default).

    The best by ``monitor`` is recorded in the checkpoints whenever ``monitor`` is in the logs, with or
    without ``save_best_only``, so ``load_weights(model, root, which="best")`` finds it and retention
    keeps it.

    Errors are raised early: a malformed or impossible ``filepath`` template at construction; a metric
    placeholder the model does not log at the start of ``fit``; a ``monitor`` absent from the logs at
    the first epoch end when ``keep_best`` (or ``save_best_only`` with ``strict_monitor=True``) needs it.
    Messages contain Keras's own phrases (``Unrecognized save_freq``...) and the errors are
    :class:`ConfigError`, a ``ValueError`` as Keras raises. ``best`` holds the best
    value so far, as in Keras; ``checkpointer`` the underlying :class:`savegame.run.checkpointer.Checkpointer`.
    ``callbacks`` (savegame event callbacks such as :class:`savegame.events.TensorBoardLogger`, not Keras
    callbacks) and ``quiet`` are passed on to it.
    """

    def __init__(
        self,
        filepath: str | os.PathLike[str],
        monitor: str = "val_loss",
        verbose: int = 0,
        save_best_only: bool = False,
        save_weights_only: bool = False,
        mode: str = "auto",
        save_freq: SaveFreq = "epoch",
        initial_value_threshold: float | None = None,
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        keep: KeepPolicy | None = None,
        resume: bool = False,
        verify: bool = True,
        metadata: Mapping[str, Any] | None = None,
        strict_monitor: bool = False,
        every_n_epochs: int = 1,
        callbacks: Iterable[object] | None = None,
        quiet: bool = False,
    ) -> None:
        super().__init__()
        self._events = event_kwargs(callbacks, quiet)
        self.strict_monitor = bool(strict_monitor)
        self.filepath = os.fspath(filepath)
        if mode not in ("auto", "min", "max"):
            warn(f"ModelCheckpoint mode '{mode}' is unknown, fallback to auto mode.", stacklevel=2)
            mode = "auto"
        if save_freq != "epoch" and (isinstance(save_freq, bool) or not isinstance(save_freq, int)):
            raise ConfigError(
                f"ModelCheckpoint: Unrecognized save_freq: {save_freq}. Expected save_freq are 'epoch' or "
                "integer values (a number of batches)"
            )
        if isinstance(save_freq, int) and save_freq < 1:
            raise ConfigError(
                f"ModelCheckpoint: Unrecognized save_freq: {save_freq}. Expected save_freq are 'epoch' or "
                "integer values >= 1 (a number of batches; Keras would save after every batch)"
            )
        self.every_n_epochs = _check_every_n_epochs(every_n_epochs, save_freq=save_freq, save_best_only=save_best_only)
        self.monitor = monitor
        self.verbose = verbose
        self.save_best_only = bool(save_best_only)
        self.save_weights_only = bool(save_weights_only)
        self.mode = mode
        self.save_freq: SaveFreq = save_freq
        self.initial_value_threshold = initial_value_threshold
        self.best: float | None = initial_value_threshold
        self.monitor_op: Literal["less", "greater"] | None = None
        self.native = native_kind(self.filepath)
        if self.native == "weights" and not self.save_weights_only:
            raise ConfigError(
                "ModelCheckpoint: a filepath ending in .weights.h5 holds weights only: pass "
                "save_weights_only=True, or use another filepath (Keras: the filepath provided must end in "
                "`.keras` (Keras model format); savegame also takes a checkpoint root). "
                f"Received: filepath={self.filepath}"
            )
        if self.native in ("keras", "h5") and self.save_weights_only:
            raise ConfigError(
                "ModelCheckpoint: When using `save_weights_only=True` in `ModelCheckpoint`, the filepath provided "
                "must end in `.weights.h5` (Keras weights format) when it is a Keras-native file (or give a "
                f"checkpoint root without .keras/.h5). Received: filepath={self.filepath}"
            )
        self.template = Template(self.filepath, save_freq=save_freq, native=self.native is not None)
        if self.native is not None and (keep_last is not None or keep_best is not None or keep is not None):
            raise ConfigError("ModelCheckpoint: keep_last/keep_best/keep apply to savegame checkpoints, not to "
                              f"Keras-native files ({self.filepath})")
        if resume and (self.native is not None or self.save_weights_only):
            raise ConfigError(
                "ModelCheckpoint: resume=True needs full-state savegame checkpoints: use save_weights_only=False "
                "and a filepath that does not end in .weights.h5/.keras/.h5 (or add BackupAndRestore)"
            )
        if keep is not None and (keep_last is not None or keep_best is not None):
            raise ConfigError("ModelCheckpoint: pass either keep= or keep_last/keep_best, not both")
        if keep_best is not None:
            # validates k and monitor; an "auto" direction may come from the compiled metrics, known later
            build_keep_policy(monitor=monitor, mode="max" if mode == "max" else "min", keep_last=keep_last,
                              keep_best=keep_best)  # fmt: skip
        if keep is None and keep_last is None and keep_best is None and not self.template.templated:
            keep_last = 1
        if keep is None and keep_last is not None:
            build_keep_policy(monitor=None, mode="auto", keep_last=keep_last, keep_best=None)  # validates
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.keep = keep
        self.resume = bool(resume)
        self.verify = bool(verify)
        self.metadata = dict(metadata or {})
        self.checkpointer: Checkpointer | None = None
        self._checked_first_epoch = False
        self.last_saved: str | None = None

    @property
    def state_key(self) -> str:
        return f"ModelCheckpoint:{self.filepath}"

    def callback_state(self) -> dict[str, Any]:
        return {
            "best": None if self.best is None else float(self.best),
            "batches_seen_since_last_saving": self._batches_seen_since_last_saving,
            "last_batch_seen": self._last_batch_seen,
            "monitor_op": self.monitor_op,
            "checked_first_epoch": self._checked_first_epoch,
        }

    def load_callback_state(self, state: Mapping[str, Any]) -> None:
        best = state.get("best")
        self.best = None if best is None else float(best)
        self._batches_seen_since_last_saving = int(state.get("batches_seen_since_last_saving") or 0)
        last = state.get("last_batch_seen")
        self._last_batch_seen = None if last is None else int(last)
        op = state.get("monitor_op")
        if op in ("less", "greater"):
            self.monitor_op = op
        self._checked_first_epoch = bool(state.get("checked_first_epoch"))

    # -- Keras's decision logic (keras/src/callbacks/model_checkpoint.py, monitor_callback.py) ---------

    def _direction(self) -> Literal["less", "greater"] | None:
        """Keras's comparison for ``monitor`` from ``mode`` or, for ``"auto"``, the name (``*loss``) and
        the compiled metrics' directions; None when it cannot be told (yet: metrics not built)."""
        if self.mode == "min":
            return "less"
        if self.mode == "max":
            return "greater"
        name = self.monitor.removeprefix("val_")
        found: Literal["less", "greater"] | None = "less" if name == "loss" else None
        for metric in _compiled_metrics(self.model):
            if metric.name == name and hasattr(metric, "_direction"):
                found = "greater" if metric._direction == "up" else "less"
        return found

    def _set_monitor_op(self) -> None:
        self.monitor_op = self._direction()
        if self.monitor_op is None:
            raise ConfigError(
                f"ModelCheckpoint callback received monitor={self.monitor}, but Keras isn't able to "
                "automatically determine whether that metric should be maximized or minimized. Pass "
                "`mode='max'` in order to monitor based on the highest metric value, or pass `mode='min'` "
                "in order to use the lowest value."
            )

    def _is_improvement(self, current: float, reference: float | None) -> bool:
        if reference is None:
            return True
        if self.monitor_op == "less":
            return bool(np.less(current, reference))
        return bool(np.greater(current, reference))

    def _should_save_on_batch(self, batch: int) -> bool:
        if self.save_freq == "epoch":
            return False
        return self._count_batch(batch, self.save_freq)

    def _should_save_model(self, epoch: int, logs: Mapping[str, Any], where: str) -> bool:
        if not self.save_best_only:
            if self.verbose > 0:
                print(f"\nEpoch {epoch + 1}: saving model to {where}")
            return True
        current = logs.get(self.monitor)
        if current is None:
            warn(f"Can save best model only with {self.monitor} available.", stacklevel=3)
            return True
        value = plain_value(current)
        if not isinstance(value, (int, float)):
            warn(
                f"Can save best model only when `monitor` is a scalar value. Received: {current}. "
                "Falling back to `save_best_only=False`.",
                stacklevel=3,
            )
            return True
        if self.monitor_op is None:
            # Keras resolves the direction at the first epoch end only and crashes (TypeError) on a
            # batch-level comparison before it; resolve it now instead.
            self._set_monitor_op()
        best_str = "None" if self.best is None else f"{self.best:.5f}"
        if math.isnan(value):
            # Keras takes a first NaN as the best, and then no later epoch compares better: every later
            # checkpoint is silently skipped. A NaN is never an improvement here.
            warn(
                f"ModelCheckpoint: {self.monitor} is NaN at epoch {epoch + 1}; not saving {where} (a NaN "
                f"is never an improvement; the best stays {best_str})",
                stacklevel=3,
            )
            return False
        if self._is_improvement(float(value), self.best):
            if self.verbose > 0:
                print(
                    f"\nEpoch {epoch + 1}: {self.monitor} improved from {best_str} to {value:.5f}, "
                    f"saving model to {where}"
                )
            self.best = float(value)
            return True
        if self.verbose > 0:
            print(f"\nEpoch {epoch + 1}: {self.monitor} did not improve from {best_str}")
        return False

    # -- events ----------------------------------------------------------------------------------------

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        model = self.model
        compiled_metrics = getattr(model, "_compile_metrics", None)
        if compiled_metrics is None or getattr(compiled_metrics, "built", False):
            # The metric names are known once the compiled metrics are built (the JAX and torch trainers
            # build them before training; TensorFlow's at the first step, then the first save checks).
            self.template.check_known(metric_names(model))
        if self.native is None:
            self._hold_lock(self.template.root)
            self._open()
            if self.resume and not any(isinstance(cb, BackupAndRestore) for cb in siblings(model, self.params)):
                assert self.checkpointer is not None
                self._resumed_from = self._restore_full(self.checkpointer)
                if self._resumed_from is not None and self.verbose > 0:
                    print(f"Resumed from {self._resumed_from.path} (epoch {self._resumed_from.epoch})")

    def _open(self) -> Checkpointer:
        if self.checkpointer is None:
            # The best by monitor is recorded whether or not it decides the saves (save_best_only), so
            # load_weights(model, root, which="best") finds it; retention never deletes it.
            tracking: str | None = self.monitor
            ranked = self.save_best_only or self.keep_best is not None
            mode: Literal["auto", "min", "max"] = "auto"
            direction = self._direction()
            if direction is not None:
                mode = "min" if direction == "less" else "max"
            else:
                try:
                    mode = resolve_mode(self.monitor, "auto")
                except (ValueError, ConfigError):
                    mode = "auto"
            keep = self.keep
            if keep is None and (self.keep_last is not None or self.keep_best is not None):
                keep = build_keep_policy(
                    monitor=tracking, mode=mode, keep_last=self.keep_last, keep_best=self.keep_best
                )
            metadata = {"keras": {"backend": keras.backend.backend(), "filepath": self.filepath}, **self.metadata}
            try:
                self.checkpointer = Checkpointer(
                    self.template.root, save=Never(), keep=keep, monitor=tracking, mode=mode,
                    threshold=self.initial_value_threshold if ranked else None,
                    rng=False, verify=self.verify, metadata=metadata, lock=False, **self._events,
                )  # fmt: skip
                # logs without the monitor (no validation data) save as Keras does; the callback itself
                # raises where Keras would not cope (keep_best, strict_monitor)
                self.checkpointer._judge_saves = False
            except ConfigError:
                # mode could not be guessed from the name: track nothing rather than guess wrong
                self.checkpointer = Checkpointer(
                    self.template.root, save=Never(), keep=keep, rng=False, verify=self.verify, metadata=metadata,
                    lock=False, **self._events,
                )
        return self.checkpointer

    def _handle_batch_end(self, batch: int, logs: Mapping[str, Any] | None) -> None:
        if self._should_save_on_batch(batch):
            self._save_model(epoch=self._epoch, batch=batch, logs=logs)

    def _handle_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None) -> None:
        if self.monitor_op is None:
            self._set_monitor_op()
        if not self._checked_first_epoch:
            self._checked_first_epoch = True
            needs: str | None = None
            if self.keep_best is not None:
                needs = "keep_best"
            elif self.save_best_only and self.strict_monitor:
                needs = "save_best_only with strict_monitor=True"
            if needs is not None and self.monitor not in (logs or {}):
                # keep_best ranks checkpoints by the monitor: without it, retention could not tell the
                # best, so that is always an error. save_best_only alone does as Keras does (warns and
                # saves) unless strict_monitor=True.
                raise ConfigError(
                    f"ModelCheckpoint: monitor={self.monitor!r} is not in the logs at the end of epoch {epoch + 1} "
                    f"(available: {', '.join(sorted(logs or {})) or 'none'}); {needs} needs it. "
                    "Pass validation_data for val_* metrics, or monitor one of the available keys."
                )
        if self.save_freq == "epoch" and self._epoch_due(epoch, logs):
            self._save_model(epoch=epoch, batch=None, logs=logs)

    def _epoch_due(self, epoch: int, logs: Mapping[str, Any] | None) -> bool:
        """Whether the end of ``epoch`` (0-based) is a save point under ``every_n_epochs``."""
        every, number = self.every_n_epochs, epoch + 1
        if every == 1 or (every and number % every == 0):
            return True
        if number == (self.params or {}).get("epochs"):
            return True  # the end of training is always saved
        return self.keep_best is not None and self._improves(logs)

    def _improves(self, logs: Mapping[str, Any] | None) -> bool:
        """True when ``monitor`` in ``logs`` beats the best recorded so far (or the initial threshold)."""
        checkpointer = self._open()
        value = plain_value((logs or {}).get(self.monitor))
        if checkpointer.mode is None or not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        best = checkpointer.best_value
        return is_better(float(value), best if best is not None else self.initial_value_threshold, checkpointer.mode)

    def _save_model(self, *, epoch: int, batch: int | None, logs: Mapping[str, Any] | None) -> None:
        logs = dict(logs or {})
        name = self.template.format(epoch, batch, logs)
        if self.native is not None:
            where = name
        else:
            where = os.path.join(self.template.root, name) if name else self.template.root
        if not self._should_save_model(epoch, logs, where):
            return
        if self.native is not None:
            dirname = os.path.dirname(name)
            if dirname:
                os.makedirs(dirname, exist_ok=True)
            self.last_saved = save_native(self.model, name)
        else:
            self._save_savegame(epoch=epoch, batch=batch, logs=logs, name=name or None)
        if self.verbose > 0:
            print(f"\nEpoch {epoch + 1}: finished saving model to {self.last_saved}")

    def _save_savegame(self, *, epoch: int, batch: int | None, logs: dict[str, Any], name: str | None) -> None:
        checkpointer = self._open()
        at_epoch_end = batch is None
        self._settle_siblings(batch=batch, epoch=epoch if at_epoch_end else None, logs=logs)
        metrics = numeric_logs(logs)
        if self.save_weights_only:
            state: dict[str, Any] = {
                STATE_ITEM: KerasState(self.model, include_optimizer=False, include_rng=False)
            }
        else:
            state = self._full_state(at_epoch_end=at_epoch_end, logs=logs)
        result = checkpointer.save(
            state,
            name=name,
            epoch=epoch + 1 if at_epoch_end else epoch,
            step=self._step,
            metrics=metrics,
            epoch_end=at_epoch_end,
        )
        self.last_saved = result.path


def _check_every_n_epochs(every: object, *, save_freq: SaveFreq, save_best_only: bool) -> int:
    """``every_n_epochs`` validated: an integer >= 0, only with ``save_freq="epoch"``, not with
    ``save_best_only`` (which saves every improvement and nothing else)."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ConfigError(f"ModelCheckpoint: every_n_epochs must be an integer >= 0, got {every!r}")
    if every != 1 and save_freq != "epoch":
        raise ConfigError(
            f"ModelCheckpoint: every_n_epochs={every} needs save_freq='epoch' (an integer save_freq counts "
            "batches); pass one of the two"
        )
    if every != 1 and save_best_only:
        raise ConfigError(
            f"ModelCheckpoint: every_n_epochs={every} does not combine with save_best_only=True, which saves "
            "every improvement and nothing else; use keep_best=1 to also keep the best"
        )
    return every


def _compiled_metrics(model: Any) -> list[Any]:
    found: list[Any] = []
    for metric in getattr(model, "metrics", []) or []:
        if type(metric).__name__ in ("CompileMetrics", "MetricsList"):
            found.extend(getattr(metric, "metrics", []))
    return found


