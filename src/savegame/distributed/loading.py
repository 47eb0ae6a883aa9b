"""Multi-process loads: every rank restores its replicated, per-rank and sharded items (:func:`restore`,
:func:`load_state`), at any world size for sharded ones; :func:`load_full_state_dict` gathers a sharded
checkpoint into plain tensors in a single process.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from savegame import api
from savegame._util.logs import warn
from savegame.distributed.dcp import (
    PathKey,
    SavegameStorageReader,
    ShardedItem,
    TensorRecord,
    _Files,
    assemble_tensor,
    delete_at,
    parse_sharded_item,
    set_at,
    split_tensors,
)
from savegame.distributed.items import (
    is_sharded,
    owner_module,
    rank_item,
    sharded_state_dicts,
)
from savegame.distributed.ranks import (
    LAYOUT_ITEM,
    LAYOUT_VERSION,
    DistributedWarning,
    RankContext,
    agree,
    current_context,
    dcp_call,
    log,
)
from savegame.engine.capture import LoadReport
from savegame.errors import (
    InvalidManifestError,
    StateMismatchError,
)
from savegame.format.manifest import Manifest
from savegame.format.tree import decode_plain
from savegame.storage.base import CheckpointReader, CheckpointRef
from savegame.storage.base import SavedAt as Location

# ---------------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class Layout:
    """The ``savegame.distributed`` item of a checkpoint (absent from single-process checkpoints)."""

    world_size: int
    per_rank: Mapping[str, list[str]]
    sharded: tuple[str, ...]


def read_layout(manifest: Manifest, *, where: str = "") -> Layout | None:
    """The distributed layout of a checkpoint, or None for a checkpoint saved by a single process."""
    if LAYOUT_ITEM not in manifest.items:
        return None
    where = f"{where}: {LAYOUT_ITEM}" if where else LAYOUT_ITEM
    node = decode_plain(manifest.items[LAYOUT_ITEM].skeleton)
    if not isinstance(node, dict) or node.get("version") != LAYOUT_VERSION:
        raise InvalidManifestError(f"{where}: unknown layout (version {str(node)[:40]})")
    world, per_rank, sharded = node.get("world_size"), node.get("per_rank"), node.get("sharded")
    if type(world) is not int or world < 1:
        raise InvalidManifestError(f"{where}: world_size must be a positive integer")
    if not isinstance(per_rank, dict) or not all(
        isinstance(v, list) and all(isinstance(x, str) and x in manifest.items for x in v) for v in per_rank.values()
    ):
        raise InvalidManifestError(f"{where}: per_rank must map item names to lists of items of the checkpoint")
    if not isinstance(sharded, list) or not all(isinstance(s, str) and s in manifest.items for s in sharded):
        raise InvalidManifestError(f"{where}: sharded must list items of the checkpoint")
    return Layout(world_size=world, per_rank=per_rank, sharded=tuple(sharded))


def item_names(manifest: Manifest) -> set[str]:
    """The item names a caller restores from a checkpoint: per-rank items under their own name (``rng``
    for ``rng.rank0``, ``rng.rank1``...), without the layout item. For a single-process checkpoint, its items.
    """
    layout = read_layout(manifest)
    if layout is None:
        return set(manifest.items)
    hidden = {LAYOUT_ITEM, *(x for names in layout.per_rank.values() for x in names)}
    return {n for n in manifest.items if n not in hidden} | set(layout.per_rank)


def _sharded_item(source: CheckpointReader, manifest: Manifest, name: str) -> ShardedItem:
    node = api.decode_item(source, manifest, name, verify=False)
    return parse_sharded_item(node, f"{source.where}: {name}")


def restore(
    path: Location,
    state: Mapping[str, Any],
    *,
    strict: bool = True,
    verify: bool = True,
    map_location: Any = None,
    group: Any = None,
    storage_options: Mapping[str, Any] | None = None,
) -> LoadReport:
    """Restore a checkpoint into the live objects of ``state`` in place; call it on all ranks alike.

    Replicated items load on every rank; each rank gets its own per-rank items back (``rng`` from
    ``rng.rank<R>``); plain values in ``state`` (``"epoch": 0``) are not loaded in place but returned
    in ``report.state``; sharded items are resharded by DCP to whatever this job's layout is (FSDP2 at any
    world size, or plain modules, which get full tensors). A checkpoint saved by :func:`savegame.save`
    restores too (every item then counts as replicated). Returns a :class:`LoadReport` (plain items in
    ``report.state``). ``strict``, ``verify`` and ``map_location`` are as in :func:`savegame.load`; a
    per-rank item missing for this rank (more ranks than when saved) is left alone with a
    :class:`DistributedWarning`. ``path``: a local path, an object-store URL (``storage_options`` go
    to fsspec) or a ``CheckpointRef`` (``storage.ref(name)`` of a configured storage, e.g. a
    ``RemoteStorage`` holding credentials); each rank reads the files it needs itself.
    """
    return load_state(path, state, strict=strict, verify=verify, map_location=map_location,
                      context=current_context(group), storage_options=storage_options)  # fmt: skip


def load_state(
    path: Location,
    target: Mapping[str, Any],
    *,
    strict: bool = True,
    verify: bool = True,
    map_location: Any = None,
    context: RankContext | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> LoadReport:
    """:func:`restore` for a given :class:`RankContext` (what the Checkpointer calls instead of ``api.load``).

    Every rank first restores what it can alone (replicated and per-rank items) and plans the sharded
    part; the ranks then agree that nobody failed before the collective DCP load, so an error on one
    rank (a damaged per-rank file, a mismatch) raises on every rank instead of leaving the others
    waiting: a :class:`CorruptCheckpointError` everywhere if any rank found damage.
    """
    ctx = context or current_context()
    where = _location(path)
    report = LoadReport()
    plan: _ShardedPlan | None = None
    failure: BaseException | None = None
    source: CheckpointReader | None = None
    try:
        # One reader for the whole restore: on an object store it is pinned to one version.
        source = api.open_checkpoint(path, storage_options=storage_options)
        where = source.where
        plan = _load_local(ctx, source, target, report, strict=strict, verify=verify, map_location=map_location)
    except BaseException as exc:
        failure = exc
    try:
        agree(ctx, failure, f"restoring {where}")
        if plan is not None:
            assert source is not None
            _load_sharded(ctx, source, plan, target, report)
    finally:
        if source is not None:
            _close(source)
    return report


def _close(source: CheckpointReader) -> None:
    """Release a reader opened here (a local one holds a directory handle)."""
    source.close()


@dataclass
class _ShardedPlan:
    """What a restore reads through DCP: the saved items, the live tensors by path, DCP's flat dict."""

    manifest: Manifest
    saved: dict[str, ShardedItem]
    targets: dict[str, Any]
    live: dict[str, dict[PathKey, torch.Tensor]]
    flat: dict[str, torch.Tensor]
    records: list[TensorRecord]
    verify: bool
    strict: bool
    full_models: dict[str, dict[str, Any]]


def _load_local(
    ctx: RankContext, source: CheckpointReader, target: Mapping[str, Any], report: LoadReport, *, strict: bool,
    verify: bool, map_location: Any,
) -> _ShardedPlan | None:  # fmt: skip
    """Restore the replicated and per-rank items; return the plan of the sharded ones (no collectives)."""
    directory = source.where
    manifest = api.read_manifest(source)
    report.manifest = manifest
    if not isinstance(target, Mapping):
        raise StateMismatchError(f"target must be a dict of live objects, not {type(target).__name__}")
    layout = read_layout(manifest, where=directory)
    per_rank = dict(layout.per_rank) if layout else {}
    sharded = set(layout.sharded) if layout else set()
    plain: dict[str, Any] = {}
    shard_targets: dict[str, Any] = {}
    full_models: dict[str, dict[str, Any]] = {}
    renamed: dict[str, str] = {}
    for name, obj in target.items():
        if name in sharded:
            shard_targets[name] = obj
        elif name in per_rank:
            mine = rank_item(name, ctx.rank)
            if mine in manifest.items:
                plain[mine] = obj
                renamed[mine] = name
            else:
                message = (f"{directory}: no {mine} (saved by {layout.world_size if layout else 1} ranks); "
                           f"{name} of rank {ctx.rank} was left as it is")  # fmt: skip
                warn(message, DistributedWarning, stacklevel=4)
                log.warning(message)
        elif isinstance(obj, (int, float, str, bytes, tuple, type(None))):
            if name in manifest.items:  # a plain value: returned, not loaded in place (like the Checkpointer)
                report.state[name] = api.decode_item(source, manifest, name, verify=verify)
            elif strict:
                raise StateMismatchError(f"{directory}: item {name!r} is not in the checkpoint")
            else:
                report.missing_keys.append(name)
        elif name in manifest.items and is_sharded(obj):
            full_models[name] = _full_model_state(source, manifest, name, obj, report, verify=verify)
        else:
            plain[name] = obj
    if plain:
        sub = api.load(source, plain, map_location=map_location, strict=strict, verify=verify)
        report.loaded += [_rename(x, renamed) for x in sub.loaded]
        report.missing_keys += [_rename(x, renamed) for x in sub.missing_keys]
        report.unexpected_keys += [_rename(x, renamed) for x in sub.unexpected_keys]
        report.mismatched_keys += sub.mismatched_keys
        report.mismatched_types += sub.mismatched_types
        hidden = sharded | {LAYOUT_ITEM}
        report.state.update({k: v for k, v in sub.state.items() if k not in hidden})
    if not shard_targets and not full_models:
        if strict and not report.clean:
            raise StateMismatchError(f"{directory}: state does not match the target: {report}", report)
        return None
    saved = {name: _sharded_item(source, manifest, name) for name in shard_targets}
    plan = _ShardedPlan(manifest, saved, shard_targets, {}, {}, [], verify, strict, full_models)
    for name, sd in sharded_state_dicts(shard_targets, target).items():
        _, tensors = split_tensors(sd, name)
        plan.live[name] = tensors
        by_path = {r.path: r for r in saved[name].tensors}
        for path, tensor in tensors.items():
            where = ".".join([name, *(str(p) for p in path)])
            record = by_path.get(path)
            if record is None:
                report.missing_keys.append(where)
            elif tuple(tensor.shape) != record.size:
                report.mismatched_keys.append((where, record.size, tuple(tensor.shape)))
            else:
                plan.flat[record.fqn] = tensor
                plan.records.append(record)
        report.unexpected_keys += [".".join([name, *(str(p) for p in path)]) for path in by_path if path not in tensors]
    if strict and not report.clean:
        raise StateMismatchError(f"{directory}: state does not match the target: {report}", report)
    return plan


def _location(path: Location) -> str:
    """For messages before the checkpoint is open: an absolute path, a URL, a reference's URL."""
    if isinstance(path, CheckpointRef):
        return str(path)
    text = os.fspath(path)
    return text if "://" in text else os.path.abspath(text)


def _full_model_state(
    source: CheckpointReader, manifest: Manifest, name: str, obj: object, report: LoadReport, *, verify: bool
) -> dict[str, Any]:
    """The full state of a model saved unsharded (by one process or DDP), checked against a sharded model
    (FSDP2) it is to be distributed into; only models can be (a plain optimizer state has no FQNs)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    directory = source.where
    if not isinstance(obj, torch.nn.Module):
        raise StateMismatchError(
            f"{directory}: {name}: a sharded {type(obj).__name__} cannot be restored from a checkpoint saved "
            "unsharded (only models can; restore the model, then start the optimizer afresh)"
        )
    value = api.decode_item(source, manifest, name, verify=verify)
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise StateMismatchError(f"{directory}: {name}: the checkpoint holds {type(value).__name__}, not a model state")
    if value and all(k.startswith("module.") for k in value):  # saved under DDP
        value = {k[len("module.") :]: v for k, v in value.items()}
    live: dict[str, Any] = dict(get_model_state_dict(obj))
    report.missing_keys += [f"{name}.{k}" for k in live if k not in value]
    report.unexpected_keys += [f"{name}.{k}" for k in value if k not in live]
    for k, v in value.items():
        if k in live and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(live[k].shape):
            report.mismatched_keys.append((f"{name}.{k}", tuple(v.shape), tuple(live[k].shape)))
    return {k: v for k, v in value.items() if k in live and isinstance(v, torch.Tensor)}


def _rename(key: str, renamed: Mapping[str, str]) -> str:
    """``rng.rank1.x`` -> ``rng.x``: report keys by the caller's item names."""
    for saved, name in renamed.items():
        if key == saved or key.startswith(saved + "."):
            return name + key[len(saved) :]
    return key


def _load_sharded(
    ctx: RankContext, source: CheckpointReader, plan: _ShardedPlan, everything: Mapping[str, Any], report: LoadReport
) -> None:
    """The collective part of a restore: DCP reads (and reshards) the tensors, then the live objects get
    their state through DCP's ``set_*_state_dict`` helpers."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if plan.flat:
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

        reader = SavegameStorageReader(source, plan.manifest, plan.records, verify=plan.verify)
        with dcp_call(f"{source.where}: loading the sharded state"):
            dcp_load(plan.flat, storage_reader=reader, planner=DefaultLoadPlanner(flatten_state_dict=False),
                     process_group=ctx.group, no_dist=not ctx.initialized)  # fmt: skip
    modules = {k: v for k, v in everything.items() if isinstance(v, torch.nn.Module)}
    options = StateDictOptions(strict=plan.strict)
    for name, full in plan.full_models.items():  # unsharded checkpoint -> sharded model: DCP distributes
        full_options = StateDictOptions(full_state_dict=True, strict=plan.strict)
        set_model_state_dict(everything[name], full, options=full_options)
        report.loaded.append(name)
    for name, obj in plan.targets.items():
        restored = _rebuild(plan.saved[name], plan.live[name], plan.flat)
        if isinstance(obj, torch.nn.Module):
            set_model_state_dict(obj, restored, options=options)
        elif isinstance(obj, torch.optim.Optimizer):
            try:
                set_optimizer_state_dict(owner_module(obj, modules, name), obj, restored, options=options)
            except (KeyError, ValueError, RuntimeError) as exc:
                raise StateMismatchError(f"{source.where}: {name}: optimizer state does not fit: {exc}") from exc
        else:
            report.state[name] = restored  # tensors were filled in place; the full structure for reference
        report.loaded.append(name)


def _rebuild(item: ShardedItem, tensors: Mapping[PathKey, torch.Tensor], flat: Mapping[str, torch.Tensor]) -> Any:
    """The saved structure (decoded, owned by ``item``) with the loaded tensors at the saved tensor paths."""
    structure = item.state
    for record in item.tensors:
        if record.fqn in flat and record.path in tensors:
            structure = set_at(structure, record.path, tensors[record.path])
        else:
            delete_at(structure, record.path)
    return structure


def load_full_state_dict(
    path: Location,
    *,
    items: Collection[str] | None = None,
    verify: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Read a checkpoint in one process, assembling sharded items into full (unsharded) tensors.

    Needs no process group: use it to export a checkpoint saved by FSDP2 at any world size into a plain
    model (``model.load_state_dict(full["model"])``) or for inference. Sharded models come back as
    ``{fqn: tensor}``, sharded optimizers in DCP's form (``state`` and ``param_groups`` keyed by parameter
    FQN, which ``torch.distributed.checkpoint.state_dict.set_optimizer_state_dict`` accepts); other items
    as :func:`savegame.load` returns them. ``items`` selects items (default: all but the layout item).
    ``path``: a local path, an object-store URL (``storage_options`` go to fsspec) or a ``CheckpointRef``.
    """
    source = api.open_checkpoint(path, storage_options=storage_options)
    try:
        return _full_state(source, items, verify=verify)
    finally:
        _close(source)


def _full_state(source: CheckpointReader, items: Collection[str] | None, *, verify: bool) -> dict[str, Any]:
    directory = source.where
    manifest = api.read_manifest(source)
    layout = read_layout(manifest, where=directory)
    sharded = set(layout.sharded) if layout else set()
    wanted = [n for n in manifest.items if n != LAYOUT_ITEM] if items is None else list(items)
    missing = [n for n in wanted if n not in manifest.items]
    if missing:
        raise StateMismatchError(f"{directory}: no items {missing} (it has {list(manifest.items)})")
    files = _Files(source, manifest, verify=verify)
    out: dict[str, Any] = {}
    for name in wanted:
        if name not in sharded:
            out[name] = api.decode_item(source, manifest, name, verify=verify)
            continue
        item = _sharded_item(source, manifest, name)
        full = {r.path: assemble_tensor(files, r) for r in item.tensors}
        out[name] = _rebuild(item, full, {r.fqn: full[r.path] for r in item.tensors})
    return out
