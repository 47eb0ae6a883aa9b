"""Checks of skeleton values that only forged or damaged manifests fail, shared by ``verify`` and ``load``.

The tree codec (:mod:`savegame.format.tree`) checks the *shape* of a skeleton; these check what its torch values
and item kinds mean, so that :func:`savegame.verify`, ``savegame verify`` and :func:`savegame.load` refuse
the same manifests with the same :class:`~savegame.InvalidManifestError` (a
:class:`~savegame.CorruptCheckpointError`, so ``Checkpointer.restore`` quarantines the checkpoint and
falls back to the next older one) instead of a ``TypeError`` from deep inside torch, or a tensor that
silently has no data. Nothing here knows torch: the caller hands in the framework's own decoders of
these tags (``savegame.adapters.framework_decode_tags``: torch's dtype table and device parser when the
program has imported torch, exactly as ``load`` uses them), otherwise values are checked by their form
(a dtype name such as ``__class__`` is refused either way).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from savegame.errors import InvalidManifestError

OPTIMIZER_KIND = "torch.optim.Optimizer"
SHARDED_FORMAT = "savegame.sharded"  # the format tag of a sharded item's skeleton (savegame.distributed.dcp)
"""The item kind :func:`savegame.engine.capture.kind_of` records for a torch optimizer."""

MAX_NDIM = 64
_DEVICE = re.compile(r"[a-z][a-z0-9_]{0,31}(:[0-9]{1,6})?")
_DTYPE_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")


def check_size(value: object) -> list[int]:
    """A ``torch.Size`` node's value: a list of at most 64 dimensions in ``[0, 2**63)``."""
    if type(value) is not list or len(value) > MAX_NDIM or not all(type(d) is int and 0 <= d < 2**63 for d in value):
        raise InvalidManifestError(f"invalid torch.Size {str(value)[:100]}")
    return value


def check_device(value: object) -> str:
    """A device string as torch writes it (``cpu``, ``cuda:1``, ``mps``...), checked by its form."""
    if type(value) is not str or not _DEVICE.fullmatch(value):
        raise InvalidManifestError(f"invalid torch.device {str(value)[:40]!r}")
    return value


def check_dtype_name(value: object) -> str:
    """A ``torch.dtype`` node's value by its form (``float32``); :func:`tag_checkers` also looks it up."""
    if type(value) is not str or not _DTYPE_NAME.fullmatch(value):
        raise InvalidManifestError(f"unknown torch dtype {str(value)[:40]!r}")
    return value


def tag_checkers(
    framework_tags: Callable[[], Mapping[str, Callable[[Any], object]]],
) -> dict[str, Callable[[Any], object]]:
    """Decoder tags for verification: each torch value checked as :func:`savegame.load` checks it, by
    the decoders ``framework_tags()`` returns (asked once, at the first such value; ``{}``: by form
    only), without building tensors."""
    torch_tags: list[Mapping[str, Callable[[Any], object]]] = []

    def torch_tag(name: str) -> Callable[[Any], object]:
        def check(value: Any) -> object:
            if not torch_tags:
                torch_tags.append(framework_tags())
            full = torch_tags[0].get(name)
            return full(value) if full is not None else _FORM_CHECKS[name](value)

        return check

    return {name: torch_tag(name) for name in _FORM_CHECKS}


_FORM_CHECKS: dict[str, Callable[[Any], object]] = {
    "torch.dtype": check_dtype_name,
    "torch.Size": check_size,
    "torch.device": check_device,
}


def check_tensor_node(node: Mapping[str, Any], where: object) -> None:
    """The fields of a ``tensor`` node other than its bytes: ``device`` (a device string, never ``meta``:
    savegame refuses to save meta tensors, which hold no data, so one here is forged) and the flags."""
    device = node.get("device")
    if device is not None:
        try:
            check_device(device)
        except InvalidManifestError as exc:
            raise InvalidManifestError(f"{where}: {exc}") from None
        if device.split(":", 1)[0] == "meta":
            raise InvalidManifestError(
                f"{where}: tensor recorded on the 'meta' device, which holds no data (savegame never saves one: "
                "the manifest is forged or damaged)"
            )
    for flag in ("param", "requires_grad"):
        if flag in node and type(node[flag]) is not bool:
            raise InvalidManifestError(f"{where}: tensor field {flag!r} must be true or false")


def check_item_value(kind: str, value: object, where: str) -> None:
    """What an item of ``kind`` must be once decoded (arrays may be None in verification): a torch
    optimizer's state dict has the structure ``load_state_dict`` relies on. A sharded item (written by
    :mod:`savegame.distributed`) wraps that state with its shard records: its ``state`` is checked."""
    if kind == OPTIMIZER_KIND:
        if isinstance(value, Mapping) and value.get("format") == SHARDED_FORMAT:
            value = value.get("state")
            where = f"{where} (sharded)"
        check_optimizer_state(value, where)


def check_optimizer_state(value: object, where: str) -> None:
    """A torch optimizer state dict: ``{"state": {param id: {name: value}}, "param_groups": [{"params":
    [param ids], ...}]}``. Anything else (``param_groups: 5``) makes ``Optimizer.load_state_dict`` raise a
    bare ``TypeError``/``AttributeError``; this raises :class:`InvalidManifestError` naming the field."""
    if not isinstance(value, Mapping):
        raise InvalidManifestError(f"{where}: an optimizer state must be a dict, not {type(value).__name__}")
    state, groups = value.get("state"), value.get("param_groups")
    if not isinstance(state, Mapping) or not all(isinstance(v, Mapping) for v in state.values()):
        raise InvalidManifestError(f"{where}.state: must map parameter ids to dicts, not {_what(state)}")
    if not isinstance(groups, list) or not all(isinstance(g, Mapping) for g in groups):
        raise InvalidManifestError(f"{where}.param_groups: must be a list of dicts, not {_what(groups)}")
    for i, group in enumerate(groups):
        params = group.get("params")
        if not isinstance(params, list) or not all(type(p) in (int, str) for p in params):
            raise InvalidManifestError(f"{where}.param_groups.{i}.params: must be a list of parameter ids")


def _what(value: object) -> str:
    return f"{type(value).__name__} {str(value)[:40]}"
