"""Which tensors of a state only ``optimizer.step()`` changes: what a lazy snapshot may copy late.

A lazy background save (``snapshot="lazy"``, :mod:`savegame.engine.lazy`) copies these tensors after the
save call returned, during the next forward/backward, and holds the next ``step()`` of their optimizer
until the copy is done. The rule, kept deliberately narrow so that everything else stays eager:

* a tensor is *owned* when it is a parameter in the ``param_groups`` of a torch optimizer that is an item
  of the saved state, or a tensor of that optimizer's per-parameter ``state`` (moments, momentum);
* only the items that are a module or an optimizer are walked lazily (:func:`lazy_item`): the same memory
  reached through a bare tensor item, a dict or a list is copied eagerly;
* CPU tensors only (a CUDA tensor's device-to-host copy is already asynchronous and eager);
* the optimizer whose ``step()`` waits is the one that runs step hooks (:func:`stepping_optimizer`): a
  wrapper that subclasses ``Optimizer`` without initialising it (accelerate's ``AcceleratedOptimizer``)
  has none, so its wrapped optimizer is hooked; where none is found its tensors are copied eagerly.

Module buffers (BatchNorm running stats change in forward), frozen parameters, the RNG state and plain
values are not owned and are captured before the save call returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

OwnedKey = tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype]
"""A tensor's memory and view (first element's address, shape, strides, dtype): the same for the
parameter, its ``state_dict()`` alias (``detach()``) and the optimizer state dict's reference."""


@dataclass
class Owned:
    """An owned tensor: a readable name for messages and the optimizers whose ``step()`` change it."""

    name: str
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)


def tensor_key(t: object) -> OwnedKey | None:
    """The :data:`OwnedKey` of a non-empty strided CPU tensor, else None (never copied lazily: a sparse
    tensor has no single data pointer, and the eager encoder says it cannot be stored)."""
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.layout != torch.strided or t.numel() == 0:
        return None
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


def lazy_item(value: object) -> bool:
    """Whether a state item may hold lazily copied tensors: a module or an optimizer (not a bare tensor,
    dict or list, whose tensors are copied eagerly)."""
    return isinstance(value, (torch.nn.Module, torch.optim.Optimizer))


def stepping_optimizer(value: torch.optim.Optimizer) -> torch.optim.Optimizer | None:
    """The optimizer whose ``step()`` runs the step pre-hooks for ``value``: ``value`` itself when
    ``Optimizer.__init__`` set it up, else the optimizer it wraps (``.optimizer``, as accelerate's
    ``AcceleratedOptimizer``, whose own ``step`` runs no hooks and calls the wrapped one's), else None."""
    seen: set[int] = set()
    current: object = value
    while isinstance(current, torch.optim.Optimizer) and id(current) not in seen:
        if "_optimizer_step_pre_hooks" in vars(current):
            return current
        seen.add(id(current))
        current = getattr(current, "optimizer", None)
    return None


def optimizer_owned(state: Mapping[str, Any]) -> dict[OwnedKey, Owned]:
    """Every owned tensor of ``state`` (see the module docstring), by :func:`tensor_key`.

    A parameter is named after the module item that holds it (``model.fc.weight``), optimizer state
    after the parameter (``optimizer: exp_avg of model.fc.weight``).
    """
    names: dict[int, str] = {}
    for item, value in state.items():
        if isinstance(value, torch.nn.Module):
            for pname, p in value.named_parameters():
                names.setdefault(id(p), f"{item}.{pname}")
    owned: dict[OwnedKey, Owned] = {}
    for item, value in state.items():
        if not isinstance(value, torch.optim.Optimizer):
            continue
        stepping = stepping_optimizer(value)
        if stepping is None:  # no step hook can hold its next step: its tensors are copied eagerly
            continue
        index = 0
        for group in value.param_groups:
            for p in group["params"]:
                pname = names.get(id(p), f"{item}: parameter {index}")
                index += 1
                _own(owned, p, pname, stepping)
                for key, t in value.state.get(p, {}).items():
                    _own(owned, t, f"{item}: {key} of {pname}", stepping)
    return owned


def _own(owned: dict[OwnedKey, Owned], t: object, name: str, optimizer: torch.optim.Optimizer) -> None:
    key = tensor_key(t)
    if key is None:
        return
    entry = owned.get(key)
    if entry is None:
        entry = owned[key] = Owned(name)
    if not any(o is optimizer for o in entry.optimizers):
        entry.optimizers.append(optimizer)
