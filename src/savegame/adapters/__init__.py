"""Framework adapters (torch, keras, RNG); each imported lazily.

This package is the only place that knows a framework. The core (api, capture, writer, checks, the
Checkpointer, coordination) asks the questions below instead of probing ``sys.modules["torch"]``
itself; none of them imports a framework the user has not imported (except :func:`torch_available`,
which is asked only when a checkpoint holds torch values and the caller wants them as tensors).
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any, Literal

__all__ = [
    "framework_decode_tags", "framework_versions", "is_model_weights", "torch_available", "torch_if_imported",
    "zero_copy_for",
]  # fmt: skip

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
            versions[name] = str(module.__version__)  # an exact str: torch's is a TorchVersion subclass
    return versions


def framework_decode_tags() -> dict[str, Callable[[Any], object]]:
    """The skeleton tags of framework values (``torch.dtype``, ``torch.Size``, ``torch.device``) decoded
    by the framework itself, for the frameworks this process imported (``{}`` otherwise: the verifier
    then checks them by their form, :mod:`savegame.format.checks`)."""
    if torch_if_imported() is None:
        return {}
    from savegame.adapters.torch import decode_tags

    return decode_tags()


def is_model_weights(value: object) -> bool:
    """Whether an item holds model weights (what ``weights_only`` checkpoints keep): a
    ``torch.nn.Module``, or a :class:`savegame.adapters.keras.KerasState` without the optimizer (its
    adapter's answer, :mod:`savegame.adapters.registry`)."""
    from savegame.adapters.registry import adapter_for

    adapter = adapter_for(value)
    return adapter is not None and adapter.model_weights(value)


def zero_copy_for(target: object) -> bool | Literal["aligned"]:
    """How an item restored into ``target`` may share the file's memory (its adapter's answer):
    ``True`` for views of the file (a torch module copies the values into its own parameters),
    ``"aligned"`` for aligned views of the copy-on-write mapping (a torch optimizer keeps the tensors
    it is given; its in-place updates copy each page on first write, privately), ``False`` for fresh
    memory (anything else)."""
    from savegame.adapters.registry import adapter_for

    adapter = adapter_for(target)
    return adapter.zero_copy(target) if adapter is not None else False
