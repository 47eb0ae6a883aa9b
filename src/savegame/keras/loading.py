"""Loading and export outside ``fit``: :func:`load_weights`, :func:`restore` and :func:`export_weights`
(checkpoint -> Keras-native ``.weights.h5``).
"""

from __future__ import annotations

import os
from typing import Any

from savegame.adapters.keras import (
    KerasLoadReport,
    KerasState,
)
from savegame.api import load as _load_checkpoint
from savegame.api import read_manifest
from savegame.errors import CheckpointNotFoundError, NotACheckpointError
from savegame.keras.files import (
    STATE_ITEM,
    native_kind,
    save_native,
)
from savegame.run.index import RunIndex

# --------------------------------------------------------------------------------------------------
# Loading and export


def _resolve(path: str | os.PathLike[str], which: str) -> str:
    """The checkpoint directory ``path`` names: a checkpoint, or a root plus ``which`` (``"latest"``,
    ``"best"`` by the monitor and mode its manifests record, or a name; see :class:`RunIndex`).
    Only reads: no lock, no clean-up, nothing written into the root."""
    full = os.path.abspath(os.fspath(path))
    if not os.path.exists(full):
        raise CheckpointNotFoundError(f"{full}: no such checkpoint or checkpoint directory")
    if os.path.isfile(os.path.join(full, "manifest.json")):
        return full
    index = RunIndex.open(full)
    return index.storage.path(index.resolve(which))


def load_weights(
    model: Any,
    path: str | os.PathLike[str],
    *,
    which: str = "latest",
    strict: bool = True,
    include_optimizer: bool = True,
    verify: bool = True,
) -> KerasLoadReport | None:
    """Load weights into ``model`` from a savegame checkpoint or a Keras-native file.

    ``path``: one checkpoint directory; a checkpoint root (what ``ModelCheckpoint``'s ``filepath``
    pointed to: the directory part of a template, or the fixed path) with ``which`` = ``"latest"``,
    ``"best"`` or a checkpoint name; or a ``.weights.h5``/``.keras`` file (``model.load_weights``).
    Like Keras, the optimizer's variables are restored too when the checkpoint has them and the model is
    compiled (``include_optimizer=False`` to skip them); random state is not touched.
    ``strict``: missing/unexpected/shape-mismatched variables raise :class:`StateMismatchError` with a
    report; ``strict=False`` loads what matches. Returns the :class:`KerasLoadReport` (None for native
    files).
    """
    full = os.fspath(path)
    if native_kind(full) is not None and os.path.isfile(full):
        model.load_weights(full)
        return None
    directory = _resolve(full, which)
    manifest = read_manifest(directory)
    if STATE_ITEM not in manifest.items:
        raise NotACheckpointError(f"{directory}: not a Keras checkpoint (items: {sorted(manifest.items)})")
    raw = _load_checkpoint(directory, verify=verify)
    state = dict(raw[STATE_ITEM])
    state.pop("rng", None)
    state.pop("seed_generators", None)
    compiled = getattr(model, "optimizer", None) is not None
    with_optimizer = include_optimizer and compiled and "optimizer" in state
    if not with_optimizer:
        state.pop("optimizer", None)  # an uncompiled model has no optimizer variables to restore
    target = KerasState(model, include_optimizer=with_optimizer, include_rng=False)
    return target.load_state_dict(state, strict=strict)


def restore(
    model: Any, path: str | os.PathLike[str], *, which: str = "latest", strict: bool = True, verify: bool = True
) -> KerasLoadReport:
    """Restore the full training state (weights, optimizer, random state) of a checkpoint into ``model``."""
    directory = _resolve(path, which)
    raw = _load_checkpoint(directory, verify=verify)
    if STATE_ITEM not in raw:
        raise NotACheckpointError(f"{directory}: not a Keras checkpoint (items: {sorted(raw)})")
    return KerasState(model).load_state_dict(raw[STATE_ITEM], strict=strict)


def export_weights(
    model: Any,
    checkpoint: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    which: str = "best",
    strict: bool = True,
) -> str:
    """Load ``checkpoint`` (a checkpoint or a root plus ``which``) into ``model`` and write a native file.

    ``destination`` ends in ``.weights.h5`` (weights, and optimizer variables when compiled, as Keras
    writes them) or ``.keras`` (the whole model). Written atomically; returns its absolute path.
    """
    try:
        load_weights(model, checkpoint, which=which, strict=strict)
    except CheckpointNotFoundError:
        if which != "best":
            raise
        load_weights(model, checkpoint, which="latest", strict=strict)
    return save_native(model, destination)

