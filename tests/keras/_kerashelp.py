"""Shared helpers of the Keras tests: digits data, small models, determinism, subprocess runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import keras
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ("torch", "tensorflow", "jax")


def configure_determinism() -> None:
    """One thread everywhere and deterministic TensorFlow ops (call before building models)."""
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
    if backend == "tensorflow":  # elsewhere Keras's input pipelines do not use TensorFlow: do not import it
        import tensorflow as tf

        try:
            tf.config.experimental.enable_op_determinism()
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # already initialized: keep what was set
            pass


def digits(n: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits: (x_train, y_train, x_val, y_val), images scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images[..., None] / 16.0).astype("float32")
    y = data.target.astype("int64")
    if n is not None:
        x, y = x[:n], y[:n]
    split = int(len(x) * 0.8)
    return x[:split], y[:split], x[split:], y[split:]


def iris() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled iris, shuffled once with a fixed seed: (x_train, y_train, x_val, y_val)."""
    from sklearn.datasets import load_iris

    data = load_iris()
    order = np.random.default_rng(0).permutation(len(data.target))
    x = data.data[order].astype("float32")
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    y = data.target[order].astype("int64")
    return x[:120], y[:120], x[120:], y[120:]


def dense_model(*, inputs: int = 4, units: int = 3, hidden: int = 16, dropout: float = 0.0) -> Any:
    """A compiled small Dense net (optionally with Dropout, which owns a SeedGenerator)."""
    import keras
    from keras import layers

    stack: list[Any] = [keras.Input((inputs,)), layers.Dense(hidden, activation="relu")]
    if dropout:
        stack.append(layers.Dropout(dropout))
    stack.append(layers.Dense(units))
    model = keras.Sequential(stack)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def conv_model(*, units: int = 10, extra: bool = False, optimizer: str = "adam", dropout: float = 0.25) -> Any:
    """A compiled small conv net with BatchNorm (non-trainable variables) and Dropout (a SeedGenerator)."""
    import keras
    from keras import layers

    stack: list[Any] = [
        keras.Input((8, 8, 1)),
        layers.Conv2D(8, 3, activation="relu"),
        layers.BatchNormalization(),
        layers.Flatten(),
        layers.Dropout(dropout),
        layers.Dense(32, activation="relu"),
    ]
    if extra:
        stack.append(layers.Dense(16, activation="relu"))
    stack.append(layers.Dense(units))
    model = keras.Sequential(stack)
    opt = {"adam": keras.optimizers.Adam(1e-3), "sgd": keras.optimizers.SGD(0.05, momentum=0.9)}[optimizer]
    model.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def arrays(variables: Any) -> list[np.ndarray]:
    """Host copies of Keras variables, in order."""
    from keras import ops

    return [np.array(ops.convert_to_numpy(v.value)) for v in variables]


def max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert len(a) == len(b)
    worst = 0.0
    for u, v in zip(a, b):
        assert u.shape == v.shape
        if u.size:
            worst = max(worst, float(np.max(np.abs(u.astype("float64") - v.astype("float64")))))
    return worst


def _env(backend: str) -> dict[str, str]:
    env = dict(os.environ)
    env["KERAS_BACKEND"] = backend
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    return env


def start_script(
    script: Path, *, backend: str, cwd: Path, args: tuple[str, ...] = (), log: Path
) -> subprocess.Popen[str]:
    """Start ``script`` in a fresh process (``KERAS_BACKEND=backend``), stdout and stderr into ``log``."""
    with open(log, "w") as handle:  # the child has its own copy of the descriptor
        return subprocess.Popen([sys.executable, str(script), *args], cwd=cwd, env=_env(backend), stdout=handle,
                                stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen[str], log: Path, timeout: float = 600) -> tuple[int, str]:
    """Wait for a :func:`start_script` process; ``(return code, its output)``."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return code, log.read_text()


def run_python(code_or_script: str, *, backend: str, cwd: Path, args: tuple[str, ...] = (), timeout: float = 300,
               script: bool = False) -> subprocess.CompletedProcess[str]:
    """Run Python code (or a script file) in a fresh process with ``KERAS_BACKEND=backend``."""
    env = _env(backend)
    cmd = [sys.executable, code_or_script, *args] if script else [sys.executable, "-c", code_or_script, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


class EpochRecorder(keras.callbacks.Callback):  # type: ignore[misc]
    """The model's weights and the logs at every epoch end of one ``fit``."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[list[np.ndarray]] = []
        self.logs: list[dict[str, float]] = []

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        from savegame.adapters.keras import sync_jax_state

        sync_jax_state(self.model)
        self.weights.append(arrays(self.model.weights))
        self.logs.append({k: float(v) for k, v in (logs or {}).items()})
