"""KerasState: capture and restore of a Keras 3 model's full training state (runs once per backend)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest
from _kerashelp import BACKENDS, arrays, conv_model, digits, max_abs_diff, run_python

import savegame
from savegame.adapters.keras import KerasLoadReport, KerasState, _key_variables
from savegame.errors import StateMismatchError

BACKEND = keras.backend.backend()


def _trained(epochs: int = 1, **kwargs: object) -> keras.Model:
    keras.utils.set_random_seed(7)
    x, y, _, _ = digits(320)
    model = conv_model(**kwargs)
    model.fit(x, y, batch_size=32, epochs=epochs, verbose=0)
    return model


@pytest.fixture(scope="module")
def trained() -> keras.Model:
    """One trained conv net shared by the tests that only read it (or load its own state back into it)."""
    return _trained()


def _all_variables(model: keras.Model) -> list[np.ndarray]:
    from savegame.adapters.keras import seed_generator_variables

    return arrays(model.weights) + arrays(model.optimizer.variables) + arrays(seed_generator_variables(model))


def test_round_trip_into_fresh_model_is_exact(tmp_path: Path, trained: keras.Model) -> None:
    model = trained
    savegame.save(tmp_path / "ck", {"keras": KerasState(model)})
    fresh = conv_model()  # built in the same process: its layers are named dense_3... (structural match)
    assert not fresh.optimizer.built
    report = savegame.load(tmp_path / "ck", {"keras": (state := KerasState(fresh))})
    assert report.clean
    assert state.last_report is not None and state.last_report.clean
    assert "model" in state.last_report.by_structure
    before, after = _all_variables(model), _all_variables(fresh)
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert a.shape == b.shape and np.array_equal(a, b)


def test_state_is_plain_numpy_and_readable_without_keras(tmp_path: Path, trained: keras.Model) -> None:
    model = trained
    state = KerasState(model).state_dict()
    assert state["backend"] == BACKEND
    assert all(isinstance(v, np.ndarray) for v in state["model"].values())
    assert any(k.endswith("dense/kernel") or "/dense" in k for k in state["model"])
    assert any(k.endswith("iteration") for k in state["optimizer"])
    savegame.save(tmp_path / "ck", {"keras": KerasState(model)})
    code = (
        "import sys; sys.modules['keras'] = None; sys.modules['tensorflow'] = None; sys.modules['jax'] = None\n"
        "import savegame, numpy as np\n"
        f"s = savegame.load({str(tmp_path / 'ck')!r})['keras']\n"
        "k = [p for p in s['model'] if p.endswith('kernel')]\n"
        "assert k and all(isinstance(s['model'][p], np.ndarray) for p in k), s['model'].keys()\n"
        "print(len(s['model']), len(s['optimizer']))\n"
    )
    done = run_python(code, backend=BACKEND, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(len(state["model"])), str(len(state["optimizer"]))]


def test_continue_training_after_restore_equals_never_stopping(tmp_path: Path) -> None:
    x, y, _, _ = digits(320)
    keras.utils.set_random_seed(3)
    straight = conv_model()
    straight.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=True)

    keras.utils.set_random_seed(3)
    first = conv_model()
    first.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=True)
    savegame.save(tmp_path / "ck", {"keras": KerasState(first)})

    keras.utils.set_random_seed(999)  # whatever the RNGs are now, the restore puts them back
    resumed = conv_model()
    # fit() builds the metrics from a batch the first time, drawing from the input pipeline's RNG; do
    # that before restoring, as a resumed fit does (BackupAndRestore restores in on_train_begin).
    resumed.fit(x, y, batch_size=32, epochs=0, verbose=0)
    savegame.load(tmp_path / "ck", {"keras": KerasState(resumed)})
    resumed.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=True)
    diff = max_abs_diff(_all_variables(straight), _all_variables(resumed))
    if BACKEND == "tensorflow":
        # In one process TensorFlow's tf.data op seeds depend on how many datasets were built before;
        # across processes (the real resume, test_callbacks) the result is bit-exact.
        assert diff < 0.5
    else:
        assert diff == 0.0


def test_strict_mismatch_raises_with_report_and_nothing_changes(tmp_path: Path, trained: keras.Model) -> None:
    model = trained
    savegame.save(tmp_path / "ck", {"keras": KerasState(model)})
    other = conv_model(units=12, extra=True)
    other.build((None, 8, 8, 1))
    before = arrays(other.weights)
    with pytest.raises(StateMismatchError) as caught:
        savegame.load(tmp_path / "ck", {"keras": KerasState(other)})
    report = caught.value.report
    assert isinstance(report, KerasLoadReport)
    assert report.missing and any("kernel" in k for k in report.missing)
    assert "pass strict=False" in str(caught.value)
    assert all(np.array_equal(a, b) for a, b in zip(before, arrays(other.weights)))


def test_shape_mismatch_and_non_strict_load(tmp_path: Path, trained: keras.Model) -> None:
    model = trained
    savegame.save(tmp_path / "ck", {"keras": KerasState(model)})
    raw = savegame.load(tmp_path / "ck")["keras"]
    other = conv_model(units=12)
    with pytest.raises(StateMismatchError) as caught:
        KerasState(other).load_state_dict(raw)
    report = caught.value.report
    assert report.mismatched and all(k.startswith(("model/", "optimizer/")) for k, _, _ in report.mismatched)
    assert any(saved == (10,) and live == (12,) for _, saved, live in report.mismatched)
    loose = KerasState(other).load_state_dict(raw, strict=False)
    assert not loose.clean and loose.loaded
    conv = next(v for v in other.weights if "conv" in v.path and v.path.endswith("kernel"))
    saved_conv = next(a for k, a in raw["model"].items() if "conv" in k and k.endswith("kernel"))
    assert np.array_equal(arrays([conv])[0], saved_conv)


def test_unbuilt_model_is_refused_clearly() -> None:
    model = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(StateMismatchError, match="not built"):
        KerasState(model).state_dict()


def test_weights_only_and_any_optimizer(tmp_path: Path) -> None:
    model = _trained(optimizer="sgd")
    assert any("momentum" in v.path for v in model.optimizer.variables)
    weights_only = KerasState(model, include_optimizer=False, include_rng=False).state_dict()
    assert set(weights_only) == {"format", "backend", "keras_version", "model"}
    savegame.save(tmp_path / "ck", {"keras": KerasState(model)})
    fresh = conv_model(optimizer="sgd")
    savegame.load(tmp_path / "ck", {"keras": KerasState(fresh)})
    assert max_abs_diff(arrays(model.optimizer.variables), arrays(fresh.optimizer.variables)) == 0.0


def test_bfloat16_variables_round_trip(tmp_path: Path) -> None:
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, dtype="bfloat16")])
    model.build((None, 4))
    state = KerasState(model, include_optimizer=False).state_dict()
    kernel = next(v for k, v in state["model"].items() if k.endswith("kernel"))
    assert str(kernel.dtype) == "bfloat16"
    savegame.save(tmp_path / "ck", {"keras": KerasState(model, include_optimizer=False)})
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, dtype="bfloat16")])
    other.build((None, 4))
    savegame.load(tmp_path / "ck", {"keras": KerasState(other, include_optimizer=False)})
    for a, b in zip(arrays(model.weights), arrays(other.weights)):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_duplicate_paths_get_suffixes() -> None:
    one, two, three = (SimpleNamespace(path="block/w") for _ in range(3))
    keyed = _key_variables([one, two, one, three])
    assert list(keyed) == ["block/w", "block/w#1", "block/w#2"]
    assert keyed["block/w#1"] is two


def test_seed_generators_and_global_rng_are_restored(tmp_path: Path, trained: keras.Model) -> None:
    model = trained
    keras.random.normal((2,))  # creates and advances the global SeedGenerator
    savegame.save(tmp_path / "ck", {"keras": KerasState(model)})
    expected_np = np.random.rand(3)
    expected_keras = np.asarray(keras.ops.convert_to_numpy(keras.random.normal((3,))))
    np.random.rand(5)
    keras.random.normal((4,))
    savegame.load(tmp_path / "ck", {"keras": KerasState(model)})
    assert np.array_equal(np.random.rand(3), expected_np)
    assert np.array_equal(np.asarray(keras.ops.convert_to_numpy(keras.random.normal((3,)))), expected_keras)


@pytest.mark.subprocess
def test_state_from_another_backend_restores_here(tmp_path: Path) -> None:
    source = BACKENDS[(BACKENDS.index(BACKEND) + 1) % len(BACKENDS)]
    code = (
        "import sys, numpy as np, keras, savegame\n"
        "from _kerashelp import conv_model, digits, configure_determinism\n"
        "from savegame.adapters.keras import KerasState\n"
        "configure_determinism(); keras.utils.set_random_seed(5)\n"
        "x, y, xv, yv = digits(320)\n"
        "m = conv_model(); m.fit(x, y, batch_size=32, epochs=1, verbose=0)\n"
        "savegame.save(sys.argv[1], {'keras': KerasState(m)})\n"
        "np.save(sys.argv[2], np.asarray(m.predict(xv[:50], verbose=0)))\n"
    )
    done = run_python(code, backend=source, cwd=tmp_path, args=(str(tmp_path / "ck"), str(tmp_path / "pred.npy")))
    assert done.returncode == 0, done.stderr[-3000:]
    saved = savegame.load(tmp_path / "ck")["keras"]
    assert saved["backend"] == source
    model = conv_model()
    report = KerasState(model).load_state_dict(saved)
    assert report.clean
    for array, live in zip(saved["model"].values(), arrays(model.weights)):
        assert np.array_equal(live, array)
    for array, live in zip(saved["optimizer"].values(), arrays(model.optimizer.variables)):
        assert np.array_equal(array.astype(live.dtype), live)
    _, _, xv, _ = digits(320)
    here = np.asarray(model.predict(xv[:50], verbose=0))
    there = np.load(tmp_path / "pred.npy")
    # Same weights; different kernels may round differently in the last bits.
    assert np.max(np.abs(here - there)) < 1e-4
    print(f"cross-backend {source}->{BACKEND}: max |prediction diff| = {np.max(np.abs(here - there)):.2e}",
          file=sys.stderr)
