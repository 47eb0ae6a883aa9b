"""savegame for Keras 3: a drop-in ``ModelCheckpoint``, ``BackupAndRestore``, ``load_weights``, export.

One-line change for a Keras user::

    from savegame.keras import ModelCheckpoint          # instead of keras.callbacks.ModelCheckpoint
    ckpt = ModelCheckpoint("checkpoints/model_weights.ckpt", monitor="val_loss",
                           save_weights_only=True, save_best_only=True, verbose=1)
    model.fit(x, y, epochs=10, validation_data=(xv, yv), callbacks=[ckpt])
    savegame.keras.load_weights(model, "checkpoints/model_weights.ckpt")

``ModelCheckpoint`` takes every argument of ``keras.callbacks.ModelCheckpoint`` and decides *when* to
save exactly as Keras 3 does (same ``save_freq`` batch counting, same ``monitor``/``mode`` resolution,
same ``initial_value_threshold``, same strict comparison), but writes savegame checkpoints: atomic,
hash-verified, pickle-free directories holding the full training state (weights, optimizer variables,
seed generators and global RNGs, the position in ``fit`` and the callback's best value) or only the
weights with ``save_weights_only=True``. Where the file goes:

* ``filepath`` with placeholders in its last component (``"ckpt/xception_v1_{epoch:02d}_{val_accuracy:.3f}"``):
  the directory part is the checkpoint root and each save is a checkpoint named from the template
  (Keras's formatting: ``epoch`` is 1-based, ``batch`` too, any key of the logs). All are kept unless a
  keep option says otherwise.
* ``filepath`` without placeholders (``"checkpoints/model_weights.ckpt"``): that path is the checkpoint
  root and each save a checkpoint inside it (``epoch=003``...). Keras overwrites one file; savegame keeps
  the newest (``keep_last=1``) and the best, and deletes older ones only after the new one is committed.
* ``filepath`` ending in ``.weights.h5``, ``.keras`` or ``.h5``: the Keras-native file, written
  atomically (temporary file in the same directory, fsync, rename, fsync of the directory).

Automatic resume: ``BackupAndRestore(backup_dir)`` (Keras's callback, done fully) or
``ModelCheckpoint(..., resume=True)``. At the start of ``fit`` the newest checkpoint is restored —
weights, optimizer variables, ``SeedGenerator`` and global RNG state, the best value and batch counters
of every savegame callback of the same ``fit`` — and ``fit`` continues at the saved epoch and, for
checkpoints saved every N batches, at the saved batch (the batches already done are skipped without
training, and the data order of the interrupted epoch is reproduced). A deterministic run interrupted
and resumed ends with the same variables as an uninterrupted one.

Limitations: mid-epoch resume needs a re-iterable input whose order is driven by the global RNGs (NumPy
arrays, ``tf.data`` pipelines without their own state, ``keras.utils.PyDataset`` without hidden state);
callbacks other than savegame's see the skipped batches' ``on_train_batch_*`` calls.
"""

from __future__ import annotations

import math
import os
import string
import uuid
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import keras
import numpy as np

from .adapters.keras import (
    KerasLoadReport,
    KerasState,
    assign_variables,
    capture_global_rng,
    capture_variables,
    restore_global_rng,
)
from .api import load as _load_checkpoint
from .api import read_manifest
from .checkpointer import Checkpointer, RestoredProgress, build_keep_policy
from .errors import CheckpointNotFoundError, ConfigError, NotACheckpointError, StateMismatchError
from .lock import ProcessShare
from .naming import validate_name
from .policies import KeepPolicy, Never, is_better, resolve_mode
from .run_events import EventDispatcher
from .run_index import RunIndex

__all__ = [
    "BackupAndRestore",
    "KerasLoadReport",
    "KerasState",
    "ModelCheckpoint",
    "export_weights",
    "load_weights",
    "restore",
    "save_native",
]

NATIVE_SUFFIXES = (".weights.h5", ".keras", ".h5")
"""File endings that make ``ModelCheckpoint`` write Keras's own format instead of a savegame checkpoint."""

_STATE_ITEM = "keras"
_FIT_ITEM = "fit"
_INT_FIELDS = ("epoch", "batch")

SaveFreq = Literal["epoch"] | int


# --------------------------------------------------------------------------------------------------
# Keras-native files, atomically


def _fsync_dir(directory: str) -> None:
    """fsync a directory so a rename inside it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _native_kind(path: str) -> Literal["weights", "keras", "h5"] | None:
    if path.endswith(".weights.h5"):
        return "weights"
    if path.endswith(".keras"):
        return "keras"
    if path.endswith(".h5"):
        return "h5"
    return None


def save_native(model: Any, path: str | os.PathLike[str]) -> str:
    """Write ``model`` as a Keras-native file, atomically; returns the absolute path.

    ``.weights.h5``: ``model.save_weights``; ``.keras``: ``model.save``; ``.h5``: Keras's legacy HDF5
    ``model.save``. The file is written under a temporary name in the same directory, fsynced, renamed
    over ``path`` and the directory fsynced: a reader sees the old file or the new one, never a partial
    one, and a crash leaves at most a hidden ``.<name>.tmp-*`` file behind.
    """
    full = os.path.abspath(os.fspath(path))
    kind = _native_kind(full)
    if kind is None:
        raise ConfigError(f"save_native: {full!r} must end in .weights.h5, .keras or .h5")
    directory, name = os.path.split(full)
    os.makedirs(directory, exist_ok=True)
    suffix = {"weights": ".weights.h5", "keras": ".keras", "h5": ".h5"}[kind]
    temp = os.path.join(directory, f".{name[: -len(suffix)]}.tmp-{uuid.uuid4().hex[:12]}{suffix}")
    try:
        if kind == "weights":
            model.save_weights(temp, overwrite=True)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Keras warns that .h5 is a legacy format
                model.save(temp, overwrite=True)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, full)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    _fsync_dir(directory)
    return full


# --------------------------------------------------------------------------------------------------
# The filepath template


class _Template:
    """A Keras ``filepath`` checked on construction: placeholders, format specs, where they are."""

    def __init__(self, filepath: str, *, save_freq: SaveFreq, native: bool) -> None:
        self.filepath = filepath
        self.fields: tuple[str, ...] = ()
        fields: list[str] = []
        try:
            parsed = list(string.Formatter().parse(filepath))
        except ValueError as exc:
            raise ConfigError(f"ModelCheckpoint: filepath {filepath!r} has a malformed placeholder ({exc})") from None
        for _, field, spec, conversion in parsed:
            if field is None:
                continue
            if field == "" or field.isdigit():
                raise ConfigError(f"ModelCheckpoint: filepath {filepath!r}: positional placeholders are not allowed")
            if not field.isidentifier() or conversion is not None:
                raise ConfigError(
                    f"ModelCheckpoint: filepath {filepath!r}: placeholder {{{field}}} must be a plain name "
                    "(epoch, batch or a metric from the logs)"
                )
            if field == "batch" and save_freq == "epoch":
                raise ConfigError(
                    f"ModelCheckpoint: filepath {filepath!r}: unknown placeholder {{batch}}: it is only filled "
                    "when save_freq is a number of batches"
                )
            sample: int | float = 1 if field in _INT_FIELDS else 1.5
            try:
                format(sample, spec or "")
            except (TypeError, ValueError) as exc:
                kind = "an integer" if field in _INT_FIELDS else "a float"
                raise ConfigError(
                    f"ModelCheckpoint: filepath {filepath!r}: format spec {spec!r} of {{{field}}} cannot "
                    f"format {kind} ({exc})"
                ) from None
            fields.append(field)
        self.fields = tuple(dict.fromkeys(fields))
        self.metric_fields = tuple(f for f in self.fields if f not in _INT_FIELDS)
        directory, base = os.path.split(filepath)
        self.templated = bool(self.fields)
        if native:
            self.root, self.name = "", filepath
            return
        if any(f"{{{f}" in directory for f in self.fields):
            raise ConfigError(
                f"ModelCheckpoint: filepath {filepath!r}: placeholders are only allowed in the last path "
                "component (the checkpoint name); the directory part is the checkpoint root"
            )
        if self.templated:
            self.root, self.name = directory or ".", base
            sample_name = base.format(**{f: 1 if f in _INT_FIELDS else 1.5 for f in self.fields})
            try:
                validate_name(sample_name)
            except ValueError as exc:
                raise ConfigError(f"ModelCheckpoint: filepath {filepath!r}: {exc}") from None
        else:
            self.root, self.name = filepath, ""

    def check_known(self, known: set[str]) -> None:
        """Refuse metric placeholders that are not among ``known`` (the metric names the model logs)."""
        unknown = [f for f in self.metric_fields if f not in known]
        if unknown:
            raise ConfigError(
                f"ModelCheckpoint: filepath {self.filepath!r}: unknown placeholder(s) "
                f"{', '.join('{' + f + '}' for f in unknown)}; this model logs: {', '.join(sorted(known))} "
                "(plus epoch, and batch when saving every N batches)"
            )

    def format(self, epoch: int, batch: int | None, logs: Mapping[str, Any]) -> str:
        """Keras's formatting: ``epoch + 1``, ``batch + 1`` (batch saves) and the logs."""
        values: dict[str, Any] = {k: _plain(v) for k, v in logs.items()}
        values["epoch"] = epoch + 1
        if batch is not None and "batch" not in logs:
            values["batch"] = batch + 1
        if self.root and not self.templated:
            return ""  # a fixed savegame root: the Checkpointer names the checkpoints
        target = self.name
        try:
            return target.format(**values)
        except KeyError as exc:
            raise ConfigError(
                f'ModelCheckpoint: Failed to format this callback filepath: "{self.filepath}". Reason: {exc} '
                f"is not in the logs (available: {', '.join(sorted(values))})"
            ) from None


def _plain(value: Any) -> Any:
    """A log value as a Python number when it is a scalar (tensors and NumPy scalars included)."""
    if isinstance(value, (int, float, str)):
        return value
    try:
        array = np.asarray(keras.ops.convert_to_numpy(value))
    except Exception:
        return value
    if array.shape == ():
        return array.item()
    return value


def _numeric_logs(logs: Mapping[str, Any] | None) -> dict[str, float]:
    """The logs that are scalar numbers, as floats (what goes into a manifest's metrics)."""
    out: dict[str, float] = {}
    for key, value in (logs or {}).items():
        plain = _plain(value)
        if isinstance(plain, (int, float)) and not isinstance(plain, bool):
            out[str(key)] = float(plain)
    return out


def _metric_names(model: Any) -> set[str]:
    """The names ``fit`` logs for ``model`` (``loss``, compiled metrics), with their ``val_`` twins."""
    names = {"loss"}
    for metric in getattr(model, "metrics", []) or []:
        inner = getattr(metric, "metrics", None)
        if isinstance(inner, list) and type(metric).__name__ in ("CompileMetrics", "MetricsList"):
            names.update(m.name for m in inner)
        else:
            names.add(metric.name)
    names.discard("compile_metrics")
    return names | {f"val_{n}" for n in names}


# --------------------------------------------------------------------------------------------------
# Shared machinery of the savegame callbacks

_REGISTRY: dict[int, list[_SavegameCallback]] = {}


def _siblings(model: Any, params: object = None) -> list[_SavegameCallback]:
    """The savegame callbacks of the same ``fit``: same model, same ``params`` dict (Keras hands one dict
    to all callbacks of a ``fit``), so callbacks left registered by an earlier, crashed ``fit`` are ignored."""
    return [cb for cb in _REGISTRY.get(id(model), []) if cb.params is params]


class _SavegameCallback(keras.callbacks.Callback):  # type: ignore[misc]
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
        for other in _siblings(self.model, self.params):
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
            "logs": _numeric_logs(logs),
            "epoch_rng": self._epoch_rng if mid_epoch else None,
            "metrics": capture_variables(model.metrics_variables) if mid_epoch else None,
            "callbacks": {cb.state_key: cb.callback_state() for cb in _siblings(model, self.params)},
        }
        return {_STATE_ITEM: KerasState(model), _FIT_ITEM: fit}

    def _restore_full(self, checkpointer: Checkpointer) -> RestoredProgress | None:
        """Restore the newest checkpoint of ``checkpointer`` and position ``fit`` after it."""
        model = self.model
        restored = checkpointer.restore({_STATE_ITEM: KerasState(model), _FIT_ITEM: None}, "latest")
        if restored is None:
            return None
        fit = restored.data.get(_FIT_ITEM)
        if not isinstance(fit, Mapping):
            raise StateMismatchError(
                f"{restored.path}: not a full training state (no fit position); it was saved with "
                "save_weights_only=True and cannot be resumed from"
            )
        epoch = int(fit["epoch"])
        batch = int(fit.get("batch") or 0)
        model._initial_epoch = epoch
        callbacks = fit.get("callbacks") or {}
        for cb in _siblings(model, self.params):
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
            for cb in _siblings(model, self.params):
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
            warnings.warn(f"savegame: could not build the metrics to restore them ({exc})", stacklevel=2)
        live = _variables_in_order(model.metrics_variables)
    if len(live) != len(saved):
        warnings.warn(
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


# --------------------------------------------------------------------------------------------------
# ModelCheckpoint


class ModelCheckpoint(_SavegameCallback):
    """Drop-in for ``keras.callbacks.ModelCheckpoint`` that writes crash-safe savegame checkpoints.

    Keras's arguments, with Keras's meaning and decisions:

    ``filepath``: where to save (see the module docstring: a template or root for savegame checkpoints,
    or a ``.weights.h5``/``.keras``/``.h5`` path for a Keras-native file). ``monitor``, ``mode``
    (``"auto"`` resolves like Keras: ``*loss`` minimised, otherwise the compiled metric's direction),
    ``verbose``, ``save_best_only`` (save only when ``monitor`` improves strictly on the best so far,
    starting from ``initial_value_threshold``), ``save_weights_only`` (weights only; otherwise the full
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
    value so far, as in Keras; ``checkpointer`` the underlying :class:`savegame.checkpointer.Checkpointer`.
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
        self._events = _event_kwargs(callbacks, quiet)
        self.strict_monitor = bool(strict_monitor)
        self.filepath = os.fspath(filepath)
        if mode not in ("auto", "min", "max"):
            warnings.warn(f"ModelCheckpoint mode '{mode}' is unknown, fallback to auto mode.", stacklevel=2)
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
        self.native = _native_kind(self.filepath)
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
        self.template = _Template(self.filepath, save_freq=save_freq, native=self.native is not None)
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
            build_keep_policy(monitor=monitor, mode="auto", keep_last=keep_last, keep_best=keep_best)  # validates
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
        self._batches_seen_since_last_saving = 0
        self._last_batch_seen: int | None = None
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
        if self._last_batch_seen is None or batch <= self._last_batch_seen:
            add_batches = batch + 1
        else:
            add_batches = batch - self._last_batch_seen
        self._batches_seen_since_last_saving += add_batches
        self._last_batch_seen = batch
        if self._batches_seen_since_last_saving >= self.save_freq:
            self._batches_seen_since_last_saving = 0
            return True
        return False

    def _should_save_model(self, epoch: int, logs: Mapping[str, Any], where: str) -> bool:
        if not self.save_best_only:
            if self.verbose > 0:
                print(f"\nEpoch {epoch + 1}: saving model to {where}")
            return True
        current = logs.get(self.monitor)
        if current is None:
            warnings.warn(f"Can save best model only with {self.monitor} available.", stacklevel=3)
            return True
        value = _plain(current)
        if not isinstance(value, (int, float)):
            warnings.warn(
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
            self.template.check_known(_metric_names(model))
        if self.native is None:
            self._hold_lock(self.template.root)
            self._open()
            if self.resume and not any(isinstance(cb, BackupAndRestore) for cb in _siblings(model, self.params)):
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
        value = _plain((logs or {}).get(self.monitor))
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
        metrics = _numeric_logs(logs)
        if self.save_weights_only:
            state: dict[str, Any] = {
                _STATE_ITEM: KerasState(self.model, include_optimizer=False, include_rng=False)
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


def _event_kwargs(callbacks: Iterable[object] | None, quiet: bool) -> dict[str, Any]:
    """The ``callbacks=`` / ``quiet=`` passed through to the :class:`Checkpointer` (checked now, not when
    ``fit`` builds it): savegame event callbacks (:mod:`savegame.events`), not Keras callbacks."""
    return {"callbacks": EventDispatcher.of(callbacks).callbacks, "quiet": bool(quiet)}


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


# --------------------------------------------------------------------------------------------------
# BackupAndRestore


class BackupAndRestore(_SavegameCallback):
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
            **_event_kwargs(callbacks, quiet),
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
        if batch <= self._last_batch_seen:
            add_batches = batch + 1
        else:
            add_batches = batch - self._last_batch_seen
        self._batches_seen_since_last_saving += add_batches
        self._last_batch_seen = batch
        if self._batches_seen_since_last_saving >= self.save_freq:
            self._batches_seen_since_last_saving = 0
            return True
        return False

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
        fit = state[_FIT_ITEM]
        self.checkpointer.save(
            state, epoch=int(fit["epoch"]), step=self._step, metrics=_numeric_logs(logs), epoch_end=at_epoch_end
        )

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        super().on_train_end(logs)
        if self.delete_checkpoint and os.path.isdir(self.backup_dir):
            import shutil

            shutil.rmtree(self.backup_dir)


# --------------------------------------------------------------------------------------------------
# Loading and export


def _resolve(path: str | os.PathLike[str], which: str) -> str:
    """The checkpoint directory ``path`` names: a checkpoint, or a root plus ``which`` (``"latest"``,
    ``"best"`` by the monitor and mode its manifests record, or a name; see :class:`RunIndex`).
    Only reads: no lock, no clean-up, nothing written into the root."""
    full = os.path.abspath(os.fspath(path))
    if not os.path.exists(full):
        raise CheckpointNotFoundError(f"{full}: no such checkpoint or checkpoint directory")
    if os.path.isfile(os.path.join(full, "manifest.json")):
        return full
    index = RunIndex.open(full)
    return index.storage.path(index.resolve(which))


def load_weights(
    model: Any,
    path: str | os.PathLike[str],
    *,
    which: str = "latest",
    strict: bool = True,
    include_optimizer: bool = True,
    verify: bool = True,
) -> KerasLoadReport | None:
    """Load weights into ``model`` from a savegame checkpoint or a Keras-native file.

    ``path``: one checkpoint directory; a checkpoint root (what ``ModelCheckpoint``'s ``filepath``
    pointed to: the directory part of a template, or the fixed path) with ``which`` = ``"latest"``,
    ``"best"`` or a checkpoint name; or a ``.weights.h5``/``.keras`` file (``model.load_weights``).
    Like Keras, the optimizer's variables are restored too when the checkpoint has them and the model is
    compiled (``include_optimizer=False`` to skip them); random state is not touched.
    ``strict``: missing/unexpected/shape-mismatched variables raise :class:`StateMismatchError` with a
    report; ``strict=False`` loads what matches. Returns the :class:`KerasLoadReport` (None for native
    files).
    """
    full = os.fspath(path)
    if _native_kind(full) is not None and os.path.isfile(full):
        model.load_weights(full)
        return None
    directory = _resolve(full, which)
    manifest = read_manifest(directory)
    if _STATE_ITEM not in manifest.items:
        raise NotACheckpointError(f"{directory}: not a Keras checkpoint (items: {sorted(manifest.items)})")
    raw = _load_checkpoint(directory, verify=verify)
    state = dict(raw[_STATE_ITEM])
    state.pop("rng", None)
    state.pop("seed_generators", None)
    target = KerasState(model, include_optimizer=include_optimizer and "optimizer" in state, include_rng=False)
    return target.load_state_dict(state, strict=strict)


def restore(
    model: Any, path: str | os.PathLike[str], *, which: str = "latest", strict: bool = True, verify: bool = True
) -> KerasLoadReport:
    """Restore the full training state (weights, optimizer, random state) of a checkpoint into ``model``."""
    directory = _resolve(path, which)
    raw = _load_checkpoint(directory, verify=verify)
    if _STATE_ITEM not in raw:
        raise NotACheckpointError(f"{directory}: not a Keras checkpoint (items: {sorted(raw)})")
    return KerasState(model).load_state_dict(raw[_STATE_ITEM], strict=strict)


def export_weights(
    model: Any,
    checkpoint: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    which: str = "best",
    strict: bool = True,
) -> str:
    """Load ``checkpoint`` (a checkpoint or a root plus ``which``) into ``model`` and write a native file.

    ``destination`` ends in ``.weights.h5`` (weights, and optimizer variables when compiled, as Keras
    writes them) or ``.keras`` (the whole model). Written atomically; returns its absolute path.
    """
    try:
        load_weights(model, checkpoint, which=which, strict=strict)
    except CheckpointNotFoundError:
        if which != "best":
            raise
        load_weights(model, checkpoint, which="latest", strict=strict)
    return save_native(model, destination)

