"""PyTorch modules from their live tensors: the walk of ``state_dict()``'s own recursion without its
per-tensor ``detach()`` (:func:`live_state`), the background snapshot of a module built on it
(:func:`encode_module`: keys checked once per module, tied weights found by address, small tensors copied
in batches) and the plain capture (:func:`capture_module`).

Split from :mod:`savegame.adapters.torch` (which re-exports these names) to keep each module to one job:
that module encodes and decodes tensors, this one walks modules.
"""

from __future__ import annotations

from typing import Any

import torch

from savegame.adapters.torch import _SMALL_SPECS, SMALL_TENSOR_BYTES, _Batch, _small_copies
from savegame.adapters.torch_restore import _PLAIN_TENSORS, plain_names
from savegame.format.tree import MAX_DEPTH, Encoder, Path, safe_key

_BASE_STATE_DICT = torch.nn.Module.state_dict
_BASE_SAVE = torch.nn.Module._save_to_state_dict
_BASE_GET_EXTRA = torch.nn.Module.get_extra_state
_STRIDED = torch.strided
_CPU = torch.device("cpu")


def live_state(module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """What ``module.state_dict()`` holds, without its per-tensor ``detach()``: the live parameters and
    persistent buffers under the same keys in the same order, or None when ``state_dict()`` could do
    anything else (see :func:`_plain_save_module`). Tied tensors appear under every name, as there."""
    out: dict[str, torch.Tensor] = {}
    return out if _collect_live(module, "", out, 0) else None


def _collect_live(module: torch.nn.Module, prefix: str, out: dict[str, torch.Tensor], depth: int) -> bool:
    """``Module.state_dict``'s recursion (no de-duplication of shared submodules, like it), refusing any
    module that is not plain; False when one is found."""
    if depth > 200 or not _plain_save_module(module):
        return False
    for name, param in module._parameters.items():
        if param is not None:
            out[prefix + name] = param
    skip = module._non_persistent_buffers_set
    for name, buf in module._buffers.items():
        if buf is not None and name not in skip:
            out[prefix + name] = buf
    for name, child in module._modules.items():
        if child is not None and not _collect_live(child, f"{prefix}{name}.", out, depth + 1):
            return False
    return True


def _plain_save_module(m: torch.nn.Module) -> bool:
    """Whether ``m.state_dict()`` stores nothing but ``detach()`` of its parameters and persistent buffers:
    its class overrides none of ``state_dict``, ``_save_to_state_dict`` and ``get_extra_state``, and it has
    no state-dict hooks (pre or post; FSDP, user hooks)."""
    cls = type(m)
    return (
        cls.state_dict is _BASE_STATE_DICT
        and cls._save_to_state_dict is _BASE_SAVE
        and cls.get_extra_state is _BASE_GET_EXTRA
        and not m._state_dict_hooks
        and not m._state_dict_pre_hooks
    )


def encode_module(module: torch.nn.Module, path: Path, enc: Encoder) -> dict[str, Any] | None:
    """The skeleton of a module's state for a snapshot (``enc.copy``), built from its live tensors, or None
    (then the caller captures ``state_dict()`` as usual).

    The same skeleton and bytes as encoding :func:`capture_module`'s dict, without a ``detach()`` per
    tensor: small CPU tensors go straight into the batched copy (:class:`_SmallCopies`, before the save
    returns), recorded as the detached tensors ``state_dict()`` gives (no ``param``/``requires_grad``);
    any other tensor is detached and encoded as before. Only for snapshots: a zero-copy save keeps the
    detached tensors alive instead. None when ``state_dict()`` could differ (hooks, overrides: see
    :func:`live_state`) or a key would need the codec's tagged dict form.
    """
    if not enc.copy or not enc.allow_arrays or len(path) >= MAX_DEPTH:
        return None
    live = live_state(module)
    if live is None:
        return None
    state = plain_names(live)
    if "$" in state:
        return None
    prefix = ".".join(map(str, path[enc.key_skip :]))
    prefix = f"{prefix}." if prefix else ""
    names = [prefix + key for key in state] if prefix else list(state)
    as_is = enc.names_free(names)  # the common case: every small tensor is stored under its own name
    node: dict[str, Any] = {}
    _walk_small(state, names, as_is, path, enc, node)
    return node


def _walk_small(
    state: dict[str, Any], names: list[str], as_is: bool, path: Path, enc: Encoder, node: dict[str, Any]
) -> None:
    """:func:`encode_module`'s loop: fill ``node`` (the skeleton, in ``state``'s order) and hand each
    small CPU tensor to the batched copy (:class:`_SmallCopies`); any other tensor goes through the codec.

    Keys: with ``as_is`` (:meth:`Encoder.names_free` said so for ``names``) a new small tensor's key is its
    name, claimed after the loop (the only keys reserved meanwhile are those of this state's other tensors,
    encoded by the codec under their own, different names); otherwise each name goes through
    :meth:`Encoder.reserve_name` in order, as the codec's path does.

    Aliases (tied weights): an alias has the same first-element address as what it aliases, so while no
    small tensor's address repeats one seen before (this walk's or the encoder's table's), each is new and
    its identity is only noted (:meth:`Encoder.note_identities`: no hashing of identity tuples); from the
    first repeat on, every identity is looked up in the encoder's table, exactly as the codec does.
    One loop over 10,000s of tensors: no attribute lookups or calls in it that are not needed.
    """
    small = _small_copies(enc)
    seen = enc.alias_table()
    enc.holds.append(state)  # its tensors' addresses stay theirs while the walk may look them up
    addresses = {i[1] for i in seen if i[0] == "torch"}  # (an alias of these has one of their addresses)
    exact = not as_is  # look every identity up (after an address repeated, or when names need reserving)
    reserve, encode, address_seen, known = enc.reserve_name, enc.encode, addresses.add, addresses.__contains__
    specs, plain, strided, cpu = _SMALL_SPECS, _PLAIN_TENSORS, _STRIDED, _CPU
    fresh: list[str] = []  # the names used as they are (with as_is)
    identities: list[tuple[object, ...]] = []  # fresh[i]'s identity, until the walk turns exact
    used, noted = fresh.append, identities.append
    last: tuple[object, ...] | None = None  # the previous tensor's dtype and shape (models repeat them)
    batch = _Batch("", 1)
    add_tensor, add_key = batch.tensors.append, batch.keys.append
    for (key, t), name in zip(state.items(), names):
        if type(t) in plain and t.is_cpu and (spec := specs.get(dtype := t.dtype)) is not None:
            nbytes = t.nbytes
            if 0 < nbytes <= SMALL_TENSOR_BYTES and t.layout is strided and not t.is_nested:
                shape = t.shape  # a torch.Size: a tuple, equal to and hashed as encode_hook's tuple(shape)
                address = t.data_ptr()
                identity = ("torch", address, shape, None if t.is_contiguous() else t.stride(), dtype, cpu)
                if not exact and known(address):  # maybe an alias: from here on, look every identity up
                    seen.update(zip(identities, fresh))
                    exact = True
                if not exact:
                    address_seen(address)
                    noted(identity)
                    used(name)
                    new = True
                elif as_is:
                    taken = seen.setdefault(identity, name)
                    new = taken is name
                    if new:
                        used(name)
                    else:
                        name = taken
                else:
                    found = seen.get(identity)
                    new = found is None
                    name = reserve(safe_key(name), identity) if found is None else found
                if new:
                    group = (dtype, shape)
                    if group != last or not batch.left:
                        batch = small.batch(group, spec[0], nbytes)
                        add_tensor, add_key = batch.tensors.append, batch.keys.append
                        last = group
                    add_tensor(t)
                    add_key(name)
                    batch.left -= 1
                    if not batch.left:
                        small.copy(group)
                if spec[1] is None:
                    node[key] = {"$": "tensor", "key": name}
                else:
                    node[key] = {"$": "tensor", "dtype": spec[1], "shape": list(shape), "key": name}
                continue
        node[key] = encode(t.detach(), (*path, key))
    if not exact:
        enc.note_identities(identities, fresh)
    if as_is:
        enc.claim_names(fresh)


def capture_module(module: torch.nn.Module) -> dict[str, Any]:
    """A module's parameters and buffers (a plain dict, keys as in ``state_dict()``), under the names the
    module has without ``torch.compile`` (no ``_orig_mod.``): the checkpoint of a compiled model is the
    one of the plain model, and loads into either (see :func:`restore_module`)."""
    return plain_names(module.state_dict())
