"""savegame.keras as a drop-in for Keras's callbacks: Keras's error phrases, Keras's behaviour when the
monitor is missing (strict error on request), the best recorded without save_best_only, and
``every_n_epochs`` (intervals in epochs, where Keras's integer ``save_freq`` counts batches)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from _kerashelp import EpochRecorder, arrays, dense_model, iris

import savegame.keras as sk
from savegame.errors import CheckpointError, ConfigError


def _error(make: Any) -> Exception:
    try:
        make()
    except Exception as exc:  # the test compares what each library raises
        return exc
    raise AssertionError("no error raised")


@pytest.mark.parametrize(
    ("theirs", "ours", "phrase"),
    [
        (lambda d: keras.callbacks.ModelCheckpoint(d + "/m.keras", save_freq="batch"),
         lambda d: sk.ModelCheckpoint(d + "/m", save_freq="batch"), "Unrecognized save_freq: batch"),
        (lambda d: keras.callbacks.ModelCheckpoint(d + "/m.keras", save_freq=1.5),
         lambda d: sk.ModelCheckpoint(d + "/m", save_freq=1.5), "Unrecognized save_freq"),
        (lambda d: keras.callbacks.BackupAndRestore(""), lambda d: sk.BackupAndRestore(""),
         "Empty `backup_dir` argument passed"),
        (lambda d: keras.callbacks.BackupAndRestore(d + "/b", save_freq="batch"),
         lambda d: sk.BackupAndRestore(d + "/b", save_freq="batch"), "Invalid value for argument `save_freq`"),
        (lambda d: keras.callbacks.ModelCheckpoint(d + "/m.keras", save_weights_only=True),
         lambda d: sk.ModelCheckpoint(d + "/m.keras", save_weights_only=True),
         "the filepath provided must end in `.weights.h5`"),
    ],
    ids=["save_freq-str", "save_freq-float", "backup-empty", "backup-save_freq", "weights-only-keras"],
)
def test_errors_contain_keras_phrases(tmp_path: Path, theirs: Any, ours: Any, phrase: str) -> None:
    keras_error = _error(lambda: theirs(str(tmp_path)))
    our_error = _error(lambda: ours(str(tmp_path)))
    assert isinstance(keras_error, ValueError) and phrase in str(keras_error)  # the phrase is Keras's own
    assert isinstance(our_error, ConfigError) and isinstance(our_error, CheckpointError)
    assert isinstance(our_error, ValueError)  # `except ValueError` written for Keras still catches it
    assert phrase in str(our_error), str(our_error)


def test_auto_mode_error_has_keras_text(tmp_path: Path) -> None:
    model = dense_model()
    x, y, _, _ = iris()
    model.fit(x, y, epochs=0, verbose=0)  # builds the compiled metrics
    theirs = keras.callbacks.ModelCheckpoint(str(tmp_path / "m.keras"), monitor="val_mystery")
    ours = sk.ModelCheckpoint(str(tmp_path / "m"), monitor="val_mystery")
    for cb in (theirs, ours):
        cb.set_model(model)
    keras_error = _error(theirs._set_monitor_op)
    our_error = _error(ours._set_monitor_op)
    ours._unregister()
    assert isinstance(our_error, ConfigError)
    assert str(our_error) == str(keras_error)


def test_missing_monitor_with_save_best_only_warns_and_saves_like_keras(tmp_path: Path) -> None:
    """No validation data, monitor='val_loss', save_best_only=True: Keras warns each epoch and saves."""
    x, y, _, _ = iris()
    model = dense_model()
    theirs = keras.callbacks.ModelCheckpoint(str(tmp_path / "k.weights.h5"), save_weights_only=True,
                                             save_best_only=True)
    ours = sk.ModelCheckpoint(str(tmp_path / "ours_{epoch}"), save_weights_only=True, save_best_only=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, epochs=3, verbose=0, callbacks=[theirs, ours])
    texts = [str(w.message) for w in caught if "Can save best model only" in str(w.message)]
    assert texts.count("Can save best model only with val_loss available.") == 6  # 3 from each, same text
    assert ours.checkpointer is not None
    assert [r.name for r in ours.checkpointer.list()] == ["ours_1", "ours_2", "ours_3"]  # saved every epoch
    assert (tmp_path / "k.weights.h5").is_file()


def test_keep_best_still_needs_the_monitor(tmp_path: Path) -> None:
    """keep_best ranks checkpoints by the monitor: without it retention cannot tell the best (an error)."""
    x, y, _, _ = iris()
    ckpt = sk.ModelCheckpoint(str(tmp_path / "m_{epoch}"), keep_best=1)
    with pytest.raises(ConfigError, match="keep_best needs it"):
        dense_model().fit(x, y, epochs=1, verbose=0, callbacks=[ckpt])


def _agreement_model() -> Any:
    """The dense model compiled with a custom metric whose name tells no direction (``agreement``)."""
    model = dense_model()

    def agreement(y_true: Any, y_pred: Any) -> Any:
        hit = keras.ops.equal(keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"),
                              keras.ops.cast(keras.ops.argmax(y_pred, axis=-1), "int32"))  # fmt: skip
        return keras.ops.cast(hit, "float32")

    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.MeanMetricWrapper(agreement, name="agreement")])  # fmt: skip
    return model


def test_keep_best_by_a_custom_metric_honours_mode_and_refuses_to_guess(tmp_path: Path) -> None:
    """keep_best with ``monitor="val_agreement"`` (a name that tells no direction): ``mode="max"`` keeps the
    highest; ``mode="auto"`` raises ConfigError asking for a mode instead of ranking it as a loss (which
    kept the worst epoch as the best and let retention delete the real one)."""
    keras.utils.set_random_seed(3)
    x, y, xv, yv = iris()
    ckpt = sk.ModelCheckpoint(str(tmp_path / "m_{epoch}"), monitor="val_agreement", mode="max", keep_best=1,
                              keep_last=1)  # fmt: skip
    seen = EpochRecorder()
    _agreement_model().fit(x, y, batch_size=16, epochs=5, validation_data=(xv, yv), callbacks=[ckpt, seen],
                           verbose=0)  # fmt: skip
    values = [logs["val_agreement"] for logs in seen.logs]
    best_epoch = int(np.argmax(values)) + 1
    assert ckpt.checkpointer is not None and ckpt.checkpointer.best is not None
    assert ckpt.checkpointer.best.epoch == best_epoch
    assert f"m_{best_epoch}" in [r.name for r in ckpt.checkpointer.list()]
    guess = sk.ModelCheckpoint(str(tmp_path / "g_{epoch}"), monitor="val_agreement", keep_best=1)
    with pytest.raises(ConfigError, match=r"'val_agreement'.*pass mode='min' or mode='max'"):
        _agreement_model().fit(x, y, epochs=1, validation_data=(xv, yv), callbacks=[guess], verbose=0)


@pytest.mark.parametrize("fixed_root", [True, False], ids=["fixed-root", "template"])
def test_monitor_without_save_best_only_records_the_best(tmp_path: Path, fixed_root: bool) -> None:
    keras.utils.set_random_seed(5)
    x, y, xv, yv = iris()
    model = dense_model(dropout=0.3)
    root = tmp_path / "ck"
    ckpt = sk.ModelCheckpoint(str(root if fixed_root else root / "m_{epoch:02d}"), monitor="val_accuracy",
                              mode="max", save_weights_only=True)
    seen = EpochRecorder()
    model.fit(x, y, batch_size=16, epochs=6, validation_data=(xv, yv), callbacks=[ckpt, seen], verbose=0)
    accuracies = [logs["val_accuracy"] for logs in seen.logs]
    best_epoch = int(np.argmax(accuracies))  # the first epoch reaching the maximum (strict improvement)
    fresh = dense_model(dropout=0.3)
    sk.load_weights(fresh, root, which="best")
    loaded = arrays(fresh.weights)
    assert all(np.array_equal(a, b) for a, b in zip(loaded, seen.weights[best_epoch]))
    assert ckpt.checkpointer is not None and ckpt.checkpointer.best is not None
    assert ckpt.checkpointer.best.epoch == best_epoch + 1
    names = [r.name for r in ckpt.checkpointer.list()]
    assert len(names) == (6 if not fixed_root else (1 if best_epoch == 5 else 2))  # newest + best kept


def test_every_n_epochs_saves_every_nth_and_the_last_epoch(tmp_path: Path) -> None:
    x, y, xv, yv = iris()
    ckpt = sk.ModelCheckpoint(str(tmp_path / "m_{epoch}"), every_n_epochs=2)
    dense_model().fit(x, y, epochs=5, validation_data=(xv, yv), verbose=0, callbacks=[ckpt])
    assert ckpt.checkpointer is not None
    assert [r.name for r in ckpt.checkpointer.list()] == ["m_2", "m_4", "m_5"]
    only_end = sk.ModelCheckpoint(str(tmp_path / "end" / "end_{epoch}"), every_n_epochs=0)
    dense_model().fit(x, y, epochs=3, validation_data=(xv, yv), verbose=0, callbacks=[only_end])
    assert only_end.checkpointer is not None and [r.name for r in only_end.checkpointer.list()] == ["end_3"]


def test_every_n_epochs_with_keep_best_saves_improvements_too(tmp_path: Path) -> None:
    keras.utils.set_random_seed(2)
    x, y, xv, yv = iris()
    seen = EpochRecorder()
    ckpt = sk.ModelCheckpoint(str(tmp_path / "m_{epoch}"), monitor="val_loss", every_n_epochs=3, keep_best=1,
                              keep_last=10)
    dense_model().fit(x, y, epochs=5, validation_data=(xv, yv), verbose=0, callbacks=[ckpt, seen])
    losses = [logs["val_loss"] for logs in seen.logs]
    improved = [i + 1 for i, v in enumerate(losses) if v < min(losses[:i], default=float("inf"))]
    assert ckpt.checkpointer is not None and ckpt.checkpointer.best is not None
    assert ckpt.checkpointer.best.epoch == int(np.argmin(losses)) + 1
    saved = {r.epoch for r in ckpt.checkpointer.list()}
    assert {3, 5, int(np.argmin(losses)) + 1} <= saved <= {3, 5, *improved}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_epochs": -1}, "every_n_epochs must be an integer >= 0"),
        ({"every_n_epochs": True}, "every_n_epochs must be an integer >= 0"),
        ({"every_n_epochs": 2, "save_freq": 10}, "needs save_freq='epoch'"),
        ({"every_n_epochs": 2, "save_best_only": True}, "does not combine with save_best_only"),
    ],
)
def test_every_n_epochs_bad_values(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        sk.ModelCheckpoint(str(tmp_path / "m"), **kwargs)
