"""Keras test set-up: one Keras backend per pytest process, chosen by ``KERAS_BACKEND``.

Keras fixes its backend when it is first imported, so the suite runs once per backend in separate
processes (``tests/keras/run_backends.sh`` or ``make keras-tests``). Without ``KERAS_BACKEND`` the torch
backend is used. Threads are limited to one and TensorFlow's op determinism is enabled, so training is
bit-reproducible within a backend.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import importlib.util

import pytest

BACKEND = os.environ["KERAS_BACKEND"]
_MODULE = {"torch": "torch", "tensorflow": "tensorflow", "jax": "jax"}.get(BACKEND, BACKEND)

if importlib.util.find_spec("keras") is None or importlib.util.find_spec(_MODULE) is None:
    collect_ignore_glob = ["test_*.py"]
else:
    from _kerashelp import configure_determinism

    configure_determinism()


def pytest_report_header(config: pytest.Config) -> str:
    return f"keras backend: {BACKEND}"


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same seeds (TensorFlow's op determinism refuses unseeded random ops)."""
    import keras

    keras.utils.set_random_seed(0)
