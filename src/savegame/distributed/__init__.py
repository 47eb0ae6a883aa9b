"""Multi-process checkpoints with ``torch.distributed``: DDP (replicated) and FSDP2 / DTensor (sharded) state.

Every rank calls the same function with the same item names; savegame decides who writes what:

* **replicated** items (a DDP model, its optimizer, schedulers, plain values) are written once, by rank 0,
  exactly as :func:`savegame.save` writes them;
* **per-rank** items (:class:`savegame.RNGState`, generator objects, and any item named in ``per_rank=``)
  are written by every rank as item ``<name>.rank<R>`` (file ``<name>.rank<R>.safetensors``), so each rank
  gets its own random streams back;
* **sharded** items (modules and optimizers holding DTensors, as FSDP2's ``fully_shard`` makes them, or
  dicts of DTensors) go through ``torch.distributed.checkpoint`` with savegame's own storage
  (:mod:`savegame.distributed.dcp`): every rank writes its chunks to ``shards.rank<R>.safetensors``; the tensor layout
  is JSON in the manifest, the non-tensor rest a plain savegame skeleton. They load at any world size.

The commit protocol is the local one stretched over ranks::

    rank 0: storage.begin(name) -> staging dir     all ranks: get the name + staging token (uint8 broadcast)
    all ranks: write own files into the staging dir (fsync each), then agree nobody failed
    all ranks: dcp.save of the sharded tensors (DCP's coordinator learns every chunk's place)
    all ranks: report their files (sizes, hashes) and per-rank item skeletons to rank 0 (JSON in tensors)
    rank 0: write manifest.json last, fsync, rename into place; broadcast the committed manifest

so nothing is visible before every rank has finished writing, and a rank that dies anywhere leaves only
a hidden staging directory (removed by the next writer's cleanup). On an object store
(:class:`~savegame.storage.remote.RemoteStorage`) the staging directory is the upload's version folder,
joined by the other ranks with ``RemoteStorage.join``, and the commit is the manifest written last.
Retention and deletion are left to rank 0 (the Checkpointer runs them there). Nothing is pickled: the
collectives savegame itself issues carry lengths and UTF-8 JSON as uint8 tensors; DCP's own plan
exchange between ranks uses ``torch.distributed`` object collectives in memory, but no file holds a
pickle and loading never unpickles file content.

Functions: :func:`save`, :func:`restore` (all ranks), :func:`load_full_state_dict` (any single process,
e.g. to export a sharded checkpoint into a plain model), and :func:`write_state` / :func:`load_state` /
:class:`RankContext` for the Checkpointer.
"""

from __future__ import annotations

import errno as errno_mod
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from savegame import api
from savegame._util.progress import ProgressBar
from savegame.adapters.rng import RNGState, capture_generator
from savegame.distributed.dcp import (
    SHARDED_FORMAT,
    SHARDED_VERSION,
    PathKey,
    SavegameStorageReader,
    SavegameStorageWriter,
    ShardedItem,
    TensorRecord,
    _Files,
    assemble_tensor,
    delete_at,
    parse_sharded_item,
    set_at,
    split_tensors,
)
from savegame.engine.capture import LoadReport, kind_of
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
    CorruptCheckpointError,
    InvalidManifestError,
    InvalidNameError,
    OccupiedPathError,
    StateMismatchError,
    UnsupportedTypeError,
)
from savegame.format.manifest import FileEntry, ItemEntry, Manifest, parse_manifest
from savegame.format.tree import contains, decode_plain
from savegame.storage import locate
from savegame.storage.base import MANIFEST, CheckpointReader, CheckpointRef, Storage, Transaction
from savegame.storage.base import SavedAt as Location
from savegame.storage.local import check_checkpoint_name

__all__ = [
    "LAYOUT_ITEM",
    "DistributedWarning",
    "RankContext",
    "current_context",
    "item_names",
    "load_full_state_dict",
    "load_state",
    "restore",
    "save",
    "write_state",
]

log = logging.getLogger("savegame.distributed")

LAYOUT_ITEM = "savegame.distributed"
"""Plain item of every multi-process checkpoint: world size and which items are per-rank or sharded."""

LAYOUT_VERSION = 1
_RANK_SUFFIX = re.compile(r"\.rank[0-9]+$")
_NO_DIST_WARNING = ".*torch.distributed is disabled, unavailable or uninitialized.*"


class DistributedWarning(UserWarning):
    """A per-rank item could not be restored (resumed at a larger world size) or similar partial restores."""


# ---------------------------------------------------------------------------------------------------
# Ranks and the collectives savegame needs (no pickle: lengths and bytes travel as tensors)


@dataclass(frozen=True)
class RankContext:
    """Who this process is in a ``torch.distributed`` job, and the few collectives savegame issues.

    ``rank`` / ``world_size`` are within ``group`` (None: the default group); ``coordinator`` is the
    global rank of the group's rank 0, which commits, runs retention and decides names. Outside a process
    group (a single process) this is rank 0 of 1 and every collective returns at once.
    Bytes travel as a length tensor followed by a uint8 tensor, so nothing is pickled.
    """

    rank: int = 0
    world_size: int = 1
    group: Any = None
    coordinator: int = 0
    device: str = "cpu"
    initialized: bool = False

    @property
    def is_coordinator(self) -> bool:
        """True on the rank that begins and commits transactions and runs retention."""
        return self.rank == 0

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """The coordinator's ``data`` on every rank (others pass None)."""
        if self.world_size == 1:
            return data or b""
        payload = (data or b"") if self.is_coordinator else b""
        size = torch.tensor([len(payload)], dtype=torch.int64, device=self.device)
        dist.broadcast(size, src=self.coordinator, group=self.group)
        n = int(size.item())
        if n == 0:
            return b""
        if self.is_coordinator:
            buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device)
        else:
            buf = torch.empty(n, dtype=torch.uint8, device=self.device)
        dist.broadcast(buf, src=self.coordinator, group=self.group)
        return payload if self.is_coordinator else bytes(buf.cpu().numpy().tobytes())

    def broadcast_json(self, obj: Any) -> Any:
        """The coordinator's JSON-serializable ``obj`` on every rank."""
        raw = json.dumps(obj, allow_nan=False).encode() if self.is_coordinator else None
        return json.loads(self.broadcast_bytes(raw).decode())

    def broadcast_text(self, text: str | None) -> str:
        """The coordinator's string on every rank (e.g. the checkpoint name it chose)."""
        return self.broadcast_bytes(text.encode() if text is not None else None).decode()

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order, on every rank."""
        if self.world_size == 1:
            return [data]
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        sizes = [torch.empty_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=self.group)
        lengths = [int(s.item()) for s in sizes]
        longest = max(lengths)
        if longest == 0:
            return [b""] * self.world_size
        buf = torch.zeros(longest, dtype=torch.uint8)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        buf = buf.to(self.device)
        bufs = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(bufs, buf, group=self.group)
        return [bytes(b[:n].cpu().numpy().tobytes()) for b, n in zip(bufs, lengths)]

    def all_gather_json(self, obj: Any) -> list[Any]:
        """Every rank's JSON-serializable ``obj``, in rank order, on every rank."""
        raw = json.dumps(obj, allow_nan=False).encode()
        return [json.loads(b.decode()) for b in self.all_gather_bytes(raw)]

    def barrier(self) -> None:
        """Wait until every rank got here (a no-op in a single process)."""
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def run_on_coordinator(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only and return its JSON-serializable result on every rank.

        For decisions one rank must take for all (which checkpoint to resume from, after verifying and
        quarantining): if ``fn`` raises, rank 0 re-raises its error and the others a
        :class:`CheckpointError` (a :class:`CorruptCheckpointError` if it was one) with its message.
        """
        reply: dict[str, Any] | None = None
        error: BaseException | None = None
        if self.is_coordinator:
            try:
                reply = {"value": fn()}
            except BaseException as exc:
                error = exc
                reply = {"error": _describe(exc), "corrupt": isinstance(exc, CorruptCheckpointError)}
        reply = self.broadcast_json(reply)
        if error is not None:
            raise error
        assert reply is not None
        if "error" in reply:
            kind = CorruptCheckpointError if reply.get("corrupt") else CheckpointError
            raise kind(f"rank 0 failed: {reply['error']}")
        return reply["value"]


def current_context(group: Any = None) -> RankContext:
    """The :class:`RankContext` of this process (rank 0 of 1 when no process group is initialized)."""
    if not (dist.is_available() and dist.is_initialized()):
        return RankContext()
    backend = str(dist.get_backend(group))
    device = f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu"
    coordinator = dist.get_global_rank(group, 0) if group is not None else 0
    return RankContext(
        rank=dist.get_rank(group), world_size=dist.get_world_size(group), group=group,
        coordinator=coordinator, device=device, initialized=True,
    )  # fmt: skip


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def _agree(ctx: RankContext, error: BaseException | None, what: str) -> None:
    """All ranks learn whether any rank failed ``what``; a failing rank re-raises its own error.

    The others raise a :class:`CheckpointError` naming the failed ranks, a
    :class:`CorruptCheckpointError` when one of them found the checkpoint damaged (so every rank can
    react alike, e.g. the Checkpointer falling back to an older checkpoint).
    """
    mine = None
    if error is not None:
        mine = {"message": _describe(error), "corrupt": isinstance(error, CorruptCheckpointError)}
    reports = ctx.all_gather_json(mine)
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(reports) if m is not None]
    if failed:
        text = f"{what} failed on another rank: " + "; ".join(f"rank {r}: {m['message']}" for r, m in failed)
        if any(m.get("corrupt") for _, m in failed):
            raise CorruptCheckpointError(text)
        raise CheckpointError(text)


# ---------------------------------------------------------------------------------------------------
# What each item is


def _is_dtensor(obj: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(obj, DTensor)


def _holds_dtensor(node: Any) -> bool:
    return contains(node, _is_dtensor)


def _is_sharded(value: object) -> bool:
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
        if name == LAYOUT_ITEM or _RANK_SUFFIX.search(name):
            raise InvalidNameError(f"item name {name!r} is reserved for distributed checkpoints")
        if name in per_rank or isinstance(value, RNGState) or capture_generator(value) is not None:
            plan[name] = "per_rank"
        elif _is_sharded(value):
            plan[name] = "sharded"
        else:
            plan[name] = "replicated"
    return plan


def _rank_item(name: str, rank: int) -> str:
    return f"{name}.rank{rank}"


def _owner_module(opt: torch.optim.Optimizer, modules: Mapping[str, torch.nn.Module], where: str) -> torch.nn.Module:
    """The model item whose parameters the optimizer updates (DCP's state_dict helpers need it)."""
    wanted = {id(p) for group in opt.param_groups for p in group["params"]}
    for module in modules.values():
        if wanted <= {id(p) for p in module.parameters()}:
            return module
    raise ConfigError(
        f"{where}: a sharded optimizer needs its model in the same state (an nn.Module item whose parameters "
        "it updates); none was found"
    )


def _sharded_state_dicts(items: Mapping[str, Any], everything: Mapping[str, Any]) -> dict[str, Any]:
    """DCP-style state dicts of the sharded items: modules and optimizers keyed by parameter FQN."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    modules = {k: v for k, v in everything.items() if isinstance(v, torch.nn.Module)}
    out: dict[str, Any] = {}
    for name, value in items.items():
        if isinstance(value, torch.nn.Module):
            out[name] = get_model_state_dict(value)
        elif isinstance(value, torch.optim.Optimizer):
            out[name] = get_optimizer_state_dict(_owner_module(value, modules, name), value)
        else:
            out[name] = value
    return out


class _Fqns:
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
    _agree(ctx, problem, f"saving {name} (nothing was written)")
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
                "error": _describe(exc), "errno": getattr(exc, "errno", None),
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
                local[_rank_item(item, ctx.rank)] = state[item]
        encoded = encode_state(local)
        assert mine is not None
        files = _write_own_files(ctx, mine, name, encoded)
        items = item_entries(encoded)
        sharded = {k: state[k] for k, how in plan.items() if how == "sharded"}
        fqns = _Fqns()
        for item, sd in _sharded_state_dicts(sharded, state).items():
            structure, tensors = split_tensors(sd, item)
            keys = {}
            for path, tensor in tensors.items():
                fqn = fqns.make(item, path)
                keys[path] = fqn
                flat[fqn] = tensor
            structures[item] = (structure, keys)
    except BaseException as exc:
        failure = exc
    _agree(ctx, failure, f"saving {name} (nothing was committed)")
    assert mine is not None
    # 2. Sharded tensors through DCP; its coordinator learns where every chunk went.
    writer = SavegameStorageWriter(mine, rank=ctx.rank)
    if flat:
        from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
                dcp_save(flat, storage_writer=writer, planner=_save_planner(),
                         process_group=ctx.group, no_dist=not ctx.initialized)  # fmt: skip
        except (CheckpointError, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # DCP raises the same CheckpointException (a BaseException) on every rank
            cause = _checkpoint_cause(exc)
            if cause is not None:
                raise cause from exc
            raise CheckpointError(f"saving the sharded state of {name} failed: {exc}") from exc
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
            verdict = {"error": _describe(exc), "errno": getattr(exc, "errno", None)}
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
                key = _rank_item(name, rank)
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
        _agree(ctx, failure, f"restoring {where}")
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
            mine = _rank_item(name, ctx.rank)
            if mine in manifest.items:
                plain[mine] = obj
                renamed[mine] = name
            else:
                message = (f"{directory}: no {mine} (saved by {layout.world_size if layout else 1} ranks); "
                           f"{name} of rank {ctx.rank} was left as it is")  # fmt: skip
                warnings.warn(message, DistributedWarning, stacklevel=4)
                log.warning(message)
        elif isinstance(obj, (int, float, str, bytes, tuple, type(None))):
            if name in manifest.items:  # a plain value: returned, not loaded in place (like the Checkpointer)
                report.state[name] = api.decode_item(source, manifest, name, verify=verify)
            elif strict:
                raise StateMismatchError(f"{directory}: item {name!r} is not in the checkpoint")
            else:
                report.missing_keys.append(name)
        elif name in manifest.items and _is_sharded(obj):
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
    for name, sd in _sharded_state_dicts(shard_targets, target).items():
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
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
                dcp_load(plan.flat, storage_reader=reader, planner=DefaultLoadPlanner(flatten_state_dict=False),
                         process_group=ctx.group, no_dist=not ctx.initialized)  # fmt: skip
        except (CheckpointError, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # DCP raises the same CheckpointException (a BaseException) on every rank
            cause = _checkpoint_cause(exc)
            if cause is not None:
                raise cause from exc
            raise CheckpointError(f"{source.where}: loading the sharded state failed: {exc}") from exc
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
                set_optimizer_state_dict(_owner_module(obj, modules, name), obj, restored, options=options)
            except (KeyError, ValueError, RuntimeError) as exc:
                raise StateMismatchError(f"{source.where}: {name}: optimizer state does not fit: {exc}") from exc
        else:
            report.state[name] = restored  # tensors were filled in place; the full structure for reference
        report.loaded.append(name)


def _checkpoint_cause(exc: BaseException) -> CheckpointError | None:
    """The savegame error one rank raised inside DCP (DCP wraps it in a CheckpointException)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, Mapping):
        for failure in failures.values():
            inner = failure[0] if isinstance(failure, tuple) and failure else failure
            if isinstance(inner, CheckpointError):
                return inner
    return None


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
