"""Multi-process saves: every rank writes its own files into one staging directory through the one
write loop, rank 0 writes the manifest last and commits (:func:`save`, :func:`write_state`).
"""

from __future__ import annotations

import errno as errno_mod
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from savegame._util.progress import ProgressBar
from savegame.distributed.dcp import (
    SHARDED_FORMAT,
    SHARDED_VERSION,
    PathKey,
    SavegameStorageWriter,
    TensorRecord,
    split_tensors,
)
from savegame.distributed.items import (
    Fqns,
    classify,
    rank_item,
    sharded_state_dicts,
)
from savegame.distributed.ranks import (
    LAYOUT_ITEM,
    LAYOUT_VERSION,
    RankContext,
    agree,
    current_context,
    dcp_call,
    describe,
    log,
)
from savegame.engine.capture import kind_of
from savegame.engine.write_loop import (
    EncodedExtras,
    EncodedItem,
    NextName,
    assemble_manifest,
    item_entries,
    retry_on_clash,
    write_files,
)
from savegame.engine.writer import encode_state, library_versions, make_encoder
from savegame.errors import (
    CheckpointError,
    CommitError,
    ConfigError,
    OccupiedPathError,
    UnsupportedTypeError,
)
from savegame.format.manifest import FileEntry, ItemEntry, Manifest, parse_manifest
from savegame.storage import locate
from savegame.storage.base import MANIFEST, CheckpointRef, Storage, Transaction
from savegame.storage.base import SavedAt as Location
from savegame.storage.local import check_checkpoint_name

# ---------------------------------------------------------------------------------------------------
# Saving




def save(
    path: Location,
    state: Mapping[str, Any],
    *,
    metadata: Mapping[str, Any] | None = None,
    progress: Mapping[str, Any] | None = None,
    overwrite: bool = True,
    per_rank: Collection[str] = (),
    group: Any = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Save ``state`` from every rank as the checkpoint ``path``; call it on all ranks alike.

    ``path`` must be the same on every rank: a directory on a filesystem every rank sees (shared across
    nodes), an object-store URL (``s3://bucket/run/NAME``, ``storage_options`` go to fsspec; every rank
    uploads its own files into the version folder rank 0 began) or a ``CheckpointRef`` of a configured
    storage. Items are written as the module docstring says; ``per_rank`` names further items every rank
    saves separately (a per-rank data sampler, say). ``group``: the process group (None: the default
    one). When it returns on any rank the checkpoint is committed and durable; if any rank fails, every
    rank raises and nothing is visible. Returns the committed manifest (the same on every rank).
    """
    if isinstance(path, CheckpointRef):
        if storage_options:
            raise ConfigError("storage_options apply to URLs; a CheckpointRef's storage is configured already")
        storage, name = path.storage, path.name
    else:
        storage, name = locate(path, storage_options=storage_options)
    _, manifest = write_state(
        storage, name, state, metadata=metadata, progress=progress, overwrite=overwrite, per_rank=per_rank,
        context=current_context(group),
    )  # fmt: skip
    return manifest


def write_state(
    storage: Storage,
    name: str,
    state: Mapping[str, Any],
    *,
    metadata: Mapping[str, Any] | None = None,
    progress: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    per_rank: Collection[str] = (),
    context: RankContext | None = None,
    next_name: NextName | None = None,
) -> tuple[str, Manifest]:
    """Write ``state`` as checkpoint ``name`` of ``storage`` from every rank; return (path, manifest).

    The storage-level entry point (what the Checkpointer calls instead of ``api.write_items``). The name,
    ``metadata`` and ``progress`` of the coordinator are the ones used; the returned path and manifest
    are the committed ones, identical on every rank. A failure raises on every rank (the failing rank
    its own error, the others a :class:`CheckpointError` naming it; a refused commit raises
    :class:`CommitError` with the same errno everywhere, e.g. ``EEXIST`` when the name is taken).
    ``storage`` must support ``join`` (:class:`~savegame.storage.base.SharedStorage`: ``LocalStorage`` on
    a shared filesystem, ``RemoteStorage`` on an object store) when there are several ranks.
    ``next_name``: a name taken by another writer meanwhile is retried, on every rank together, under
    the next one (:func:`~savegame.engine.write_loop.retry_on_clash`; rank 0's choice is the one used).
    """
    ctx = context or current_context()

    def attempt(current: str, retry_progress: Mapping[str, Any] | None) -> tuple[str, Manifest]:
        use = progress if retry_progress is None else retry_progress
        return _write_state_once(ctx, storage, current, state, metadata=metadata, progress=use, overwrite=overwrite,
                                 per_rank=per_rank)  # fmt: skip

    return retry_on_clash(attempt, name, next_name, where=name)  # no check before the collectives: rank 0 names


def _write_state_once(
    ctx: RankContext, storage: Storage, name: str, state: Mapping[str, Any], *, metadata: Mapping[str, Any] | None,
    progress: Mapping[str, Any] | None, overwrite: bool, per_rank: Collection[str],
) -> tuple[str, Manifest]:  # fmt: skip
    """One attempt of :func:`write_state`."""
    plan: dict[str, str] = {}
    problem: BaseException | None = None
    try:
        if not isinstance(state, Mapping):
            raise UnsupportedTypeError(f"state must be a dict of items, not {type(state).__name__}")
        plan = classify(state, per_rank=per_rank)
    except BaseException as exc:
        problem = exc
    theirs = ctx.broadcast_json({"name": name, "plan": plan if problem is None else None})
    if problem is None and theirs["plan"] != plan:
        problem = ConfigError(
            f"rank {ctx.rank} saves items {plan} but rank 0 saves {theirs['plan']}: every rank must pass the same "
            "items (and per_rank names)"
        )
    agree(ctx, problem, f"saving {name} (nothing was written)")
    name = str(theirs["name"])
    check_checkpoint_name(name)
    txn, token = _begin(ctx, storage, name, overwrite=overwrite)
    try:
        return _write_and_commit(ctx, storage, txn, token, name, state, plan, metadata, progress)
    except BaseException:
        if txn is not None:
            txn.abort()
        raise


def _begin(ctx: RankContext, storage: Storage, name: str, *, overwrite: bool) -> tuple[Transaction | None, str]:
    """Rank 0 opens the transaction and broadcasts its token; returns (rank 0's txn or None, token)."""
    txn: Transaction | None = None
    message: dict[str, Any]
    if ctx.is_coordinator:
        try:
            txn = storage.begin(name, overwrite=overwrite)
            token = txn.token
            if ctx.world_size > 1 and not isinstance(token, str):
                raise ConfigError(f"{type(storage).__name__} cannot be shared by several processes (no txn.token)")
            message = {"token": token or ""}
        except BaseException as exc:
            if txn is not None:
                txn.abort()
            message = {
                "error": describe(exc), "errno": getattr(exc, "errno", None),
                "occupied": isinstance(exc, OccupiedPathError),
            }  # fmt: skip
            ctx.broadcast_json(message)
            raise
        ctx.broadcast_json(message)
        return txn, str(message["token"])
    message = ctx.broadcast_json(None)
    if "error" in message:
        code = message.get("errno") or errno_mod.EIO
        kind = OccupiedPathError if message.get("occupied") else CommitError  # the same error on every rank
        raise kind(code, f"rank 0 could not start saving {name}: {message['error']}")
    return None, str(message["token"])


def _save_planner() -> Any:
    """DCP's planner, told not to flatten (we pass flat dicts) and to write replicated plain tensors from
    rank 0: FSDP2 leaves buffers (BatchNorm statistics) unsynchronized per rank, and rank 0's are the
    ones a full state dict (and a replicated save) would hold."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    return DefaultSavePlanner(flatten_state_dict=False, dedup_save_to_lowest_rank=True)


def _write_own_files(ctx: RankContext, txn: Transaction, name: str, encoded: list[EncodedItem]) -> dict[str, FileEntry]:
    """This rank's files, through the one write loop: every file durable (closed) when this returns, as the
    files of a joined transaction are not the owner's to close (see :mod:`savegame.engine.write_loop`)."""
    total = sum(e.nbytes for e in encoded)
    label = f"saving {name}" if ctx.world_size == 1 else f"saving {name} (rank {ctx.rank})"
    progress = ProgressBar(label, total)
    try:
        return write_files(txn, encoded, progress, close_each=True).files
    finally:
        progress.close()


def _write_and_commit(
    ctx: RankContext, storage: Storage, txn: Transaction | None, token: str, name: str, state: Mapping[str, Any],
    plan: Mapping[str, str], metadata: Mapping[str, Any] | None, progress: Mapping[str, Any] | None,
) -> tuple[str, Manifest]:  # fmt: skip
    """Every rank: join (non-zero ranks), write, report; rank 0 commits. A participant's transaction is
    aborted (its own files removed) when the save fails before rank 0 committed, and released after."""
    joined = _Joined()
    try:
        result = _write_and_commit_as(ctx, storage, txn, joined, token, name, state, plan, metadata, progress)
    except BaseException:
        if joined.txn is not None and not joined.committed:
            joined.txn.abort()
        raise
    finally:
        if joined.txn is not None:
            joined.txn.finish()  # a remote participant's upload threads
    return result


@dataclass
class _Joined:
    """A non-zero rank's share of the transaction, and whether rank 0 committed it."""

    txn: Transaction | None = None
    committed: bool = False


def _write_and_commit_as(
    ctx: RankContext, storage: Storage, txn: Transaction | None, joined: _Joined, token: str, name: str,
    state: Mapping[str, Any], plan: Mapping[str, str], metadata: Mapping[str, Any] | None,
    progress: Mapping[str, Any] | None,
) -> tuple[str, Manifest]:  # fmt: skip
    mine = txn
    files: dict[str, FileEntry] = {}
    items: dict[str, ItemEntry] = {}
    flat: dict[str, torch.Tensor] = {}
    structures: dict[str, tuple[Any, dict[PathKey, str]]] = {}
    failure: BaseException | None = None
    # 1. Local phase, no collectives: join, write replicated (rank 0) and per-rank items, split sharded state.
    try:
        if mine is None:
            mine = joined.txn = storage.join(name, token)  # the protocol's default refuses: not shareable
        local: dict[str, Any] = {}
        for item, how in plan.items():
            if how == "replicated" and ctx.is_coordinator:
                local[item] = state[item]
            elif how == "per_rank":
                local[rank_item(item, ctx.rank)] = state[item]
        encoded = encode_state(local)
        assert mine is not None
        files = _write_own_files(ctx, mine, name, encoded)
        items = item_entries(encoded)
        sharded = {k: state[k] for k, how in plan.items() if how == "sharded"}
        fqns = Fqns()
        for item, sd in sharded_state_dicts(sharded, state).items():
            structure, tensors = split_tensors(sd, item)
            keys = {}
            for path, tensor in tensors.items():
                fqn = fqns.make(item, path)
                keys[path] = fqn
                flat[fqn] = tensor
            structures[item] = (structure, keys)
    except BaseException as exc:
        failure = exc
    agree(ctx, failure, f"saving {name} (nothing was committed)")
    assert mine is not None
    # 2. Sharded tensors through DCP; its coordinator learns where every chunk went.
    writer = SavegameStorageWriter(mine, rank=ctx.rank)
    if flat:
        from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

        with dcp_call(f"saving the sharded state of {name}"):
            dcp_save(flat, storage_writer=writer, planner=_save_planner(),
                     process_group=ctx.group, no_dist=not ctx.initialized)  # fmt: skip
    # 3. Every rank reports its files and per-rank items; rank 0 writes the manifest last and commits.
    report = {
        "files": {f: [e.bytes, e.hash] for f, e in files.items()},
        "items": {n: {"kind": e.kind, "file": e.file, "skeleton": e.skeleton} for n, e in items.items()},
    }
    reports = ctx.all_gather_json(report)
    verdict: dict[str, Any] | None = None
    commit_error: BaseException | None = None
    if ctx.is_coordinator:
        try:
            raw = _manifest_bytes(ctx, state, plan, reports, writer, structures, metadata, progress)
            final = mine.commit(raw)
            verdict = {"path": final, "manifest": raw.decode()}
        except BaseException as exc:
            commit_error = exc
            verdict = {"error": describe(exc), "errno": getattr(exc, "errno", None)}
    verdict = ctx.broadcast_json(verdict)
    assert verdict is not None
    if commit_error is not None:
        raise commit_error
    if "error" in verdict:
        raise CommitError(verdict.get("errno") or errno_mod.EIO, f"rank 0 could not commit {name}: {verdict['error']}")
    joined.committed = True
    final = str(verdict["path"])
    manifest = parse_manifest(str(verdict["manifest"]).encode(), f"{final}/{MANIFEST}")
    log.info("rank %d: saved %s (%d ranks)", ctx.rank, final, ctx.world_size)
    return final, manifest


def _manifest_bytes(
    ctx: RankContext, state: Mapping[str, Any], plan: Mapping[str, str], reports: list[Any],
    writer: SavegameStorageWriter, structures: Mapping[str, tuple[Any, dict[PathKey, str]]],
    metadata: Mapping[str, Any] | None, progress: Mapping[str, Any] | None,
) -> bytes:  # fmt: skip
    """The manifest of the whole distributed checkpoint (coordinator only)."""
    files: dict[str, FileEntry] = {}
    for rank, rep in enumerate(reports):
        for f, (size, digest) in rep["files"].items():
            if f in files:
                raise CheckpointError(f"rank {rank} wrote {f}, which another rank also wrote")
            files[f] = FileEntry(bytes=int(size), hash=str(digest))
    for f, entry in writer.files.items():
        if f in files:
            raise CheckpointError(f"shard file {f} clashes with an item file")
        files[f] = entry
    items: dict[str, ItemEntry] = {}
    per_rank: dict[str, list[str]] = {}
    for name, how in plan.items():
        if how == "replicated":
            e = reports[0]["items"][name]
            items[name] = ItemEntry(kind=e["kind"], file=e["file"], skeleton=e["skeleton"])
        elif how == "per_rank":
            per_rank[name] = []
            for rank, rep in enumerate(reports):
                key = rank_item(name, rank)
                e = rep["items"][key]
                items[key] = ItemEntry(kind=e["kind"], file=e["file"], skeleton=e["skeleton"])
                per_rank[name].append(key)
        else:
            structure, keys = structures[name]
            enc = make_encoder(copy=False)
            enc.allow_arrays = False
            tensors = []
            for path, fqn in keys.items():
                dtype, size, chunks = writer.tensors[fqn]
                record = TensorRecord(path, fqn, dtype, size, tuple(chunks))
                tensors.append(record.to_json())
            skeleton = {
                "format": SHARDED_FORMAT, "version": SHARDED_VERSION,
                "state": enc.encode(structure, (name,)), "tensors": tensors,
            }  # fmt: skip
            items[name] = ItemEntry(kind=kind_of(state[name]), file=None, skeleton=skeleton)
    layout = {
        "version": LAYOUT_VERSION,
        "world_size": ctx.world_size,
        "replicated": [n for n, how in plan.items() if how == "replicated"],
        "per_rank": per_rank,
        "sharded": [n for n, how in plan.items() if how == "sharded"],
    }
    items[LAYOUT_ITEM] = ItemEntry(kind="savegame.distributed", file=None, skeleton=layout)
    extras = EncodedExtras.encode(metadata, progress)
    return assemble_manifest(files, items, extras, versions=library_versions())[0]


