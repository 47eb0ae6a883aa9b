"""What each item of a multi-process state is: replicated, per-rank or sharded (DTensor / FSDP2)
(:func:`classify`), and the sharded state dicts of modules and their optimizers.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch

from savegame.adapters.rng import RNGState, capture_generator
from savegame.distributed.dcp import (
    PathKey,
)
from savegame.distributed.ranks import (
    LAYOUT_ITEM,
    RANK_SUFFIX,
)
from savegame.errors import (
    ConfigError,
    InvalidNameError,
)
from savegame.format.tree import contains

# ---------------------------------------------------------------------------------------------------
# What each item is


def _is_dtensor(obj: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(obj, DTensor)


def _holds_dtensor(node: Any) -> bool:
    return contains(node, _is_dtensor)


def is_sharded(value: object) -> bool:
    if isinstance(value, torch.nn.Module):
        return any(_is_dtensor(t) for t in (*value.parameters(), *value.buffers()))
    if isinstance(value, torch.optim.Optimizer):
        return any(_is_dtensor(p) for group in value.param_groups for p in group["params"])
    if isinstance(value, (Mapping, list)):
        return _holds_dtensor(value)
    return False


def classify(state: Mapping[str, Any], *, per_rank: Collection[str] = ()) -> dict[str, str]:
    """How each item is saved: ``"replicated"`` (rank 0), ``"per_rank"`` (every rank) or ``"sharded"``."""
    unknown = [n for n in per_rank if n not in state]
    if unknown:
        raise ConfigError(f"per_rank names items that are not in the state: {unknown}")
    plan: dict[str, str] = {}
    for name, value in state.items():
        if not isinstance(name, str) or not name:
            raise InvalidNameError(f"item names must be non-empty strings, got {name!r}")
        if name == LAYOUT_ITEM or RANK_SUFFIX.search(name):
            raise InvalidNameError(f"item name {name!r} is reserved for distributed checkpoints")
        if name in per_rank or isinstance(value, RNGState) or capture_generator(value) is not None:
            plan[name] = "per_rank"
        elif is_sharded(value):
            plan[name] = "sharded"
        else:
            plan[name] = "replicated"
    return plan


def rank_item(name: str, rank: int) -> str:
    return f"{name}.rank{rank}"


def owner_module(opt: torch.optim.Optimizer, modules: Mapping[str, torch.nn.Module], where: str) -> torch.nn.Module:
    """The model item whose parameters the optimizer updates (DCP's state_dict helpers need it)."""
    wanted = {id(p) for group in opt.param_groups for p in group["params"]}
    for module in modules.values():
        if wanted <= {id(p) for p in module.parameters()}:
            return module
    raise ConfigError(
        f"{where}: a sharded optimizer needs its model in the same state (an nn.Module item whose parameters "
        "it updates); none was found"
    )


def sharded_state_dicts(items: Mapping[str, Any], everything: Mapping[str, Any]) -> dict[str, Any]:
    """DCP-style state dicts of the sharded items: modules and optimizers keyed by parameter FQN."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    modules = {k: v for k, v in everything.items() if isinstance(v, torch.nn.Module)}
    out: dict[str, Any] = {}
    for name, value in items.items():
        if isinstance(value, torch.nn.Module):
            out[name] = get_model_state_dict(value)
        elif isinstance(value, torch.optim.Optimizer):
            out[name] = get_optimizer_state_dict(owner_module(value, modules, name), value)
        else:
            out[name] = value
    return out


class Fqns:
    """Unique DCP keys for tensor paths: ``item.path.parts`` (``#n`` appended on a clash)."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def make(self, item: str, path: PathKey) -> str:
        base = ".".join([item, *(str(p) for p in path)])
        key, n = base, 1
        while key in self.used:
            n += 1
            key = f"{base}#{n}"
        self.used.add(key)
        return key


