"""Framework adapters (torch, keras, RNG); each imported lazily.

This package is the only place that knows a framework. The core (api, capture, writer, checks, the
Checkpointer, coordination) asks the questions below instead of probing ``sys.modules["torch"]``
itself; none of them imports a framework the user has not imported (except :func:`torch_available`,
which is asked only when a checkpoint holds torch values and the caller wants them as tensors).
"""

from __future__ import annotations

import platform
import sys
from types import ModuleType
from typing import Any, Literal

__all__ = ["framework_versions", "is_model_weights", "torch_available", "torch_if_imported", "zero_copy_for"]

_FRAMEWORKS = ("numpy", "torch", "keras", "tensorflow", "jax")


def torch_if_imported() -> ModuleType | None:
    """The ``torch`` module when this process has imported it, else None (never imports it: a process
    that does not use torch never pays for its import)."""
    return sys.modules.get("torch")


def torch_available() -> bool:
    """Whether torch can be used: imported already, or importable (this imports it)."""
    if torch_if_imported() is not None:
        return True
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def framework_versions() -> dict[str, str]:
    """Python's version and those of the frameworks this process imported (recorded in manifests)."""
    versions = {"python": platform.python_version()}
    for name in _FRAMEWORKS:
        module = sys.modules.get(name)
        if module is not None and isinstance(getattr(module, "__version__", None), str):
            versions[name] = module.__version__
    return versions


def is_model_weights(value: object) -> bool:
    """Whether an item holds model weights (what ``weights_only`` checkpoints keep): a
    ``torch.nn.Module``, or a :class:`savegame.adapters.keras.KerasState` without the optimizer."""
    torch = torch_if_imported()
    if torch is not None and isinstance(value, torch.nn.Module):
        return True
    keras_adapter = sys.modules.get(f"{__name__}.keras")  # loaded only if a KerasState was ever made
    keras_state = getattr(keras_adapter, "KerasState", None)
    return keras_state is not None and isinstance(value, keras_state) and not value.include_optimizer


def zero_copy_for(target: object) -> bool | Literal["aligned"]:
    """How an item restored into ``target`` may share the file's memory.

    A torch module copies the values into its own parameters: views of the file (``True``), no copy
    on our side. A torch optimizer keeps the state tensors it is given (``load_state_dict`` only casts
    them to the parameter's device and dtype): aligned views of the copy-on-write mapping
    (``"aligned"``), like a safetensors load; its in-place updates then copy each page on first write,
    privately (the file never changes). Anything else gets fresh memory (``False``).
    """
    torch: Any = torch_if_imported()
    if torch is None:
        return False
    if isinstance(target, torch.nn.Module):
        return True
    if isinstance(target, torch.optim.Optimizer):
        return "aligned"
    return False
