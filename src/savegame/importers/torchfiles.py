"""Torch files (``.pt``, ``.pth``, ``.bin``) and Lightning ``.ckpt`` files -> savegame items.

Read only through :func:`savegame.importers.pickled.load_weights_only`. What the file holds decides the
items, so that ``savegame.load(dest, {"model": model, "optimizer": optimizer})`` restores into the
objects the file came from:

* a flat dict of tensors (``torch.save(model.state_dict())``): the item ``model``;
* a dict of parts (the tutorials' ``{"epoch", "model_state_dict", "optimizer_state_dict", "loss"}``):
  one item per key, the usual names renamed to savegame's (``model_state_dict`` -> ``model``,
  ``optimizer_state_dict`` -> ``optimizer``, ``scheduler_state_dict`` -> ``scheduler``...), each
  rename listed in the report; ``epoch``, ``step`` / ``global_step`` and numeric values such as
  ``loss`` are also recorded as the checkpoint's progress (``savegame ls`` shows them);
* a Lightning checkpoint (``state_dict`` + ``pytorch-lightning_version``): ``model`` (the
  LightningModule's ``state_dict``), ``optimizer`` (or ``optimizers``, a list, for several),
  ``scheduler`` (``schedulers``), and ``loops``, ``callbacks``, ``hyper_parameters``, ``epoch``,
  ``global_step`` as they are; progress from ``epoch`` and ``global_step``;
* anything else (a tensor, a list): the item ``state``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from savegame.importers.pickled import load_weights_only
from savegame.importers.plain import Plain
from savegame.importers.report import Found

__all__ = ["RENAMES", "read_torch", "split_state"]

RENAMES: dict[str, str] = {
    "model_state_dict": "model", "model_state": "model", "state_dict": "model", "net": "model",
    "optimizer_state_dict": "optimizer", "optimizer_state": "optimizer", "optim": "optimizer",
    "scheduler_state_dict": "scheduler", "lr_scheduler": "scheduler", "lr_scheduler_state_dict": "scheduler",
    "scaler_state_dict": "scaler", "grad_scaler": "scaler",
}  # fmt: skip
"""The usual keys of hand-written checkpoint dicts -> savegame's item names."""

_STEP_KEYS = ("global_step", "step", "iteration", "iter")
_LIGHTNING_VERSION = "pytorch-lightning_version"
_MAX_ITEM_NAME = 1024  # what savegame.save takes as an item name


def _is_item_name(key: Any) -> bool:
    """Whether a top-level key can be an item name as it is (a non-empty string of at most 1024 characters)."""
    return type(key) is str and 0 < len(key) <= _MAX_ITEM_NAME


def read_torch(path: str) -> Found:
    """Read a torch or Lightning file (see the module docstring)."""
    loaded = load_weights_only(path)
    if isinstance(loaded, Mapping) and "state_dict" in loaded and _LIGHTNING_VERSION in loaded:
        return _lightning(loaded, path)
    found = Found(format="torch")
    split_state(loaded, found, Plain(path))
    return found


def split_state(loaded: Any, found: Found, plain: Plain) -> None:
    """Fill ``found`` with the items (and progress) of an object read from a torch file."""
    if not isinstance(loaded, Mapping) or not loaded or not all(_is_item_name(k) for k in loaded):
        _add(found, plain, "state", loaded, "the whole file")
    elif _is_tensor_dict(loaded):
        _add(found, plain, "model", loaded, "the whole file (a state dict)")
    else:
        targets = [RENAMES.get(key, key) for key in loaded]
        for key, value in loaded.items():
            key = str(key)
            name = RENAMES.get(key, key)
            if name != key and (name in loaded or targets.count(name) > 1):
                name = key  # both spellings, or two keys of one meaning, present: keep the file's names
            _add(found, plain, name, value, key)
            if name != key:
                found.converted.append(f"{key} -> item {name!r}")
        found.progress.update(_progress(loaded))
    found.converted += plain.converted
    found.skipped += plain.skipped


def _add(found: Found, plain: Plain, name: str, value: Any, source: str) -> None:
    keep, stored = plain.value(value, name)
    if keep:
        found.items[name] = stored
        found.sources[name] = source


def _is_tensor_dict(value: Mapping[str, Any]) -> bool:
    from savegame.adapters import torch_if_imported

    torch = torch_if_imported()
    return torch is not None and all(isinstance(v, torch.Tensor) for v in value.values())


def _number(value: Any) -> float | None:
    """A plain number from an int, a float or a one-element tensor (``loss.item()`` forgotten)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    numel = getattr(value, "numel", None)
    if callable(numel) and numel() == 1 and getattr(value, "is_floating_point", lambda: False)():
        return float(value.item())
    return None


def _progress(loaded: Mapping[str, Any]) -> dict[str, Any]:
    """``epoch``, ``step`` and numeric metrics (``loss``, ``val_acc``...) of a checkpoint dict."""
    progress: dict[str, Any] = {}
    epoch = loaded.get("epoch")
    if type(epoch) is int:
        progress["epoch"] = epoch
    for key in _STEP_KEYS:
        if type(loaded.get(key)) is int:
            progress["step"] = loaded[key]
            break
    metrics = {}
    for key, value in loaded.items():
        if key in ("epoch", *_STEP_KEYS):
            continue
        number = _number(value)
        if number is not None and not isinstance(value, int):  # ints are counters, not metrics
            metrics[key] = number
    if metrics:
        progress["metrics"] = metrics
    return progress


def _lightning(loaded: Mapping[str, Any], path: str) -> Found:
    found = Found(format="lightning", metadata={"lightning_version": str(loaded.get(_LIGHTNING_VERSION))})
    plain = Plain(path)
    plural = {"optimizer_states": ("optimizer", "optimizers"), "lr_schedulers": ("scheduler", "schedulers")}
    for key, value in loaded.items():
        if key == _LIGHTNING_VERSION:
            continue
        if not _is_item_name(key):
            shown = repr(key) if len(repr(key)) <= 100 else repr(key)[:100] + "..."
            found.skipped.append(f"top-level key {shown}: not an item name (a non-empty string of at most "
                                 f"{_MAX_ITEM_NAME} characters)")  # fmt: skip
        elif key == "state_dict" and "model" not in loaded:  # a key 'model' of the file's own keeps its name
            _add(found, plain, "model", value, key)
            found.converted.append("state_dict -> item 'model' (the LightningModule's state_dict)")
        elif key in plural and isinstance(value, list) and value and plural[key][len(value) > 1] not in loaded:
            one, many = plural[key]
            if len(value) == 1:
                _add(found, plain, one, value[0], f"{key}[0]")
                found.converted.append(f"{key}[0] -> item {one!r}")
            else:
                _add(found, plain, many, value, key)
                found.converted.append(f"{key} -> item {many!r} (a list, in the order of configure_optimizers)")
        else:
            _add(found, plain, key, value, key)
    epoch, step = loaded.get("epoch"), loaded.get("global_step")
    found.progress.update({k: v for k, v in (("epoch", epoch), ("step", step)) if type(v) is int})
    found.converted += plain.converted
    found.skipped += plain.skipped
    return found
