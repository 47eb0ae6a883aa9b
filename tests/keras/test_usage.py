"""savegame.keras as a user meets it: real fits of small Dense nets on iris and digits, side by side with
Keras's own callback, resume of the callbacks' state, native files, interop and the errors."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from _kerashelp import arrays, dense_model, iris

import savegame
import savegame.keras as sk
from savegame.adapters.keras import KerasState, seed_generator_variables
from savegame.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    NotACheckpointError,
    StateMismatchError,
)
from savegame.policies import KeepLast, Never
from savegame.run.checkpointer import Checkpointer

BACKEND = keras.backend.backend()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """An iris Dense net after 3 epochs, and a root of full-state checkpoints (best by val_loss) of that fit."""
    keras.utils.set_random_seed(11)
    x, y, xv, yv = iris()
    model = dense_model(dropout=0.2)
    root = tmp_path_factory.mktemp("trained") / "ck"
    ckpt = sk.ModelCheckpoint(str(root), monitor="val_loss", keep_best=1, keep_last=1)
    model.fit(x, y, batch_size=16, epochs=3, validation_data=(xv, yv), callbacks=[ckpt], verbose=0)
    return model, root


# --------------------------------------------------------------------------------------------------
# A real fit, Keras's callback and savegame's side by side


def _normalize(lines: str, roots: dict[str, str]) -> list[str]:
    """Keras's and savegame's verbose lines with the save location replaced by the bare name."""
    out = []
    for line in lines.splitlines():
        line = line.strip()
        if not line.startswith("Epoch ") or "/" in line.split(":")[0]:
            continue  # not a ModelCheckpoint message (progress bars print "Epoch 1/4")
        for root in roots.values():
            line = line.replace(root + os.sep, "")
        out.append(line.replace(".weights.h5", ""))
    return out


@pytest.mark.parametrize(
    "options",
    [
        {"monitor": "loss", "save_best_only": True, "save_freq": 10},  # every 10 batches, spanning epochs
        {"monitor": "val_accuracy", "save_best_only": True, "mode": "max", "initial_value_threshold": 0.7},
        {"monitor": "val_loss", "save_best_only": False, "save_freq": "epoch"},
    ],
    ids=["batches-best-loss", "epoch-best-val_accuracy-threshold", "epoch-every"],
)
def test_real_fit_saves_what_keras_saves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: dict[str, Any]
) -> None:
    keras.utils.set_random_seed(3)
    x, y, xv, yv = iris()
    model = dense_model()
    batch = options.get("save_freq", "epoch") != "epoch"
    name = "m_{epoch:02d}_{batch:03d}_{loss:.4f}" if batch else "m_{epoch:02d}_{val_accuracy:.3f}"
    theirs = keras.callbacks.ModelCheckpoint(str(tmp_path / "k" / f"{name}.weights.h5"), save_weights_only=True,
                                             verbose=1, **options)
    ours = sk.ModelCheckpoint(str(tmp_path / "o" / name), save_weights_only=True, verbose=1, **options)
    model.fit(x, y, batch_size=16, epochs=4, validation_data=(xv, yv), callbacks=[theirs, ours], verbose=0)
    keras_names = sorted(n.removesuffix(".weights.h5") for n in os.listdir(tmp_path / "k"))
    assert ours.checkpointer is not None
    assert sorted(r.name for r in ours.checkpointer.list()) == keras_names
    assert keras_names
    assert ours.best == (None if theirs.best is None else float(theirs.best))
    # the verbose messages are Keras's, line for line (each event printed once by each callback)
    lines = _normalize(capsys.readouterr().out, {"k": str(tmp_path / "k"), "o": str(tmp_path / "o")})
    assert lines and all(count % 2 == 0 for count in Counter(lines).values()), lines
    # the newest checkpoint holds the weights Keras wrote in its newest file
    newest = ours.checkpointer.latest
    assert newest is not None
    other = dense_model()
    other.load_weights(tmp_path / "k" / f"{newest.name}.weights.h5")
    saved = savegame.load(newest.path)["keras"]["model"]
    assert all(np.array_equal(a, b) for a, b in zip(saved.values(), arrays(other.weights)))


# --------------------------------------------------------------------------------------------------
# Resume: the state of the callbacks comes back with the model


def test_backup_resume_restores_best_value_position_and_random_state(tmp_path: Path) -> None:
    keras.utils.set_random_seed(5)
    x, y, xv, yv = iris()
    first = dense_model(dropout=0.3)
    best = sk.ModelCheckpoint(str(tmp_path / "best"), monitor="val_loss", save_best_only=True, save_weights_only=True)
    backup = sk.BackupAndRestore(str(tmp_path / "backup"), delete_checkpoint=False)
    run1 = first.fit(x, y, batch_size=16, epochs=2, validation_data=(xv, yv), callbacks=[backup, best], verbose=0)
    best_after_2 = best.best
    assert best_after_2 == min(run1.history["val_loss"])
    seeds_after_2 = arrays(seed_generator_variables(first))
    weights_after_2 = arrays(first.weights)
    optimizer_after_2 = arrays(first.optimizer.variables)

    seen: dict[str, Any] = {}

    class Probe(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_begin(self, logs: object = None) -> None:
            model = self.model
            seen["best"] = again_best.best
            seen["weights"] = arrays(model.weights)
            seen["optimizer"] = arrays(model.optimizer.variables)
            seen["seeds"] = arrays(seed_generator_variables(model))

        def on_epoch_begin(self, epoch: int, logs: object = None) -> None:
            seen.setdefault("epochs", []).append(epoch)

    keras.utils.set_random_seed(99)
    second = dense_model(dropout=0.3)  # a new process would build the same model; here it is a second copy
    again_best = sk.ModelCheckpoint(str(tmp_path / "best"), monitor="val_loss", save_best_only=True,
                                    save_weights_only=True)
    again = sk.BackupAndRestore(str(tmp_path / "backup"), delete_checkpoint=False)
    run2 = second.fit(x, y, batch_size=16, epochs=4, validation_data=(xv, yv),
                      callbacks=[again, again_best, Probe()], verbose=0)
    assert seen["best"] == best_after_2
    assert seen["epochs"] == [2, 3] and len(run2.history["loss"]) == 2
    assert all(np.array_equal(a, b) for a, b in zip(seen["weights"], weights_after_2))
    assert all(np.array_equal(a.astype("float64"), b.astype("float64"))
               for a, b in zip(seen["optimizer"], optimizer_after_2))
    assert all(np.array_equal(a, b) for a, b in zip(seen["seeds"], seeds_after_2))
    # the best checkpoints of both fits form one history: a new one only when the whole run improved
    assert again_best.best == min(run1.history["val_loss"] + run2.history["val_loss"])
    assert again_best.checkpointer is not None
    newest = again_best.checkpointer.latest
    assert newest is not None and newest.metrics["val_loss"] == again_best.best
    # a completed fit resumes from the backup, then deletes it (delete_checkpoint=True, Keras's default)
    third = sk.BackupAndRestore(str(tmp_path / "backup"))
    second.fit(x, y, batch_size=16, epochs=5, validation_data=(xv, yv), callbacks=[third], verbose=0)
    assert not (tmp_path / "backup").exists()


def test_resume_from_weights_only_checkpoint_is_refused(tmp_path: Path) -> None:
    x, y, _, _ = iris()
    model = dense_model()
    model.fit(x, y, epochs=1, verbose=0,
              callbacks=[sk.ModelCheckpoint(str(tmp_path / "w"), save_weights_only=True, keep_last=2)])
    backup = sk.BackupAndRestore(str(tmp_path / "w"), delete_checkpoint=False)
    with pytest.raises(StateMismatchError, match="save_weights_only"):
        model.fit(x, y, epochs=2, verbose=0, callbacks=[backup])


# --------------------------------------------------------------------------------------------------
# Keras-native files


def test_native_write_failure_keeps_the_previous_file(tmp_path: Path, trained: tuple[Any, Path]) -> None:
    model, _ = trained
    target = tmp_path / "model.weights.h5"
    sk.save_native(model, target)
    before = target.read_bytes()
    original = model.save_weights

    def half_written(path: str, overwrite: bool = True) -> None:
        with open(path, "wb") as handle:
            handle.write(b"\x89HDF partial")
        raise OSError(28, "No space left on device")

    model.save_weights = half_written
    try:
        with pytest.raises(OSError, match="No space"):
            sk.save_native(model, target)
    finally:
        model.save_weights = original
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.weights.h5"]  # no temporary file left behind
    fresh = dense_model(dropout=0.2)
    fresh.load_weights(target)
    assert all(np.array_equal(a, b) for a, b in zip(arrays(model.weights), arrays(fresh.weights)))


def test_native_kinds(tmp_path: Path, trained: tuple[Any, Path]) -> None:
    model, _ = trained
    whole = sk.save_native(model, tmp_path / "sub" / "model.keras")
    loaded = keras.saving.load_model(whole)
    assert all(np.array_equal(a, b) for a, b in zip(arrays(model.weights), arrays(loaded.weights)))
    legacy = sk.save_native(model, tmp_path / "legacy.h5")
    assert os.path.getsize(legacy) > 0
    with pytest.raises(ConfigError, match=r"\.weights\.h5, \.keras or \.h5"):
        sk.save_native(model, tmp_path / "model.ckpt")


# --------------------------------------------------------------------------------------------------
# Interop: load, load_weights(which=...), export, savegame.load(strict=False)


def test_load_weights_best_latest_and_export(tmp_path: Path, trained: tuple[Any, Path]) -> None:
    model, root = trained
    checkpointer = Checkpointer(str(root), save=Never(), rng=False, monitor="val_loss", mode="min")
    best, latest = checkpointer.best, checkpointer.latest
    assert best is not None and latest is not None and latest.epoch == 3
    best_weights = savegame.load(best.path)["keras"]["model"]
    fresh = dense_model(dropout=0.2)
    report = sk.load_weights(fresh, root, which="best")
    assert report is not None and report.clean
    assert all(np.array_equal(a, b) for a, b in zip(best_weights.values(), arrays(fresh.weights)))
    # like Keras's load_weights, the optimizer's variables come back too (the model is compiled)
    sk.load_weights(fresh, root, which="latest")
    assert all(np.array_equal(a, b) for a, b in zip(arrays(model.weights), arrays(fresh.weights)))
    optimizer_pairs = zip(arrays(model.optimizer.variables), arrays(fresh.optimizer.variables))
    assert all(np.array_equal(a.astype("float64"), b.astype("float64")) for a, b in optimizer_pairs)
    # export of the best to a native .weights.h5 that plain Keras reads
    out = sk.export_weights(dense_model(dropout=0.2), root, tmp_path / "export" / "best.weights.h5", which="best")
    plain = dense_model(dropout=0.2)
    plain.load_weights(out)
    assert all(np.array_equal(a, b) for a, b in zip(best_weights.values(), arrays(plain.weights)))


def test_checkpoint_is_numpy_keyed_by_variable_path(trained: tuple[Any, Path]) -> None:
    model, root = trained
    latest = Checkpointer(str(root), save=Never(), rng=False).latest
    assert latest is not None
    raw = savegame.load(latest.path)  # no target: plain data, no Keras object involved
    state = raw["keras"]
    assert list(state["model"]) == [v.path for v in model.weights]
    assert all(type(a) is np.ndarray for a in state["model"].values())
    assert {"iteration", "learning_rate"} <= {k.rsplit("/", 1)[-1] for k in state["optimizer"]}
    assert state["seed_generators"] and state["rng"]["numpy"] is not None  # Dropout's SeedGenerator, global RNGs
    assert raw["fit"]["epoch"] == 3 and raw["fit"]["batch"] == 0


def test_non_strict_load_passes_through_savegame_load_and_checkpointer(
    tmp_path: Path, trained: tuple[Any, Path]
) -> None:
    _, root = trained
    latest = Checkpointer(str(root), save=Never(), rng=False).latest
    assert latest is not None
    wider = dense_model(hidden=24, dropout=0.2)
    before = arrays(wider.weights)
    with pytest.raises(StateMismatchError, match="shape mismatch"):
        savegame.load(latest.path, {"keras": KerasState(wider)})
    assert all(np.array_equal(a, b) for a, b in zip(before, arrays(wider.weights)))  # nothing changed
    report = savegame.load(latest.path, {"keras": (state := KerasState(wider))}, strict=False)
    assert not report.clean and report.mismatched_keys
    assert all(name.startswith("keras.") for name, _, _ in report.mismatched_keys)
    assert state.last_report is not None and state.last_report.loaded  # the last layer's bias matched
    # the Checkpointer passes strict on the same way
    restored = Checkpointer(str(root), save=Never(), rng=False).restore(
        {"keras": KerasState(dense_model(hidden=24, dropout=0.2)), "fit": None}, strict=False
    )
    assert restored is not None and restored.epoch == 3
    # and KerasState(strict=False) is non-strict whatever the caller says
    report = savegame.load(latest.path, {"keras": KerasState(dense_model(hidden=24, dropout=0.2), strict=False)},
                           strict=False)
    assert report.mismatched_keys


# --------------------------------------------------------------------------------------------------
# Bad input: specific CheckpointError subclasses, raised early


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda d: sk.ModelCheckpoint(d + "/m", save_freq=0), ConfigError, "save_freq"),
        (lambda d: sk.ModelCheckpoint(d + "/m", save_freq=True), ConfigError, "save_freq"),
        (lambda d: sk.ModelCheckpoint(d + "/m.weights.h5"), ConfigError, "save_weights_only=True"),
        (lambda d: sk.ModelCheckpoint(d + "/m.weights.h5", save_weights_only=True, keep_last=2), ConfigError,
         "native"),
        (lambda d: sk.ModelCheckpoint(d + "/m", keep_last=2, keep=KeepLast(2)), ConfigError, "either"),
        (lambda d: sk.ModelCheckpoint(d + "/m_{epoch!r}"), ConfigError, "plain name"),
        (lambda d: sk.ModelCheckpoint(d + "/m_{epoch:.2f}_{loss:d}"), ConfigError, "format spec"),
        (lambda d: sk.BackupAndRestore(""), ConfigError, "Empty `backup_dir`"),
        (lambda d: sk.BackupAndRestore(d + "/b", save_freq=0), ConfigError, "save_freq"),
        (lambda d: sk.load_weights(dense_model(), d + "/nothing"), CheckpointNotFoundError, "no such"),
    ],
    ids=["save_freq-0", "save_freq-bool", "weights.h5-full", "keep-native", "keep-and-keep_last", "conversion",
         "int-spec-on-float", "backup-empty", "backup-save_freq", "load-missing"],
)
def test_bad_input_is_a_specific_error(tmp_path: Path, make: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as caught:
        make(str(tmp_path))
    assert isinstance(caught.value, CheckpointError)


def test_load_errors_name_what_is_wrong(tmp_path: Path, trained: tuple[Any, Path]) -> None:
    model, root = trained
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint 'epoch=099'"):
        sk.load_weights(model, root, which="epoch=099")
    plain = tmp_path / "plain"
    savegame.save(plain, {"weights": np.zeros(3)})
    with pytest.raises(NotACheckpointError, match="not a Keras checkpoint"):
        sk.load_weights(model, plain)
    unranked = tmp_path / "unranked"
    x, y, _, _ = iris()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense_model().fit(x, y, epochs=1, verbose=0, callbacks=[sk.ModelCheckpoint(str(unranked))])
    with pytest.raises(CheckpointNotFoundError, match="no best checkpoint"):
        sk.load_weights(model, unranked, which="best")
    # unknown metric placeholder: caught before training (at the first save at the latest)
    ckpt = sk.ModelCheckpoint(str(tmp_path / "t" / "m_{epoch:02d}_{val_acc:.3f}"))
    with pytest.raises(ConfigError, match="val_acc"):
        dense_model().fit(x, y, epochs=1, validation_split=0.2, callbacks=[ckpt], verbose=0)


def test_fit_holds_the_writer_lock_of_its_directory(tmp_path: Path) -> None:
    """While ``fit`` runs, the callbacks hold the directory's writer lock: a fit whose directory another
    process holds fails at once with LockedError naming it; the lock is released at the end of training,
    so another process can take it."""
    import subprocess
    import sys

    from savegame.errors import LockedError
    from savegame.run.lock import WriterLock, read_lock_holder

    worker = Path(__file__).resolve().parents[1] / "crash" / "worker.py"
    x, y, xv, yv = iris()
    model = dense_model()
    busy = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, str(worker), "hold-lock", str(busy)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().startswith("locked")
        for callback in (sk.ModelCheckpoint(str(busy / "m_{epoch}")), sk.BackupAndRestore(str(busy))):
            with pytest.raises(LockedError, match=f"pid {holder.pid}"):
                model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    finally:
        holder.kill()
        holder.wait()
    free = tmp_path / "free"
    checkpoint = sk.ModelCheckpoint(str(free / "m_{epoch}"))
    model.fit(x, y, epochs=1, validation_data=(xv, yv), verbose=0, callbacks=[checkpoint])
    assert read_lock_holder(free) is None  # released at the end of training
    with WriterLock(free):  # and free for anyone
        pass


def test_load_weights_into_an_uncompiled_model_skips_the_optimizer(tmp_path: Path) -> None:
    """The docs say the optimizer variables are restored "when the checkpoint has them and the model is
    compiled"; an uncompiled model got StateMismatchError naming them. Its weights now load."""
    x, y, _, _ = iris()
    model = dense_model()
    model.fit(x, y, epochs=1, verbose=0, callbacks=[sk.ModelCheckpoint(str(tmp_path / "ck"))])
    fresh = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)])
    report = sk.load_weights(fresh, tmp_path / "ck")
    assert report is not None and not report.missing and not report.unexpected
    assert all(np.array_equal(a, b) for a, b in zip(arrays(fresh.weights), arrays(model.weights)))
