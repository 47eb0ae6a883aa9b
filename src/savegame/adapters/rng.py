"""Random number generator state: the global RNGs and individual generator objects.

Resuming exactly means drawing the same random numbers after a restart: dropout masks, data shuffling
and augmentation all depend on them. :class:`RNGState` captures every global generator a training loop
typically touches (Python ``random``, NumPy's legacy global ``np.random``, torch's CPU generator and,
when CUDA is initialised, every CUDA device's generator); the ``capture_*``/``restore_*`` functions do
the same for generator objects put directly into the state (``random.Random``, ``np.random.Generator``,
``np.random.RandomState``, ``torch.Generator``).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from savegame.errors import StateMismatchError


def _python_state(rng: random.Random | None = None) -> dict[str, Any]:
    version, internal, gauss = (rng or random).getstate()
    return {"version": version, "state": np.array(internal, dtype=np.uint32), "gauss_next": gauss}


def _set_python_state(state: Mapping[str, Any], rng: random.Random | None, where: str) -> None:
    try:
        internal = tuple(int(x) for x in np.asarray(state["state"]).tolist())
        (rng or random).setstate((int(state["version"]), internal, state["gauss_next"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise StateMismatchError(f"{where}: invalid Python random state: {exc}") from None


def _numpy_global_state() -> dict[str, Any]:
    return dict(np.random.get_state(legacy=False))  # type: ignore[arg-type]


def _set_numpy_global_state(state: Mapping[str, Any], where: str) -> None:
    try:
        np.random.set_state(dict(state))
    except (KeyError, TypeError, ValueError) as exc:
        raise StateMismatchError(f"{where}: invalid NumPy random state: {exc}") from None


class RNGState:
    """A :class:`savegame.Stateful` for the process-wide random generators.

    Put it in the saved state (``{"model": m, "optimizer": o, "rng": savegame.RNGState()}``) and restore
    into a fresh instance: every generator continues with the exact numbers it would have drawn.

    ``torch`` and ``cuda`` are captured only when torch is imported (and CUDA initialised); restoring a
    state with CUDA generators on a machine with fewer devices restores the ones that exist.
    """

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"python": _python_state(), "numpy": _numpy_global_state()}
        torch = sys.modules.get("torch")
        if torch is not None:
            state["torch"] = torch.get_rng_state()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                state["cuda"] = list(torch.cuda.get_rng_state_all())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        where = "rng"
        if not isinstance(state, Mapping):
            raise StateMismatchError(f"{where}: expected a dict of generator states")
        if "python" in state:
            _set_python_state(state["python"], None, f"{where}.python")
        if "numpy" in state:
            _set_numpy_global_state(state["numpy"], f"{where}.numpy")
        torch = sys.modules.get("torch")
        if torch is not None and "torch" in state:
            try:
                torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
            except (RuntimeError, TypeError) as exc:
                raise StateMismatchError(f"{where}.torch: invalid torch RNG state: {exc}") from None
        if torch is not None and state.get("cuda") and torch.cuda.is_available():
            saved = list(state["cuda"])
            n = min(len(saved), torch.cuda.device_count())
            for i in range(n):
                torch.cuda.set_rng_state(torch.as_tensor(saved[i], dtype=torch.uint8).cpu(), i)


def capture_generator(obj: object) -> dict[str, Any] | None:
    """State of a generator object, or None if ``obj`` is not one we know."""
    if isinstance(obj, random.Random):
        return _python_state(obj)
    if isinstance(obj, np.random.Generator):
        return dict(obj.bit_generator.state)
    if isinstance(obj, np.random.RandomState):
        return dict(obj.get_state(legacy=False))  # type: ignore[arg-type]
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Generator):
        return {"state": obj.get_state(), "device": str(obj.device)}
    return None


def restore_generator(obj: object, state: object, where: str) -> bool:
    """Restore a generator object in place; False if ``obj`` is not a generator we know."""
    if not isinstance(state, Mapping):
        if capture_generator(obj) is None:
            return False
        raise StateMismatchError(f"{where}: expected a generator state dict, found {type(state).__name__}")
    try:
        if isinstance(obj, random.Random):
            _set_python_state(state, obj, where)
            return True
        if isinstance(obj, np.random.Generator):
            obj.bit_generator.state = dict(state)
            return True
        if isinstance(obj, np.random.RandomState):
            obj.set_state(dict(state))
            return True
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.Generator):
            obj.set_state(torch.as_tensor(state["state"], dtype=torch.uint8).cpu())
            return True
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise StateMismatchError(f"{where}: generator state does not fit {type(obj).__name__}: {exc}") from None
    return False
