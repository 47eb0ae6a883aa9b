"""Keras-native files written atomically (:func:`save_native`: temp file, fsync, rename, fsync dir), and
the item names and suffixes savegame's Keras checkpoints use.
"""

from __future__ import annotations

import os
import uuid
import warnings
from typing import Any, Literal

from savegame.errors import ConfigError

NATIVE_SUFFIXES = (".weights.h5", ".keras", ".h5")
"""File endings that make ``ModelCheckpoint`` write Keras's own format instead of a savegame checkpoint."""

STATE_ITEM = "keras"
FIT_ITEM = "fit"
INT_FIELDS = ("epoch", "batch")

SaveFreq = Literal["epoch"] | int


# --------------------------------------------------------------------------------------------------
# Keras-native files, atomically


def _fsync_dir(directory: str) -> None:
    """fsync a directory so a rename inside it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def native_kind(path: str) -> Literal["weights", "keras", "h5"] | None:
    if path.endswith(".weights.h5"):
        return "weights"
    if path.endswith(".keras"):
        return "keras"
    if path.endswith(".h5"):
        return "h5"
    return None


def save_native(model: Any, path: str | os.PathLike[str]) -> str:
    """Write ``model`` as a Keras-native file, atomically; returns the absolute path.

    ``.weights.h5``: ``model.save_weights``; ``.keras``: ``model.save``; ``.h5``: Keras's legacy HDF5
    ``model.save``. The file is written under a temporary name in the same directory, fsynced, renamed
    over ``path`` and the directory fsynced: a reader sees the old file or the new one, never a partial
    one, and a crash leaves at most a hidden ``.<name>.tmp-*`` file behind.
    """
    full = os.path.abspath(os.fspath(path))
    kind = native_kind(full)
    if kind is None:
        raise ConfigError(f"save_native: {full!r} must end in .weights.h5, .keras or .h5")
    directory, name = os.path.split(full)
    os.makedirs(directory, exist_ok=True)
    suffix = {"weights": ".weights.h5", "keras": ".keras", "h5": ".h5"}[kind]
    temp = os.path.join(directory, f".{name[: -len(suffix)]}.tmp-{uuid.uuid4().hex[:12]}{suffix}")
    try:
        if kind == "weights":
            model.save_weights(temp, overwrite=True)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Keras warns that .h5 is a legacy format
                model.save(temp, overwrite=True)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, full)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    _fsync_dir(directory)
    return full


