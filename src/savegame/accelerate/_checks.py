"""Checks of :mod:`savegame.accelerate` made before anything is restored: the first argument is an
``Accelerator`` of a supported kind, the checkpoint holds this accelerator's items, and (strict loads) its
models' keys and shapes and its optimizers' parameter groups match, so that a mismatch found in a later
item cannot leave the earlier ones restored.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import accelerate as _accelerate  # type: ignore[import-untyped]
import torch

from savegame import distributed as _dist
from savegame.adapters.torch_restore import match_names
from savegame.api import decode_item
from savegame.errors import ConfigError, StateMismatchError
from savegame.format.manifest import Manifest
from savegame.format.tree import decode_plain
from savegame.storage.base import SavedAt

POSITION = "position"
"""The item holding the training position the caller passed (``epoch``, ``batches_seen``, ``step``)."""


_ENGINES = ("FSDP", "DEEPSPEED", "MEGATRON_LM")
"""Distributed types whose engines shard or own the model and optimizer state (not covered here)."""


def check_accelerator(accelerator: object) -> None:
    """The first argument must be the ``Accelerator`` itself (not the model, a path or None): say so instead
    of an ``AttributeError`` from deep inside."""
    if not isinstance(accelerator, _accelerate.Accelerator):
        raise ConfigError(
            f"savegame.accelerate: the first argument must be the accelerate.Accelerator that prepared the model, "
            f"optimizer and dataloaders, got {type(accelerator).__name__} {str(accelerator)[:60]!r}; call e.g. "
            "save_state(accelerator, output_dir)"
        )


def check_supported(accelerator: Any) -> None:
    kind = str(getattr(accelerator.distributed_type, "name", accelerator.distributed_type))
    if kind in _ENGINES:
        raise ConfigError(
            f"savegame.accelerate does not cover distributed_type={kind} (its engine writes its own sharded "
            "files); use Accelerator.save_state for it, or savegame.distributed for FSDP2 models"
        )


def check_structure(
    path: SavedAt, manifest: Manifest, state: Mapping[str, Any], *, storage_options: Mapping[str, Any] | None = None
) -> None:
    """What a strict restore would refuse only after restoring the items saved before it, refused first:
    a model's keys (its shapes are checked before anything changes by the restore of the first model, the
    first item with tensors), an optimizer's parameter groups.

    A further model's shapes are compared on the saved tensors (read lazily, a memory map for a local
    checkpoint), so that the first model is not restored while the second one does not match.
    """
    where = str(path)
    models = [name for name, obj in state.items() if isinstance(obj, torch.nn.Module)]
    problems: list[str] = []
    for name in models:
        entry = manifest.items.get(name)
        if entry is None or not isinstance(entry.skeleton, Mapping) or "$" in entry.skeleton:
            continue  # (a skeleton with a tag is not a plain key -> tensor mapping: left to the restore)
        live = state[name].state_dict()
        saved_keys = match_names(dict.fromkeys(entry.skeleton), live)
        missing = [k for k in live if k not in saved_keys]
        unexpected = [k for k in saved_keys if k not in live]
        if missing or unexpected:
            problems.append(f"{name}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for name in models[1:]:
        if name not in manifest.items or problems:
            continue
        saved = decode_item(path, manifest, name, verify=False, storage_options=storage_options)
        if isinstance(saved, Mapping):
            live = state[name].state_dict()
            for key, value in match_names(saved, live).items():
                want = live.get(key)
                if isinstance(value, torch.Tensor) and isinstance(want, torch.Tensor) and value.shape != want.shape:
                    problems.append(f"{name}: {key} has shape {list(value.shape)} in the checkpoint, "
                                    f"{list(want.shape)} here")  # fmt: skip
    for name, obj in state.items():
        entry = manifest.items.get(name)
        if not isinstance(obj, torch.optim.Optimizer) or entry is None or not isinstance(entry.skeleton, Mapping):
            continue
        groups = decode_plain(entry.skeleton.get("param_groups"))
        if not isinstance(groups, list):
            continue
        saved_sizes = [len(g.get("params", ())) if isinstance(g, Mapping) else None for g in groups]
        live_sizes = [len(g["params"]) for g in obj.param_groups]
        if saved_sizes != live_sizes:
            problems.append(f"{name}: parameter groups of sizes {saved_sizes} in the checkpoint, {live_sizes} here")
    if problems:
        listed = "; ".join(problems)
        raise StateMismatchError(
            f"{where}: the checkpoint does not match this accelerator's objects (nothing was restored): {listed}. "
            "Build the same models and optimizers as the run that saved it, or pass strict=False to load what matches"
        )


def check_items(
    manifest: Manifest, state: Mapping[str, Any], *, where: str, strict: bool, ignored: Collection[str] = ()
) -> None:
    """The checkpoint must hold this accelerator's items: a second model or a registered object too many
    or too few would otherwise be skipped without a word. ``ignored``: items not restored (``rng`` of a
    ``Checkpoints(rng=False)``)."""
    saved = _dist.item_names(manifest) - {POSITION, *ignored}
    wanted = set(state) - {POSITION, *ignored}
    if saved == wanted or (not strict and wanted <= saved):
        return
    raise StateMismatchError(
        f"{where}: the checkpoint holds {sorted(saved)} but this accelerator has {sorted(wanted)}; prepare the "
        "same models, optimizers, schedulers and dataloaders (and register the same objects with "
        "register_for_checkpointing) as the run that saved it"
    )
