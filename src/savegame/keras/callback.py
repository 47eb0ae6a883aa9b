"""What the savegame Keras callbacks share: the Checkpointer they drive, capturing and restoring a model's
variables and metrics, and skipping the batches of an interrupted epoch on resume.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import keras

from savegame._util.logs import warn
from savegame.adapters.keras import (
    KerasState,
    assign_variables,
    capture_global_rng,
    capture_variables,
    restore_global_rng,
)
from savegame.errors import StateMismatchError
from savegame.keras.files import (
    FIT_ITEM,
    STATE_ITEM,
)
from savegame.keras.template import (
    numeric_logs,
)
from savegame.run.checkpointer import Checkpointer, RestoredProgress
from savegame.run.events import EventDispatcher
from savegame.run.lock import ProcessShare

# --------------------------------------------------------------------------------------------------
# Shared machinery of the savegame callbacks

_REGISTRY: dict[int, list[SavegameCallback]] = {}


def siblings(model: Any, params: object = None) -> list[SavegameCallback]:
    """The savegame callbacks of the same ``fit``: same model, same ``params`` dict (Keras hands one dict
    to all callbacks of a ``fit``), so callbacks left registered by an earlier, crashed ``fit`` are ignored."""
    return [cb for cb in _REGISTRY.get(id(model), []) if cb.params is params]


class SavegameCallback(keras.callbacks.Callback):  # type: ignore[misc]
    """Position tracking, callback-state capture and resume, shared by ModelCheckpoint and BackupAndRestore.

    Keras calls callbacks in list order; when one savegame callback saves, it first lets the others
    process the current event (each handles every event once), so the state it captures from them is
    the state they have *after* that batch or epoch — the state an uninterrupted run continues from.
    """

    def __init__(self) -> None:
        super().__init__()
        self._epoch = 0
        self._batch_in_epoch = 0
        self._step = 0
        self._epoch_rng: dict[str, Any] | None = None
        self._skipping = 0
        self._handled_batch: tuple[int, int] | None = None
        self._handled_epoch: int | None = None
        self._resumed_from: RestoredProgress | None = None
        self._lock: ProcessShare | None = None
        self._batches_seen_since_last_saving = 0
        self._last_batch_seen: int | None = None

    def _count_batch(self, batch: int, save_freq: int) -> bool:
        """Keras's ``save_freq=N`` rule, which both callbacks follow to the letter: count the batches
        since the last save (a batch index not past the last one seen starts a new epoch) and say
        whether N were reached (the count then starts again)."""
        last = self._last_batch_seen
        self._batches_seen_since_last_saving += batch + 1 if last is None or batch <= last else batch - last
        self._last_batch_seen = batch
        if self._batches_seen_since_last_saving >= save_freq:
            self._batches_seen_since_last_saving = 0
            return True
        return False

    def _hold_lock(self, directory: str) -> None:
        """Hold the writer lock of ``directory`` while ``fit`` runs, so a second training *process*
        writing there fails at once with :class:`~savegame.errors.LockedError` (callbacks of this
        process share it). Released at the end of training."""
        if self._lock is None:
            self._lock = ProcessShare(directory)

    def _release_lock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    # -- identity and registration -------------------------------------------------------------

    @property
    def state_key(self) -> str:
        """Stable key of this callback's state inside a checkpoint (same script, same key)."""
        raise NotImplementedError

    def set_model(self, model: Any) -> None:
        super().set_model(model)
        entry = _REGISTRY.setdefault(id(model), [])
        if self not in entry:
            entry.append(self)

    def _unregister(self) -> None:
        model = getattr(self, "_model", None)
        if model is None:
            return
        entry = _REGISTRY.get(id(model), [])
        if self in entry:
            entry.remove(self)
        if not entry:
            _REGISTRY.pop(id(model), None)

    # -- own state ----------------------------------------------------------------------------------

    def callback_state(self) -> dict[str, Any]:
        """What this callback must remember across a restart (JSON-like)."""
        return {}

    def load_callback_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`callback_state`."""

    # -- event handling, once per event ----------------------------------------------------------

    def _handle_batch_end(self, batch: int, logs: Mapping[str, Any] | None) -> None:
        """The callback's own batch-end logic (called once per batch)."""

    def _handle_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None) -> None:
        """The callback's own epoch-end logic (called once per epoch)."""

    def _process_batch(self, batch: int, logs: Mapping[str, Any] | None) -> None:
        if self._handled_batch == (self._epoch, batch):
            return
        self._handled_batch = (self._epoch, batch)
        self._batch_in_epoch = batch + 1
        self._step += 1
        self._handle_batch_end(batch, logs)

    def _process_epoch(self, epoch: int, logs: Mapping[str, Any] | None) -> None:
        if self._handled_epoch == epoch:
            return
        self._handled_epoch = epoch
        self._handle_epoch_end(epoch, logs)

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        if self._skipping > 0:
            return
        self._process_batch(batch, logs)

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._epoch = epoch
        self._batch_in_epoch = 0
        if self._skipping > 0:
            self._batch_in_epoch = self._skipping_start
            self._epoch_rng = self._resume_epoch_rng
        else:
            self._epoch_rng = capture_global_rng()

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._process_epoch(epoch, logs)

    def _settle_siblings(self, *, batch: int | None, epoch: int | None, logs: Mapping[str, Any] | None) -> None:
        for other in siblings(self.model, self.params):
            if other is self:
                continue
            if batch is not None:
                other._process_batch(batch, logs)
            if epoch is not None:
                other._process_epoch(epoch, logs)

    # -- full state ----------------------------------------------------------------------------------

    def _full_state(self, *, at_epoch_end: bool, logs: Mapping[str, Any] | None) -> dict[str, Any]:
        """The items of a full-state checkpoint at the current position."""
        model = self.model
        mid_epoch = not at_epoch_end and self._batch_in_epoch > 0
        fit: dict[str, Any] = {
            "epoch": self._epoch + 1 if at_epoch_end else self._epoch,
            "batch": 0 if at_epoch_end else self._batch_in_epoch,
            "step": self._step,
            "logs": numeric_logs(logs),
            "epoch_rng": self._epoch_rng if mid_epoch else None,
            "metrics": capture_variables(model.metrics_variables) if mid_epoch else None,
            "callbacks": {cb.state_key: cb.callback_state() for cb in siblings(model, self.params)},
        }
        return {STATE_ITEM: KerasState(model), FIT_ITEM: fit}

    def _restore_full(self, checkpointer: Checkpointer) -> RestoredProgress | None:
        """Restore the newest checkpoint of ``checkpointer`` and position ``fit`` after it."""
        model = self.model
        restored = checkpointer.restore({STATE_ITEM: KerasState(model), FIT_ITEM: None}, "latest")
        if restored is None:
            return None
        fit = restored.data.get(FIT_ITEM)
        if not isinstance(fit, Mapping):
            raise StateMismatchError(
                f"{restored.path}: not a full training state (no fit position); it was saved with "
                "save_weights_only=True and cannot be resumed from"
            )
        epoch = int(fit["epoch"])
        batch = int(fit.get("batch") or 0)
        model._initial_epoch = epoch
        callbacks = fit.get("callbacks") or {}
        for cb in siblings(model, self.params):
            cb._step = int(fit.get("step") or 0)
            cb._epoch = epoch
            if cb.state_key in callbacks:
                cb.load_callback_state(callbacks[cb.state_key])
        if batch > 0:
            epoch_rng = fit.get("epoch_rng")
            current_rng: dict[str, Any] | None = None
            if isinstance(epoch_rng, Mapping):
                # The data order of the interrupted epoch was drawn from the global RNGs as they were when
                # it began: rewind them until the input pipeline has drawn it (first skipped step), then
                # put back their state at the save (torch's dropout, for one, draws from them every step).
                current_rng = {k: v for k, v in capture_global_rng().items() if k != "keras_global"}
                restore_global_rng({k: v for k, v in epoch_rng.items() if k != "keras_global"})
            metrics = fit.get("metrics")
            _skip_batches(
                model, batch, dict(fit.get("logs") or {}),
                metrics if isinstance(metrics, Mapping) else None, current_rng,
            )  # fmt: skip
            for cb in siblings(model, self.params):
                cb._skipping = batch
                cb._skipping_start = batch
                cb._resume_epoch_rng = dict(epoch_rng) if isinstance(epoch_rng, Mapping) else None
                cb._handled_batch = None
        return restored

    def on_train_batch_begin(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        if self._skipping > 0 and batch >= self._skipping_start:
            self._skipping = 0

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        model = getattr(self, "_model", None)
        if model is not None and self._resumed_from is not None:
            model._initial_epoch = None  # a later fit() must not start at the resumed epoch again
        self._resumed_from = None
        self._unregister()
        self._release_lock()

    _skipping_start = 0
    _resume_epoch_rng: dict[str, Any] | None = None


def _variables_in_order(variables: Any) -> list[Any]:
    seen: set[int] = set()
    out = []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def _restore_metrics(model: Any, batch: Any, saved: Mapping[str, Any]) -> None:
    """Give the metrics the partial sums of the interrupted epoch (building them first if needed).

    Compiled metrics create their variables lazily at the first training step on some backends; Keras's
    own symbolic build creates them from a batch without computing anything.
    """
    live = _variables_in_order(model.metrics_variables)
    if len(live) != len(saved):
        try:
            model._symbolic_build(data_batch=batch)
        except Exception as exc:  # private Keras API: degrade to a warning, never break the run
            warn(f"savegame: could not build the metrics to restore them ({exc})", stacklevel=2)
        live = _variables_in_order(model.metrics_variables)
    if len(live) != len(saved):
        warn(
            "savegame: the metrics of the resumed epoch could not be restored (the model has "
            f"{len(live)} metric variables, the checkpoint {len(saved)}); epoch logs cover the remaining batches",
            stacklevel=2,
        )
        return
    assign_variables(list(zip(live, saved.values())))


def _skip_batches(
    model: Any,
    count: int,
    logs: dict[str, float],
    metrics: Mapping[str, Any] | None,
    rng_after_first_batch: Mapping[str, Any] | None,
) -> None:
    """Make the next ``count`` training steps of ``fit`` consume their batch without training.

    Keras's ``fit`` has no way to start inside an epoch; its loop calls ``model.train_function`` once
    per step, so for the first ``count`` steps it is replaced by a function that only takes the batch
    from the iterator (TensorFlow, JAX) or ignores it (torch, where the loop fetched it), then the real
    function is put back. At the first skipped step (once the input pipeline has drawn the epoch's
    order) the global RNGs are set to ``rng_after_first_batch`` and the metrics get back their partial sums.
    """
    original = model.train_function
    backend = keras.backend.backend()
    per_call = max(1, int(getattr(model, "steps_per_execution", 1) or 1))
    remaining = [max(0, math.ceil(count / per_call))]
    pending = [dict(metrics) if metrics else None]
    rng = [dict(rng_after_first_batch) if rng_after_first_batch else None]

    def settle_rng() -> None:
        if rng[0] is not None:
            restore_global_rng(rng[0])
            rng[0] = None

    def consume(iterator: Any) -> Any:
        last = None
        for _ in range(per_call):
            try:
                last = next(iterator)
            except StopIteration:
                break
            except Exception as exc:  # TensorFlow signals the end with OutOfRangeError
                if type(exc).__name__ == "OutOfRangeError":
                    break
                raise
        return last

    def skipping(*args: Any) -> Any:
        if remaining[0] <= 0:
            model.train_function = original
            return original(*args)
        remaining[0] -= 1
        if remaining[0] == 0:
            model.train_function = original
        if backend == "jax":
            state, iterator = args
            batch = consume(iterator)
            settle_rng()
            if pending[0] is not None:
                # The trainer holds the values (the variables were emptied): write them back, fix the
                # metrics, and make the trainer read everything again at its next step.
                names = ("trainable_variables", "non_trainable_variables", "optimizer_variables", "metrics_variables")
                model._jax_state = dict(zip(names, state))
                model._jax_state_synced = False
                model.jax_state_sync()
                _restore_metrics(model, batch, pending[0])
                pending[0] = None
                model._jax_state_synced = True
            return dict(logs), state
        if backend == "tensorflow":
            batch = consume(args[0])
        else:
            data = args[0]
            batch = data[0] if isinstance(data, list) and data else data
        settle_rng()
        if pending[0] is not None and batch is not None:
            _restore_metrics(model, batch, pending[0])
            pending[0] = None
        return dict(logs)

    if remaining[0] > 0:
        model.train_function = skipping


def event_kwargs(callbacks: Iterable[object] | None, quiet: bool) -> dict[str, Any]:
    """The ``callbacks=`` / ``quiet=`` passed through to the :class:`Checkpointer` (checked now, not when
    ``fit`` builds it): savegame event callbacks (:mod:`savegame.events`), not Keras callbacks."""
    return {"callbacks": EventDispatcher.of(callbacks).callbacks, "quiet": bool(quiet)}
