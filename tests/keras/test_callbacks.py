"""savegame.keras callbacks: kill-and-resume, Keras-identical save decisions, errors, native files."""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from _kerashelp import ROOT, arrays, conv_model, dense_model, digits, finish, iris, start_script

import savegame
import savegame.keras as sk
from savegame.errors import ConfigError, StateMismatchError

BACKEND = keras.backend.backend()
SCRIPT = ROOT / "tests" / "keras" / "_fit_script.py"


# --------------------------------------------------------------------------------------------------
# SIGKILL part-way, re-run the same script: identical to a run that was never interrupted


def _final(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "final.npz") as data:
        return {k: data[k] for k in data.files}


KILL_SCENARIOS = {
    # name: (arguments of _fit_script.py, training batch after which the first run SIGKILLs itself)
    "BackupAndRestore-every-4-batches-killed-mid-epoch": (("--mode", "backup", "--save-freq", "4"), 15),
    "ModelCheckpoint-resume-per-epoch": (("--mode", "checkpoint", "--save-freq", "epoch"), 12),
}


@pytest.fixture(scope="module")
def kill_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The uninterrupted run and, per scenario, a run killed part-way then re-run with the same command.

    Independent processes run side by side: first the uninterrupted run and the runs that get killed,
    then the re-runs (Keras's import dominates each process's time)."""
    base = tmp_path_factory.mktemp("kill")
    outs = {name: base / f"s{i}" / "run" for i, name in enumerate(["uninterrupted", *KILL_SCENARIOS])}
    for out in outs.values():
        out.parent.mkdir(parents=True)

    def start(name: str, *args: str, log: str) -> Any:
        out = outs[name]
        return start_script(SCRIPT, backend=BACKEND, cwd=out.parent, args=(str(out), *args), log=out.parent / log)

    first = {"uninterrupted": start("uninterrupted", "--mode", "none", log="full.log")}
    for name, (args, kill_at) in KILL_SCENARIOS.items():
        first[name] = start(name, *args, "--kill-at-step", str(kill_at), log="killed.log")
    for name, proc in first.items():
        code, output = finish(proc, outs[name].parent / ("full.log" if name == "uninterrupted" else "killed.log"))
        assert code == (0 if name == "uninterrupted" else -9), f"{name}: {output[-3000:]}"
        if name != "uninterrupted":
            assert not (outs[name] / "final.npz").exists()
    again = {name: start(name, *args, log="resumed.log") for name, (args, _) in KILL_SCENARIOS.items()}
    for name, proc in again.items():
        code, output = finish(proc, outs[name].parent / "resumed.log")
        assert code == 0, f"{name}: {output[-3000:]}"
    return outs


@pytest.mark.subprocess
@pytest.mark.parametrize("scenario", list(KILL_SCENARIOS))
def test_sigkill_then_rerun_equals_uninterrupted(kill_runs: dict[str, Path], scenario: str) -> None:
    full_out, out = kill_runs["uninterrupted"], kill_runs[scenario]
    want, got = _final(full_out), _final(out)
    assert sorted(want) == sorted(got)
    for key in want:
        # bit-exact on every backend: same weights, same optimizer moments and iteration count
        assert want[key].dtype == got[key].dtype and want[key].tobytes() == got[key].tobytes(), key
    # The epochs run after the restart log exactly what the uninterrupted run logged for them.
    full = json.loads((full_out / "history.json").read_text())
    part = json.loads((out / "history.json").read_text())
    assert part["logs"]
    for key, values in part["logs"].items():
        assert values == full["logs"][key][-len(values):], key
    if scenario.startswith("BackupAndRestore"):
        # The ModelCheckpoint of the same fit got its best value back: the best over the whole run.
        assert part["best"] == max(full["logs"]["val_accuracy"])


# --------------------------------------------------------------------------------------------------
# Save decisions equal Keras's own ModelCheckpoint on the same scripted logs


def _scripted_logs(seed: int, epochs: int, batches: int, monitor: str) -> list[tuple[list[dict[str, float]], dict]]:
    rng = random.Random(seed)
    script = []
    for _ in range(epochs):
        batch_logs = [
            {"loss": rng.choice([rng.uniform(0, 2), 1.0]), "accuracy": rng.uniform(0, 1)} for _ in range(batches)
        ]
        value = rng.choice([rng.uniform(0, 2), 0.5, 0.5, float("nan")]) if seed % 3 == 0 else rng.uniform(0, 2)
        epoch_logs = {"loss": rng.uniform(0, 2), "accuracy": rng.uniform(0, 1), monitor: value}
        script.append((batch_logs, epoch_logs))
    return script


CASES = [
    {"monitor": "val_loss", "mode": "auto", "save_best_only": True, "save_freq": "epoch"},
    {"monitor": "val_accuracy", "mode": "max", "save_best_only": True, "save_freq": "epoch"},
    {"monitor": "val_accuracy", "mode": "auto", "save_best_only": True, "save_freq": "epoch"},
    {"monitor": "val_loss", "mode": "min", "save_best_only": True, "save_freq": "epoch",
     "initial_value_threshold": 0.6},
    {"monitor": "val_accuracy", "mode": "max", "save_best_only": True, "save_freq": "epoch",
     "initial_value_threshold": 1.5},
    {"monitor": "val_loss", "mode": "auto", "save_best_only": False, "save_freq": "epoch"},
    {"monitor": "loss", "mode": "auto", "save_best_only": True, "save_freq": 3},
    # Keras crashes (TypeError) on a batch-level comparison before the first epoch end (its monitor_op is
    # set there), so batch saves with a threshold start after epoch 1 here: 6 batches = epoch 2, batch 1.
    {"monitor": "loss", "mode": "min", "save_best_only": True, "save_freq": 6, "initial_value_threshold": 0.9},
    {"monitor": "val_loss", "mode": "auto", "save_best_only": True, "save_freq": 2},  # absent at batch level
    {"monitor": "loss", "mode": "auto", "save_best_only": False, "save_freq": 7},
]


@pytest.fixture(scope="module")
def built_model() -> Any:
    model = conv_model()
    x, y, _, _ = digits(64)
    model.fit(x, y, epochs=0, verbose=0)  # builds the compiled metrics (mode="auto" reads their direction)
    return model


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("seed", [0, 1, 3])
def test_save_decisions_equal_keras(tmp_path: Path, built_model: Any, case: dict[str, Any], seed: int) -> None:
    model = built_model
    saved_method = model.save_weights
    keras_saves: list[tuple[int, int | None]] = []
    where: list[tuple[int, int | None]] = [(0, None)]

    def record(filepath: str, overwrite: bool = True) -> None:
        keras_saves.append(where[0])

    theirs = keras.callbacks.ModelCheckpoint(str(tmp_path / "k" / "m.weights.h5"), save_weights_only=True, **case)
    template = "e{epoch:02d}" if case["save_freq"] == "epoch" else "e{epoch:02d}-b{batch:03d}"
    ours = sk.ModelCheckpoint(str(tmp_path / "ours" / template), save_weights_only=True, **case)
    our_saves: list[tuple[int, int | None]] = []
    original = ours._save_savegame

    def spy(**kwargs: Any) -> None:
        our_saves.append((kwargs["epoch"], kwargs["batch"]))
        original(**kwargs)

    ours._save_savegame = spy  # type: ignore[method-assign]
    model.save_weights = record  # type: ignore[method-assign]
    params = {"epochs": 6, "steps": 5, "verbose": 0}
    for cb in (theirs, ours):
        cb.set_model(model)
        cb.set_params(params)
        cb.on_train_begin()
    def both(event: str, *args: Any) -> bool:
        """Send one event to both; True if both raised ValueError (Keras cannot resolve mode='auto')."""
        outcomes = []
        for cb in (theirs, ours):
            try:
                getattr(cb, event)(*args)
                outcomes.append(None)
            except ValueError as exc:
                outcomes.append(exc)
        assert (outcomes[0] is None) == (outcomes[1] is None), outcomes
        if outcomes[1] is not None:
            assert isinstance(outcomes[1], ConfigError)
        return outcomes[0] is not None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for epoch, (batch_logs, epoch_logs) in enumerate(_scripted_logs(seed, 6, 5, case["monitor"])):
            both("on_epoch_begin", epoch)
            for batch, logs in enumerate(batch_logs):
                where[0] = (epoch, batch)
                both("on_train_batch_begin", batch)
                if both("on_train_batch_end", batch, dict(logs)):
                    model.save_weights = saved_method  # type: ignore[method-assign]
                    return
            where[0] = (epoch, None)
            if both("on_epoch_end", epoch, dict(epoch_logs)):
                model.save_weights = saved_method  # type: ignore[method-assign]
                return
    model.save_weights = saved_method  # type: ignore[method-assign]
    ours._unregister()
    assert our_saves == keras_saves
    assert (theirs.best is None and ours.best is None) or (
        math.isnan(float(theirs.best)) and math.isnan(float(ours.best))
        if theirs.best is not None and math.isnan(float(theirs.best))
        else float(theirs.best) == ours.best
    )
    assert ours.checkpointer is not None and len(ours.checkpointer.list()) == len(keras_saves)


def test_batch_level_threshold_before_first_epoch_end_does_not_crash(tmp_path: Path) -> None:
    ours = sk.ModelCheckpoint(str(tmp_path / "b{epoch}-{batch}"), monitor="loss", save_best_only=True,
                              save_freq=1, initial_value_threshold=0.5, save_weights_only=True)
    model = conv_model()
    model.build((None, 8, 8, 1))
    ours.set_model(model)
    ours.on_train_begin()
    ours.on_epoch_begin(0)
    for batch, loss in enumerate([0.7, 0.4, 0.45, 0.3]):
        ours.on_train_batch_end(batch, {"loss": loss})
    assert ours.best == 0.3
    assert ours.checkpointer is not None and [r.name for r in ours.checkpointer.list()] == ["b1-2", "b1-4"]


# --------------------------------------------------------------------------------------------------
# Clear errors


def test_bad_filepath_templates_fail_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="batch"):
        sk.ModelCheckpoint(str(tmp_path / "m_{epoch:02d}_{batch}"))
    with pytest.raises(ConfigError, match="format spec"):
        sk.ModelCheckpoint(str(tmp_path / "m_{val_loss:d}"))
    with pytest.raises(ConfigError, match="malformed"):
        sk.ModelCheckpoint(str(tmp_path / "m_{epoch"))
    with pytest.raises(ConfigError, match="positional"):
        sk.ModelCheckpoint(str(tmp_path / "m_{}"))
    with pytest.raises(ConfigError, match="last path component"):
        sk.ModelCheckpoint(str(tmp_path / "{epoch}" / "m"))
    with pytest.raises(ConfigError, match="save_freq"):
        sk.ModelCheckpoint(str(tmp_path / "m"), save_freq="batch")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"weights\.h5"):
        sk.ModelCheckpoint(str(tmp_path / "m.keras"), save_weights_only=True)
    with pytest.raises(ConfigError, match="resume"):
        sk.ModelCheckpoint(str(tmp_path / "m"), save_weights_only=True, resume=True)


def test_unknown_metric_placeholder_fails_before_training(tmp_path: Path) -> None:
    x, y, xv, yv = digits(128)
    model = conv_model()
    ckpt = sk.ModelCheckpoint(str(tmp_path / "m_{epoch:02d}_{val_acuracy:.3f}"), monitor="val_accuracy")
    with pytest.raises(ConfigError, match=r"val_acuracy.*val_accuracy"):
        model.fit(x, y, epochs=1, validation_data=(xv, yv), callbacks=[ckpt], verbose=0)
    if BACKEND != "tensorflow":  # TensorFlow builds the metrics at the first step: caught at the first save
        assert ckpt._step == 0  # not a single batch was trained


def test_monitor_absent_at_first_epoch_end_is_a_clear_error_with_strict_monitor(tmp_path: Path) -> None:
    x, y, _, _ = iris()
    model = dense_model()
    ckpt = sk.ModelCheckpoint(str(tmp_path / "best"), monitor="val_accuracy", mode="max", save_best_only=True,
                              strict_monitor=True)
    with pytest.raises(ConfigError, match=r"monitor='val_accuracy' is not in the logs at the end of epoch 1"):
        model.fit(x, y, epochs=2, callbacks=[ckpt], verbose=0)


def test_restore_into_mismatched_model_reports_what_differs(tmp_path: Path) -> None:
    x, y, xv, yv = iris()
    model = dense_model()
    model.fit(x, y, epochs=1, validation_data=(xv, yv), verbose=0,
              callbacks=[sk.ModelCheckpoint(str(tmp_path / "ck"), save_weights_only=True)])
    other = dense_model(units=5, hidden=16, dropout=0.1)
    other.add(keras.layers.Dense(7))
    with pytest.raises(StateMismatchError) as caught:
        sk.load_weights(other, tmp_path / "ck")
    message = str(caught.value)
    assert "missing from the checkpoint" in message and "shape mismatch" in message
    assert "(checkpoint [16, 3] vs model [16, 5])" in message
    report = sk.load_weights(other, tmp_path / "ck", strict=False)
    assert report is not None and report.loaded and not report.clean


# --------------------------------------------------------------------------------------------------
# Writing, loading, exporting


def test_seed000_usage_best_weights_and_load_weights(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    x, y, xv, yv = digits(400)
    model = conv_model()
    path = str(tmp_path / "checkpoints" / "model_weights.ckpt")
    ckpt = sk.ModelCheckpoint(filepath=path, save_weights_only=True, monitor="val_loss", save_best_only=True)
    history = model.fit(x, y, epochs=4, validation_data=(xv, yv), callbacks=[ckpt], verbose=0)
    losses = history.history["val_loss"]
    best_epoch = int(np.argmin(losses)) + 1
    records = ckpt.checkpointer.list() if ckpt.checkpointer else []
    assert records and records[-1].epoch == best_epoch
    assert len(records) <= 2  # keep_last=1 (Keras overwrites one file) plus the best
    fresh = conv_model()
    report = sk.load_weights(fresh, path)
    assert report is not None and report.clean
    manifest = savegame.read_manifest(records[-1].path)
    assert "keras" in manifest.items
    raw = savegame.load(records[-1].path)["keras"]
    assert set(raw) == {"format", "backend", "keras_version", "model"}  # weights only
    for array, live in zip(raw["model"].values(), arrays(fresh.weights)):
        assert np.array_equal(array, live)
    assert np.isclose(fresh.evaluate(xv, yv, verbose=0)[0], min(losses), rtol=1e-4, atol=1e-5)


def test_native_files_are_written_atomically(tmp_path: Path) -> None:
    x, y, xv, yv = iris()
    model = dense_model()
    weights = sk.ModelCheckpoint(str(tmp_path / "w" / "m_{epoch:02d}.weights.h5"), save_weights_only=True)
    whole = sk.ModelCheckpoint(str(tmp_path / "k" / "best.keras"), monitor="val_loss", save_best_only=True)
    model.fit(x, y, epochs=2, validation_data=(xv, yv), callbacks=[weights, whole], verbose=0)
    assert sorted(os.listdir(tmp_path / "w")) == ["m_01.weights.h5", "m_02.weights.h5"]
    assert os.listdir(tmp_path / "k") == ["best.keras"]
    other = dense_model()
    sk.load_weights(other, tmp_path / "w" / "m_02.weights.h5")
    assert all(np.array_equal(a, b) for a, b in zip(arrays(model.weights), arrays(other.weights)))
    loaded = keras.saving.load_model(tmp_path / "k" / "best.keras")
    assert len(loaded.weights) == len(model.weights)


def test_which_best_latest_and_export(tmp_path: Path) -> None:
    keras.utils.set_random_seed(1)
    x, y, xv, yv = digits(400)
    model = conv_model()
    ckpt = sk.ModelCheckpoint(str(tmp_path / "runs" / "digits_{epoch:02d}_{val_accuracy:.3f}"),
                              monitor="val_accuracy", mode="max", keep_best=1, keep_last=1)
    history = model.fit(x, y, epochs=3, validation_data=(xv, yv), callbacks=[ckpt], verbose=0)
    assert ckpt.checkpointer is not None
    best = ckpt.checkpointer.best
    assert best is not None and best.metrics["val_accuracy"] == max(history.history["val_accuracy"])
    latest = ckpt.checkpointer.latest
    assert latest is not None and latest.epoch == 3
    fresh = conv_model()
    sk.load_weights(fresh, tmp_path / "runs", which="best")
    sk.load_weights(fresh, tmp_path / "runs", which=latest.name)
    assert all(np.array_equal(a, b) for a, b in zip(arrays(model.weights), arrays(fresh.weights)))
    out = sk.export_weights(conv_model(), tmp_path / "runs", tmp_path / "export" / "best.weights.h5")
    assert os.path.isfile(out) and not [n for n in os.listdir(tmp_path / "export") if ".tmp-" in n]
    # full-state restore of the latest checkpoint brings the optimizer back too
    again = conv_model()
    report = sk.restore(again, tmp_path / "runs", which="latest")
    assert report.clean
    pairs = zip(arrays(model.optimizer.variables), arrays(again.optimizer.variables))
    assert all(np.array_equal(a, b) for a, b in pairs)


def test_backup_deleted_after_completed_fit_and_initial_epoch_reset(tmp_path: Path) -> None:
    x, y, _, _ = iris()
    model = dense_model()
    backup = sk.BackupAndRestore(str(tmp_path / "backup"))
    history = model.fit(x, y, epochs=2, callbacks=[backup], verbose=0)
    assert len(history.history["loss"]) == 2
    assert not (tmp_path / "backup").exists()
    assert not getattr(model, "_initial_epoch", None)


class _NaNAtFirstEpoch(keras.callbacks.Callback):  # type: ignore[misc]
    """Makes ``val_loss`` NaN at the first epoch end (a diverged first validation), as later callbacks see it."""

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if epoch == 0 and logs is not None:
            logs["val_loss"] = float("nan")


def test_a_nan_monitor_is_never_the_best_with_save_best_only(tmp_path: Path) -> None:
    """Keras records a NaN first value as the best; nothing compares better than NaN, so every later
    epoch would be skipped and the run would end with no checkpoint at all. savegame warns and skips the
    NaN epoch; the later, finite epochs are saved as usual."""
    x, y, xv, yv = iris()
    model = dense_model()
    ckpt = sk.ModelCheckpoint(str(tmp_path / "best"), monitor="val_loss", save_best_only=True,
                              save_weights_only=True)
    with pytest.warns(UserWarning, match=r"val_loss is NaN at epoch 1"):
        model.fit(x, y, epochs=3, validation_data=(xv, yv), callbacks=[_NaNAtFirstEpoch(), ckpt], verbose=0)
    records = ckpt.checkpointer.list() if ckpt.checkpointer else []
    assert records, "no epoch was saved after the NaN"
    assert all(r.epoch != 1 for r in records)
    assert ckpt.best is not None and math.isfinite(ckpt.best)
    assert sk.load_weights(dense_model(), tmp_path / "best") is not None
