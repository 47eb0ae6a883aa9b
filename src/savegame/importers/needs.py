"""The optional libraries a source format needs, imported with an error that says what to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from savegame.errors import ConfigError

__all__ = ["EXTRAS", "need"]

EXTRAS: dict[str, str] = {"torch": "torch", "h5py": "keras"}
"""Module -> the savegame extra that installs it."""


def need(module: str, what: str) -> ModuleType:
    """Import ``module`` for ``what`` (``"reading .pt files"``), or raise :class:`ConfigError` naming the
    extra to install (``pip install 'savegame[torch]'``)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS.get(module, module)
        raise ConfigError(f"{what} needs {module}, which is not installed: pip install 'savegame[{extra}]'") from None
