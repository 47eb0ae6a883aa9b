"""Keras 3 training state <-> plain nested data of NumPy arrays, on every Keras backend.

What "the training state" of a Keras model is, for savegame:

* ``model``: every weight (``model.weights``: trainable and non-trainable, e.g. BatchNorm statistics),
  keyed by ``variable.path`` (``"sequential/dense/kernel"``);
* ``optimizer``: every optimizer variable (``optimizer.variables``: ``iterations``, the learning rate when
  it is a variable, moments, accumulators...), keyed by path, for any optimizer;
* ``rng``: the state of every ``keras.random.SeedGenerator`` the model owns (dropout, noise and
  augmentation layers), the global Keras seed generator used by unseeded ``keras.random`` calls, and the
  process-wide generators a ``fit`` touches: Python ``random``, NumPy's global generator (data shuffling
  on the JAX backend), torch's CPU generator (the ``DataLoader`` sampler on the torch backend) and
  TensorFlow's global seed, op-seed sequence and global ``tf.random.Generator`` (``tf.data`` shuffling).
  JAX has no global generator.

The state is made of str-keyed dicts, strings, ints, None and NumPy arrays only (``ml_dtypes`` arrays for
``bfloat16`` variables), so the savegame core stores it exactly and it can be read back without Keras.
Arrays are copies: training on after ``state_dict()`` never changes a captured state.

Restoring is in place (``variable.assign``) and backend-independent: a state captured under the torch
backend restores into the same model built under JAX or TensorFlow (integer variables such as
``iterations`` or seed states have different dtypes on each backend and are cast). Matching is strict
by default: missing, unexpected or shape-mismatched variables raise :class:`StateMismatchError` with a
:class:`KerasLoadReport` before any variable is changed; ``strict=False`` loads what matches and
returns the report.

Variable paths contain Keras's automatic layer names (``dense``, ``dense_1``...), which depend on how many
layers the process created before. A fresh process rebuilding the model gets the same paths; a second
copy of the model in the same process gets ``sequential_1/dense_2``... When no path is shared, matching
falls back to *structure*: paths are compared with the automatic ``_<n>`` suffixes removed and paired in
order of appearance (shapes are still checked, leftovers are missing/unexpected) and the report says so.

Keras, TensorFlow, JAX and torch are imported lazily, inside functions: importing this module costs
nothing and needs none of them.
"""

from __future__ import annotations

import random
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from savegame.adapters.registry import StatefulAdapter, register
from savegame.adapters.report import LoadReport
from savegame.adapters.rng import RNGState
from savegame.errors import StateMismatchError

__all__ = [
    "STATE_FORMAT",
    "KerasLoadReport",
    "KerasState",
    "assign_variables",
    "capture_global_rng",
    "capture_variables",
    "keep_rng_through_first_build",
    "restore_global_rng",
    "seed_generator_variables",
    "sync_jax_state",
]

STATE_FORMAT = "savegame.keras/1"
"""Value of the ``format`` entry of a captured state; bumped if the layout ever changes."""

_SECTIONS = ("model", "optimizer", "seed_generators")
_AUTO_SUFFIX = re.compile(r"_\d+(?=[_/#]|$)")


# --------------------------------------------------------------------------------------------------
# Variables <-> arrays


def sync_jax_state(model: Any) -> None:
    """Write the JAX trainer's in-flight state back into the model's variables (no-op elsewhere).

    During ``fit`` on the JAX backend the current values live in the trainer, not in the variables, until
    an epoch ends; reading or assigning variables from a callback needs this first.
    """
    sync = getattr(model, "jax_state_sync", None)
    if callable(sync):
        sync()


def _mark_jax_state_stale(model: Any) -> None:
    """Make the JAX trainer re-read the variables at its next step (after they were assigned)."""
    if hasattr(model, "_jax_state_synced"):
        model._jax_state_synced = True


def _key_variables(variables: Iterable[Any]) -> dict[str, Any]:
    """``{path: variable}`` in order, each variable once; a repeated path gets ``#1``, ``#2``... appended."""
    keyed: dict[str, Any] = {}
    seen: set[int] = set()
    for variable in variables:
        if id(variable) in seen:
            continue
        seen.add(id(variable))
        path = str(getattr(variable, "path", None) or getattr(variable, "name", "variable"))
        key = path
        n = 0
        while key in keyed:
            n += 1
            key = f"{path}#{n}"
        keyed[key] = variable
    return keyed


def _to_numpy(variable: Any) -> np.ndarray:
    """A host copy of ``variable``'s value (a copy: torch's CPU ``.numpy()`` would share memory)."""
    from keras import ops

    value = ops.convert_to_numpy(variable.value)
    return np.array(value, copy=True)


def capture_variables(variables: Iterable[Any]) -> dict[str, np.ndarray]:
    """``{path: array copy}`` of ``variables`` (deduplicated, repeated paths suffixed ``#n``)."""
    return {key: _to_numpy(v) for key, v in _key_variables(variables).items()}


def _numpy_dtype(dtype: Any) -> np.dtype[Any]:
    """The NumPy dtype of a Keras dtype name, including ``ml_dtypes`` types such as ``bfloat16``."""
    from keras import backend

    name = str(backend.standardize_dtype(dtype))
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes

        extension: type[Any] = getattr(ml_dtypes, name)
        return np.dtype(extension)


def _cast(array: np.ndarray, variable: Any) -> np.ndarray:
    """``array`` in ``variable``'s dtype (integer states differ between backends: int32/int64/uint32)."""
    target = _numpy_dtype(variable.dtype)
    if array.dtype == target:
        return array
    return np.asarray(array).astype(target)


def _as_array(value: Any) -> np.ndarray:
    """``value`` as a NumPy array (a state read back by torch-aware code may hold torch tensors)."""
    if isinstance(value, np.ndarray):
        return value
    to_numpy = getattr(value, "numpy", None)
    if callable(to_numpy):
        return np.asarray(to_numpy())
    return np.asarray(value)


def _shape(variable: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in variable.shape)


def assign_variables(pairs: Sequence[tuple[Any, np.ndarray]]) -> None:
    """Assign each array to its variable in place, cast to the variable's dtype."""
    for variable, array in pairs:
        variable.assign(_cast(_as_array(array), variable))


def seed_generator_variables(model: Any) -> list[Any]:
    """The state variables of every ``keras.random.SeedGenerator`` owned by ``model`` or its layers."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


# --------------------------------------------------------------------------------------------------
# Global random state


def _python_random_state(rng: random.Random) -> dict[str, Any]:
    version, internal, gauss = rng.getstate()
    return {"version": version, "state": np.array(internal, dtype=np.uint32), "gauss_next": gauss}


def _set_python_random_state(rng: random.Random, state: Mapping[str, Any]) -> None:
    internal = tuple(int(x) for x in np.asarray(state["state"]).tolist())
    rng.setstate((int(state["version"]), internal, state["gauss_next"]))


def _capture_global_seed_generator() -> np.ndarray | None:
    from keras.src.backend.common import global_state
    from keras.src.random.seed_generator import GLOBAL_SEED_GENERATOR

    generator = global_state.get_global_attribute(GLOBAL_SEED_GENERATOR)
    if generator is None:
        return None
    return _to_numpy(generator.state)


def _restore_global_seed_generator(state: np.ndarray | None) -> None:
    from keras.src.backend.common import global_state
    from keras.src.random.seed_generator import GLOBAL_SEED_GENERATOR, SeedGenerator

    if state is None:
        # The uninterrupted run had not created it yet: neither should the resumed one have.
        global_state.set_global_attribute(GLOBAL_SEED_GENERATOR, None)
        return
    generator = global_state.get_global_attribute(GLOBAL_SEED_GENERATOR)
    if generator is None:
        generator = SeedGenerator(seed=0)
        global_state.set_global_attribute(GLOBAL_SEED_GENERATOR, generator)
    assign_variables([(generator.state, np.asarray(state))])


def _capture_tensorflow_rng() -> dict[str, Any] | None:
    """TensorFlow's global seed, op-seed sequence and global generator, if TensorFlow is loaded.

    ``tf.data`` shuffles (Keras's TensorFlow input pipeline) draw their op seeds from the sequence seeded
    by ``tf.random.set_seed``; that sequence is a private ``random.Random`` of the eager context.
    """
    if "tensorflow" not in sys.modules:
        return None
    try:
        from tensorflow.python.eager import context
        from tensorflow.python.ops import stateful_random_ops
    except ImportError:  # pragma: no cover - TensorFlow layout changed
        return None
    ctx = context.context()
    seed = getattr(ctx, "_seed", None)
    op_rng = getattr(ctx, "_rng", None)
    state: dict[str, Any] = {
        "seed": None if seed is None else int(seed),
        "op_seeds": _python_random_state(op_rng) if isinstance(op_rng, random.Random) else None,
        "generator": None,
    }
    generator = stateful_random_ops.global_generator
    if generator is not None:
        state["generator"] = {
            "state": np.array(generator.state.numpy(), copy=True),
            "algorithm": int(generator.algorithm),
        }
    return state


def _restore_tensorflow_rng(state: Mapping[str, Any]) -> None:
    import tensorflow as tf
    from tensorflow.python.eager import context

    tf.random.set_seed(state.get("seed"))
    op_seeds = state.get("op_seeds")
    ctx = context.context()
    if op_seeds is not None and isinstance(getattr(ctx, "_rng", None), random.Random):
        _set_python_random_state(ctx._rng, op_seeds)
    generator = state.get("generator")
    if generator is not None:
        tf.random.set_global_generator(
            tf.random.Generator.from_state(np.asarray(generator["state"]), int(generator["algorithm"]))
        )


def capture_global_rng() -> dict[str, Any]:
    """The process-wide random state a Keras ``fit`` touches (see the module docstring).

    Keys: ``python``, ``numpy``, ``torch`` (when torch is loaded), ``tensorflow`` (when TensorFlow is
    loaded) and ``keras_global`` (the global ``SeedGenerator``'s state, None if not created yet).
    """
    state: dict[str, Any] = dict(RNGState().state_dict())
    if "torch" in state:  # torch tensors -> NumPy, so the state is framework-free
        state["torch"] = _as_array(state["torch"]).copy()
    if "cuda" in state:
        state["cuda"] = [_as_array(s).copy() for s in state["cuda"]]
    tf_state = _capture_tensorflow_rng()
    if tf_state is not None:
        state["tensorflow"] = tf_state
    state["keras_global"] = _capture_global_seed_generator()
    return state


def restore_global_rng(state: Mapping[str, Any]) -> list[str]:
    """Restore what :func:`capture_global_rng` captured; returns the generators it restored.

    Generators of a framework that is not loaded here (torch's state in a TensorFlow-backend process)
    are skipped: nothing in this process draws from them.
    """
    restored: list[str] = []
    plain = {k: state[k] for k in ("python", "numpy", "torch", "cuda") if k in state}
    if "torch" in plain and "torch" not in sys.modules:
        del plain["torch"]
    RNGState().load_state_dict(plain)
    restored += sorted(plain)
    tf_state = state.get("tensorflow")
    if isinstance(tf_state, Mapping) and "tensorflow" in sys.modules:
        _restore_tensorflow_rng(tf_state)
        restored.append("tensorflow")
    if "keras_global" in state:
        _restore_global_seed_generator(state["keras_global"])
        restored.append("keras_global")
    return restored


_NEUTRAL_MARK = "_savegame_rng_neutral"


def keep_rng_through_first_build(model: Any) -> None:
    """Make the model's next symbolic build leave the process-wide generators as they are.

    The first ``fit`` (or ``evaluate``) after ``compile`` builds the compiled metrics and loss from one
    batch it takes from the input pipeline, which draws that epoch's order from the global generators
    (NumPy's on the JAX backend, torch's on the torch backend) *before* ``on_train_begin``. In an
    uninterrupted run that draw happened once, at the very start; after restoring a checkpoint's random
    state into a freshly compiled model it would happen again and shift every later draw, so
    ``fit(initial_epoch=...)`` would train on another data order than the run it continues. Wrapping the
    build (once: the wrapper removes itself) to put the generators back afterwards keeps the restored
    state for the epochs. Keras's private ``_symbolic_build`` is used only if present.
    """
    build = getattr(model, "_symbolic_build", None)
    if not callable(build) or getattr(build, _NEUTRAL_MARK, False):
        return

    def neutral_build(*args: Any, **kwargs: Any) -> Any:
        model.__dict__.pop("_symbolic_build", None)  # once: the class's method from now on
        saved = {k: v for k, v in capture_global_rng().items() if k != "keras_global"}
        try:
            return build(*args, **kwargs)
        finally:
            restore_global_rng(saved)

    setattr(neutral_build, _NEUTRAL_MARK, True)
    model.__dict__["_symbolic_build"] = neutral_build


# --------------------------------------------------------------------------------------------------
# Matching and the report


KerasLoadReport = LoadReport
"""The old name of the report of a Keras restore: :class:`savegame.adapters.report.LoadReport`
(``missing`` / ``unexpected`` / ``mismatched`` are aliases of its ``*_keys`` fields)."""


def _normalize(key: str) -> str:
    """``sequential_1/dense_3/kernel`` -> ``sequential/dense/kernel``: automatic name suffixes removed."""
    return _AUTO_SUFFIX.sub("", key)


def _pair_keys(saved_keys: Sequence[str], live_keys: Sequence[str], *, by_structure: bool) -> list[tuple[str, str]]:
    """``(saved key, live key)`` pairs: by equal key, or by equal normalized key in order of appearance."""
    if not by_structure:
        saved = set(saved_keys)
        return [(k, k) for k in live_keys if k in saved]
    queues: dict[str, list[str]] = {}
    for key in saved_keys:
        queues.setdefault(_normalize(key), []).append(key)
    pairs = []
    for key in live_keys:
        queue = queues.get(_normalize(key))
        if queue:
            pairs.append((queue.pop(0), key))
    return pairs


def _match_section(
    section: str, saved: Mapping[str, Any], live: Mapping[str, Any], report: KerasLoadReport, *, by_structure: bool
) -> list[tuple[Any, np.ndarray, str]]:
    """Pair saved arrays with live variables; record every difference in ``report``."""
    pairs = _pair_keys(list(saved), list(live), by_structure=by_structure)
    if by_structure and set(saved) != set(live):
        report.by_structure.append(section)
    paired_saved = {a for a, _ in pairs}
    paired_live = {b for _, b in pairs}
    report.missing_keys += [f"{section}/{k}" for k in live if k not in paired_live]
    report.unexpected_keys += [f"{section}/{k}" for k in saved if k not in paired_saved]
    usable: list[tuple[Any, np.ndarray, str]] = []
    for saved_key, live_key in pairs:
        variable = live[live_key]
        array = _as_array(saved[saved_key])
        if tuple(array.shape) != _shape(variable):
            report.mismatched_keys.append((f"{section}/{live_key}", tuple(array.shape), _shape(variable)))
            continue
        usable.append((variable, array, f"{section}/{live_key}"))
    return usable


# --------------------------------------------------------------------------------------------------
# The Stateful object


class KerasState:
    """A :class:`savegame.Stateful` for a Keras 3 model's full training state.

    Put it in the state given to ``savegame.save`` / the Checkpointer (``{"keras": KerasState(model)}``)
    and restore with the same object (or one built on a fresh model). Options:

    ``include_optimizer``: capture and restore ``model.optimizer``'s variables (default True).
    ``include_rng``: capture and restore the random state (seed generators and global generators, see
    the module docstring; default True). With both False the state is the model's weights only.
    ``strict``: with False, :meth:`load_state_dict` always loads what matches. A load is strict only when
    both this and the call's ``strict`` are True, so ``savegame.load(path, {"keras": state},
    strict=False)`` and ``Checkpointer.restore(..., strict=False)`` (which pass their ``strict`` on) are
    non-strict too; their report then lists the Keras variables that did not match.
    """

    def __init__(
        self, model: Any, *, include_optimizer: bool = True, include_rng: bool = True, strict: bool = True
    ) -> None:
        self.model = model
        self.include_optimizer = include_optimizer
        self.include_rng = include_rng
        self.strict = strict
        self.last_report: KerasLoadReport | None = None

    # -- capture -----------------------------------------------------------------------------------

    def _optimizer(self) -> Any:
        return getattr(self.model, "optimizer", None) if self.include_optimizer else None

    def _check_built(self, action: str) -> None:
        if not getattr(self.model, "built", False) or not self.model.weights:
            raise StateMismatchError(
                f"cannot {action} the state of {type(self.model).__name__} {getattr(self.model, 'name', '')!r}: "
                "the model is not built (it has no variables yet). Build it first: call it on a batch, "
                "use model.build(input_shape), or give the Sequential model an keras.Input."
            )

    def state_dict(self) -> dict[str, Any]:
        """The model's training state as nested plain data (see the module docstring for the layout)."""
        import keras

        self._check_built("capture")
        sync_jax_state(self.model)
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "backend": keras.backend.backend(),
            "keras_version": keras.__version__,
            "model": capture_variables(self.model.weights),
        }
        optimizer = self._optimizer()
        if optimizer is not None:
            state["optimizer"] = capture_variables(optimizer.variables)
        if self.include_rng:
            state["seed_generators"] = capture_variables(seed_generator_variables(self.model))
            state["rng"] = capture_global_rng()
        return state

    # -- restore -----------------------------------------------------------------------------------

    def _live_sections(self, saved_optimizer: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
        """``{section: {path: variable}}`` of the live model, building the optimizer when needed."""
        live: dict[str, dict[str, Any]] = {"model": _key_variables(self.model.weights)}
        optimizer = self._optimizer()
        if optimizer is not None:
            if not optimizer.built and saved_optimizer is not None and len(saved_optimizer) > len(optimizer.variables):
                # A compiled model that has not trained yet: create the slots the checkpoint fills.
                optimizer.build(self.model.trainable_variables)
            live["optimizer"] = _key_variables(optimizer.variables)
        if self.include_rng:
            live["seed_generators"] = _key_variables(seed_generator_variables(self.model))
        return live

    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> KerasLoadReport:
        """Restore ``state`` into the model in place and return a :class:`KerasLoadReport`.

        ``strict`` (and the constructor's ``strict``, both must be True for a strict load): any missing,
        unexpected or shape-mismatched variable raises :class:`StateMismatchError` (its ``report``
        attribute holds the report) and nothing is changed; non-strict, whatever matches is loaded and the
        rest is listed in the report.
        A checkpoint without an optimizer section restores into a model with one (the optimizer is left
        as it is, noted in the report); the reverse is reported as unexpected.
        """
        strict = bool(self.strict and strict)
        if not isinstance(state, Mapping) or "model" not in state:
            raise StateMismatchError(
                f"not a Keras training state (expected a dict with a 'model' section, got {type(state).__name__})"
            )
        fmt = state.get("format", STATE_FORMAT)
        if fmt != STATE_FORMAT:
            raise StateMismatchError(f"unknown Keras state format {fmt!r} (this version reads {STATE_FORMAT!r})")
        self._check_built("restore")
        sync_jax_state(self.model)
        report = KerasLoadReport()
        saved_optimizer = state.get("optimizer") if self.include_optimizer else None
        live = self._live_sections(saved_optimizer)
        usable: list[tuple[Any, np.ndarray, str]] = []
        saved_model = state.get("model")
        # Same variable paths (a fresh process rebuilding the model): match by path. None in common (a
        # second copy of the model in this process, named sequential_1/dense_3...): match by structure.
        by_structure = isinstance(saved_model, Mapping) and not set(saved_model) & set(live["model"])
        for section in _SECTIONS:
            saved = state.get(section)
            if section == "optimizer" and not self.include_optimizer:
                if saved is not None:
                    report.notes.append("optimizer: in the checkpoint, not restored (include_optimizer=False)")
                continue
            if section == "seed_generators" and not self.include_rng:
                continue
            if saved is None:
                if section in live and section != "model":
                    report.notes.append(f"{section}: not in the checkpoint, left as it is")
                continue
            if not isinstance(saved, Mapping):
                raise StateMismatchError(f"{section}: expected a dict of arrays, found {type(saved).__name__}")
            if section not in live:
                report.unexpected_keys += [f"{section}/{k}" for k in saved]
                if section == "optimizer":
                    report.notes.append("optimizer: the checkpoint has one, the model has none (compile it first)")
                continue
            usable += _match_section(section, saved, live[section], report, by_structure=by_structure)
        self.last_report = report
        if strict and not report.clean:
            raise StateMismatchError(
                f"the checkpoint does not match model {getattr(self.model, 'name', '')!r}: {report.describe()} "
                "(pass strict=False to load what matches)",
                report,
            )
        assign_variables([(variable, array) for variable, array, _ in usable])
        report.loaded = [name for _, _, name in usable]
        rng = state.get("rng")
        if self.include_rng and isinstance(rng, Mapping):
            restored = restore_global_rng(rng)
            keep_rng_through_first_build(self.model)
            report.notes.append(f"rng: restored {', '.join(restored) or 'nothing'}")
        _mark_jax_state_stale(self.model)
        return report


class KerasStateAdapter(StatefulAdapter):
    """:class:`KerasState` is Stateful; its adapter adds that without the optimizer it is model weights
    (what ``weights_only`` checkpoints keep). Registered when this module is first imported, which any
    use of ``KerasState`` does."""

    def handles(self, obj: object) -> bool:
        return isinstance(obj, KerasState)

    def model_weights(self, obj: object) -> bool:
        return isinstance(obj, KerasState) and not obj.include_optimizer


register(KerasStateAdapter())
