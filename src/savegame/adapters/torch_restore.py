"""PyTorch modules and optimizers restored in place from a decoded state, and the name rules both
directions share (``torch.compile``'s ``_orig_mod.`` segments).

Split from :mod:`savegame.adapters.torch` (tensors in and out of tensor files, snapshots), which
re-exports :func:`restore_module`, :func:`restore_optimizer` and :data:`ModuleReport`. Imported only when
torch is already imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.nn.parameter import is_lazy

from savegame.adapters.report import LoadReport
from savegame.errors import StateMismatchError
from savegame.format.checks import check_optimizer_state

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
"""The tensor types the fast paths handle (a subclass may customise copying or saving)."""

ModuleReport = LoadReport
"""The old name of the report of a module restore: :class:`savegame.adapters.report.LoadReport`."""


_COMPILED = "_orig_mod"
"""The attribute ``torch.compile``'s ``OptimizedModule`` keeps the original module under: its state dict
keys (and those of a model holding a compiled submodule) carry an extra ``_orig_mod.`` segment."""


def _plain_name(key: str) -> str:
    """A state-dict key without the ``_orig_mod.`` segments of ``torch.compile`` (``_orig_mod.fc.weight``
    and ``enc._orig_mod.fc.weight`` -> ``fc.weight``, ``enc.fc.weight``)."""
    if _COMPILED not in key:
        return key
    return ".".join(part for part in key.split(".") if part != _COMPILED)


def plain_names(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` keyed by :func:`_plain_name` (as it would be without ``torch.compile``); unchanged when
    that would merge two keys (a module that really has a submodule called ``_orig_mod``)."""
    if _COMPILED not in "\n".join(state):  # (one search instead of one per key: "\n" is not in _COMPILED)
        return dict(state)
    renamed = {_plain_name(k): v for k, v in state.items()}
    return renamed if len(renamed) == len(state) else dict(state)


def _match_names(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> dict[str, Any]:
    """``saved`` keyed by the names of ``expected`` (the target module's state dict) wherever they differ
    only by ``torch.compile``'s ``_orig_mod.`` segments or DDP's ``module.`` prefix, either way round:
    a compiled model's checkpoint loads into the plain model, a plain one into the compiled model, and
    either into or out of DDP. Keys that match nothing keep their saved name (reported unexpected)."""
    if saved.keys() == expected.keys():  # the usual case: nothing to rename (the walk below would agree)
        return dict(saved)
    live = {_plain_name(k): k for k in expected}
    if len(live) != len(expected):  # ambiguous without the segments: exact names only
        live = {k: k for k in expected}
    return {live.get(k, k): v for k, v in _strip_ddp_prefix(plain_names(saved), live).items()}


match_names = _match_names
"""The public name of :func:`_match_names`, for integrations that check a checkpoint's keys against a
model before restoring anything (``savegame.accelerate``)."""


def _strip_ddp_prefix(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> dict[str, Any]:
    """Make ``module.``-prefixed (DDP) keys match a plain model and back."""
    prefix = "module."
    saved_has = bool(saved) and all(k.startswith(prefix) for k in saved)
    expected_has = bool(expected) and all(k.startswith(prefix) for k in expected)
    if saved_has and not expected_has:
        return {k[len(prefix) :]: v for k, v in saved.items()}
    if expected_has and not saved_has:
        return {prefix + k: v for k, v in saved.items()}
    return dict(saved)


def check_module(module: torch.nn.Module, state: object, *, where: str) -> None:
    """Raise the :class:`StateMismatchError` a strict :func:`restore_module` of ``state`` would raise, without
    changing anything (asked for the items after the first, before any is restored)."""
    report, _, _ = _module_report(module, state, where)
    if not report.clean:
        raise StateMismatchError(report.describe(where) + " (pass strict=False to load what matches)", report)


def restore_module(module: torch.nn.Module, state: object, *, strict: bool, where: str) -> ModuleReport:
    """Load ``state`` into ``module`` in place; strict refuses any mismatch before changing anything."""
    report, usable, expected = _module_report(module, state, where)
    if strict and not report.clean:
        raise StateMismatchError(report.describe(where) + " (pass strict=False to load what matches)", report)
    try:
        if _plain_module_tree(module) and _plain_pairs(usable, expected):
            with torch.no_grad():
                for k, v in usable.items():
                    expected[k].copy_(v)
        else:
            module.load_state_dict(usable, strict=False)
    except RuntimeError as exc:
        raise StateMismatchError(f"{where}: {exc}", report) from None
    report.loaded = list(usable)
    return report


def _module_report(
    module: torch.nn.Module, state: object, where: str
) -> tuple[ModuleReport, dict[str, Any], dict[str, Any]]:
    """What loading ``state`` into ``module`` would do: the report (missing, unexpected and mismatched keys),
    the values that can be loaded, and the module's own state dict (its live tensors)."""
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise StateMismatchError(f"{where}: checkpoint holds {type(state).__name__}, not a module state dict")
    expected = module.state_dict(keep_vars=True)
    saved = _match_names(state, expected)
    report = ModuleReport()
    report.missing_keys = [k for k in expected if k not in saved]
    report.unexpected_keys = [k for k in saved if k not in expected]
    usable: dict[str, Any] = {}
    for k, v in saved.items():
        if k not in expected:
            continue
        want = expected[k]
        if (
            isinstance(v, torch.Tensor) and isinstance(want, torch.Tensor) and not is_lazy(want)
            and v.shape != want.shape
        ):  # an uninitialised (lazy) parameter takes its shape from the state, as in load_state_dict
            report.mismatched_keys.append((k, tuple(v.shape), tuple(want.shape)))
            continue
        usable[k] = v
    return report, usable, expected


_BASE_LOAD = torch.nn.Module._load_from_state_dict
_BASE_SET_EXTRA = torch.nn.Module.set_extra_state


def _plain_module_tree(module: torch.nn.Module) -> bool:
    """Whether ``load_state_dict`` would do nothing but ``param.copy_(value)`` for each key of this tree.

    True when no module of the tree overrides ``_load_from_state_dict`` (BatchNorm's version upgrade,
    quantized modules) or ``set_extra_state``, none has load-state-dict pre/post hooks (lazy modules,
    user hooks) and torch is not set to swap tensors on load. Copying directly then has the same
    effect without torch's per-module prefix filtering of the whole state dict (quadratic in depth).
    """
    if torch.__future__.get_swap_module_params_on_conversion():
        return False
    for m in module.modules():
        cls = type(m)
        if (
            cls._load_from_state_dict is not _BASE_LOAD
            or cls.set_extra_state is not _BASE_SET_EXTRA
            or m._load_state_dict_pre_hooks
            or m._load_state_dict_post_hooks
        ):
            return False
    return True


def _plain_pairs(usable: Mapping[str, Any], expected: Mapping[str, Any]) -> bool:
    """Whether every value and its destination are plain tensors of the same shape (no meta destination,
    whose copy torch turns into a warning; no tensor subclass with its own copy semantics)."""
    for k, v in usable.items():
        dest = expected[k]
        if type(v) not in _PLAIN_TENSORS or type(dest) not in _PLAIN_TENSORS or dest.is_meta or v.shape != dest.shape:
            return False
    return True




def check_optimizer(optimizer: torch.optim.Optimizer, state: object, *, where: str) -> None:
    """:class:`StateMismatchError` for an optimizer state that does not fit ``optimizer``, without changing
    anything: parameter groups of other sizes (torch's ``load_state_dict`` refuses them), groups of another
    algorithm (AdamW's into an SGD) and per-parameter state of other shapes (both of which torch takes
    silently, and the next ``step()`` fails)."""
    if not isinstance(state, Mapping):
        raise StateMismatchError(f"{where}: checkpoint holds {type(state).__name__}, not an optimizer state")
    if "state" in state or "param_groups" in state:
        check_optimizer_state(state, where)
    groups = state.get("param_groups")
    if not isinstance(groups, list):
        return  # (an optimizer with a state_dict of its own: left to its load_state_dict)
    saved = [len(g["params"]) if isinstance(g, Mapping) and isinstance(g.get("params"), list) else None for g in groups]
    live = [len(g["params"]) for g in optimizer.param_groups]
    if saved != live:
        raise StateMismatchError(
            f"{where}: the checkpoint's optimizer has parameter groups of sizes {saved}, this one {live}: build the "
            "optimizer over the same parameters as the run that saved it"
        )
    for group, live_group in zip(groups, optimizer.param_groups):
        extra = set(group) - set(live_group) - _GROUP_BOOKKEEPING
        missing = set(live_group) - set(group) - _GROUP_BOOKKEEPING
        if extra and missing:  # another torch version only adds or only lacks settings; another algorithm both
            raise StateMismatchError(
                f"{where}: the checkpoint's optimizer is of another kind: its parameter groups have "
                f"{sorted(extra)} and lack {sorted(missing)}, which this {type(optimizer).__name__} has; build the "
                "optimizer the run that saved it used (or leave it out of the target)"
            )
    _check_state_shapes(optimizer, groups, state.get("state"), where=where)


def _check_state_shapes(optimizer: torch.optim.Optimizer, groups: list[Any], saved: object, *, where: str) -> None:
    """Each saved per-parameter buffer that torch's optimizers keep in the parameter's shape
    (:data:`_PARAM_SHAPED`: Adam's ``exp_avg``, SGD's ``momentum_buffer``...) has it: torch loads one of
    another shape silently and the next ``step()`` fails in the middle of training. Other state (LBFGS's
    flat history, Adafactor's factored ``row_var``) has shapes of its own and is not compared."""
    if not isinstance(saved, Mapping):
        return
    live = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in groups for i in g["params"]]
    for saved_id, param in zip(ids, live):
        entry = saved.get(saved_id)
        if not isinstance(entry, Mapping):
            continue
        for key, value in entry.items():
            if key in _PARAM_SHAPED and isinstance(value, torch.Tensor) and value.dim() > 0 \
                    and value.shape != param.shape:  # fmt: skip
                raise StateMismatchError(
                    f"{where}: the checkpoint's optimizer state {key!r} of parameter {saved_id} has shape "
                    f"{list(value.shape)}, the parameter {list(param.shape)}: build the model and optimizer the "
                    "run that saved it used (or leave the optimizer out of the target)"
                )


_PARAM_SHAPED = frozenset({
    "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "grad_avg", "acc_delta", "sum",
    "exp_inf", "ax", "prev", "step_size",
})  # fmt: skip
"""Per-parameter state of torch's optimizers that has the parameter's shape."""

_GROUP_BOOKKEEPING = frozenset({"params", "param_names", "initial_lr"})
"""Keys of a parameter group that are not the algorithm's settings (schedulers add ``initial_lr``)."""


def restore_optimizer(optimizer: torch.optim.Optimizer, state: object, *, where: str) -> None:
    """Load an optimizer state dict, turning torch's errors into a :class:`StateMismatchError`.

    A state whose ``state`` or ``param_groups`` has the wrong structure can only come from a forged or
    damaged manifest: that is an :class:`InvalidManifestError` (see
    :func:`savegame.format.checks.check_optimizer_state`).
    """
    if not isinstance(state, Mapping):
        raise StateMismatchError(f"{where}: checkpoint holds {type(state).__name__}, not an optimizer state")
    if "state" in state or "param_groups" in state:
        check_optimizer_state(state, where)
    try:
        optimizer.load_state_dict(dict(state))
    except (ValueError, KeyError, RuntimeError, TypeError, AttributeError) as exc:
        raise StateMismatchError(f"{where}: optimizer state does not match this optimizer: {exc}") from None
