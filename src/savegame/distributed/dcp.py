"""``torch.distributed.checkpoint`` (DCP) storage for savegame: safetensors shards, JSON metadata, no pickle.

DCP is the engine that knows how FSDP2 / DTensor state is laid out across ranks and how to reshard it on
load; this module is the storage it talks to. :class:`SavegameStorageWriter` makes every rank write the
chunks DCP assigns to it into one safetensors file, ``shards.rank<R>.safetensors``, inside the shared
staging directory of the checkpoint (through savegame's streaming writer, hashing while it writes), and
hands the coordinator each chunk's place. The coordinator turns DCP's ``Metadata`` into JSON (our schema
below) that :mod:`savegame.distributed` puts into the manifest; no ``.metadata`` pickle is ever written.
:class:`SavegameStorageReader` rebuilds DCP's ``Metadata`` from that JSON and reads chunks through
savegame's bounded, hash-checked reader.

Non-tensor values never reach DCP (its default planner would ``torch.save`` them into a pickle):
:func:`split_tensors` separates every state into its tensor leaves, which go through DCP, and the rest,
which is stored as a plain savegame skeleton in the manifest. A ``BYTE_IO`` item reaching the writer or
reader is refused.

The JSON of one sharded item (the manifest's item skeleton)::

    {"format": "savegame.sharded", "version": 1,
     "state": <savegame skeleton of the state, tensor leaves replaced by null>,
     "tensors": [{"path": ["state", "0.weight", "exp_avg"],        where the tensor sits in "state"
                  "fqn": "optimizer.state.0.weight.exp_avg",       its key for DCP
                  "dtype": "float32", "size": [7, 5],              the global (unsharded) tensor
                  "chunks": [{"offsets": [0, 0], "sizes": [4, 5],
                              "file": "shards.rank0.safetensors", "key": "...", "extra": {}}, ...]}]}

``extra`` holds the logical dtype and shape for dtypes stored as views (``complex128`` ...).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from savegame._util.progress import ProgressBar
from savegame.adapters.torch import dtype_from_name, dtype_name, encode_hook, tensor_from_bytes
from savegame.engine.write_loop import EncodedItem, write_files
from savegame.engine.writer import make_encoder
from savegame.errors import InvalidManifestError, StateMismatchError, UnsupportedTypeError
from savegame.format.checks import SHARDED_FORMAT
from savegame.format.manifest import FileEntry, Manifest
from savegame.format.tensorfile import TensorFileReader
from savegame.format.tree import MAX_DEPTH, ArrayRecord, contains, too_deep
from savegame.storage.base import CheckpointReader, Transaction

__all__ = [
    "SHARDED_FORMAT",
    "ChunkRecord",
    "SavegameStorageReader",
    "SavegameStorageWriter",
    "ShardedItem",
    "TensorRecord",
    "assemble_tensor",
    "parse_sharded_item",
    "split_tensors",
]

SHARDED_VERSION = 1
MAX_DIMS = 64
MAX_CHUNKS = 1 << 20

PathKey = tuple[str | int, ...]


# ---------------------------------------------------------------------------------------------------
# The JSON schema


@dataclass(frozen=True)
class ChunkRecord:
    """One stored piece of a tensor: its place in the global tensor and where its bytes are."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    key: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"offsets": list(self.offsets), "sizes": list(self.sizes), "file": self.file, "key": self.key,
                "extra": dict(self.extra)}  # fmt: skip


@dataclass(frozen=True)
class TensorRecord:
    """A tensor of a sharded item: where it sits in the item's state, its global shape, its chunks."""

    path: PathKey
    fqn: str
    dtype: str
    size: tuple[int, ...]
    chunks: tuple[ChunkRecord, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype, self.fqn)

    def to_json(self) -> dict[str, Any]:
        return {"path": list(self.path), "fqn": self.fqn, "dtype": self.dtype, "size": list(self.size),
                "chunks": [c.to_json() for c in self.chunks]}  # fmt: skip


@dataclass(frozen=True)
class ShardedItem:
    """A parsed sharded item: the non-tensor structure (tensor leaves are None) and its tensors."""

    state: Any
    tensors: tuple[TensorRecord, ...]




def _int_list(value: object, where: str, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_DIMS:
        raise InvalidManifestError(f"{where}: {what} must be a list of at most {MAX_DIMS} integers")
    if not all(type(v) is int and 0 <= v < 2**62 for v in value):
        raise InvalidManifestError(f"{where}: {what} must hold non-negative integers")
    return tuple(value)


def parse_sharded_item(node: object, where: str) -> ShardedItem:
    """Validate the decoded skeleton of a sharded item (untrusted input) and return its records."""
    if not isinstance(node, dict) or node.get("format") != SHARDED_FORMAT:
        raise InvalidManifestError(f"{where}: not a sharded item (no format {SHARDED_FORMAT!r})")
    if node.get("version") != SHARDED_VERSION:
        raise InvalidManifestError(f"{where}: sharded item version {str(node.get('version'))[:20]} is not supported")
    raw = node.get("tensors")
    if not isinstance(raw, list):
        raise InvalidManifestError(f"{where}: tensors must be a list")
    tensors = []
    fqns: set[str] = set()
    paths: set[PathKey] = set()
    for i, entry in enumerate(raw):
        at = f"{where}.tensors[{i}]"
        if not isinstance(entry, dict):
            raise InvalidManifestError(f"{at}: must be an object")
        path, fqn, dtype, chunks = entry.get("path"), entry.get("fqn"), entry.get("dtype"), entry.get("chunks")
        if not isinstance(path, list) or not all(isinstance(p, str) or type(p) is int for p in path):
            raise InvalidManifestError(f"{at}: path must be a list of strings and integers")
        if not isinstance(fqn, str) or not fqn or fqn in fqns:
            raise InvalidManifestError(f"{at}: fqn must be a unique non-empty string")
        if not isinstance(dtype, str):
            raise InvalidManifestError(f"{at}: dtype must be a string")
        dtype_from_name(dtype, at)
        size = _int_list(entry.get("size"), at, "size")
        if not isinstance(chunks, list) or len(chunks) > MAX_CHUNKS:
            raise InvalidManifestError(f"{at}: chunks must be a list of at most {MAX_CHUNKS}")
        records = []
        for j, c in enumerate(chunks):
            cat = f"{at}.chunks[{j}]"
            if not isinstance(c, dict):
                raise InvalidManifestError(f"{cat}: must be an object")
            offsets = _int_list(c.get("offsets"), cat, "offsets")
            sizes = _int_list(c.get("sizes"), cat, "sizes")
            if len(offsets) != len(size) or len(sizes) != len(size):
                raise InvalidManifestError(f"{cat}: offsets/sizes do not have the tensor's {len(size)} dimensions")
            if any(o + s > d for o, s, d in zip(offsets, sizes, size)):
                raise InvalidManifestError(f"{cat}: chunk {list(offsets)}+{list(sizes)} exceeds size {list(size)}")
            file, key, extra = c.get("file"), c.get("key"), c.get("extra", {})
            if not isinstance(file, str) or not isinstance(key, str) or not isinstance(extra, dict):
                raise InvalidManifestError(f"{cat}: file and key must be strings, extra an object")
            records.append(ChunkRecord(offsets, sizes, file, key, extra))
        _check_coverage(size, records, at)
        key_path = tuple(path)
        if key_path in paths:
            raise InvalidManifestError(f"{at}: path {path[:8]} appears twice")
        fqns.add(fqn)
        paths.add(key_path)
        tensors.append(TensorRecord(key_path, fqn, dtype, size, tuple(records)))
    return ShardedItem(state=node.get("state"), tensors=tuple(tensors))


def _volume(sizes: Sequence[int]) -> int:
    n = 1
    for d in sizes:
        n *= d
    return n


def _check_coverage(size: tuple[int, ...], chunks: Sequence[ChunkRecord], where: str) -> None:
    """The chunks tile the tensor exactly: their volumes add up to it and no two of them overlap.

    (Each chunk was checked to lie inside the tensor, so together this means every element is stored
    exactly once.) The overlap test compares boxes pairwise, vectorised, in blocks of bounded memory.
    """
    total = sum(_volume(c.sizes) for c in chunks)
    if total != _volume(size):
        raise InvalidManifestError(
            f"{where}: chunks hold {total} elements, the tensor {list(size)} has {_volume(size)}"
        )
    boxes = [c for c in chunks if _volume(c.sizes) > 0]
    if len(boxes) < 2 or not size:
        return
    starts = np.array([c.offsets for c in boxes], dtype=np.int64)
    ends = starts + np.array([c.sizes for c in boxes], dtype=np.int64)
    block = max(1, (1 << 22) // (len(boxes) * len(size)))
    for i in range(0, len(boxes), block):
        s, e = starts[i : i + block, None, :], ends[i : i + block, None, :]
        overlap = np.all((s < ends[None, :, :]) & (starts[None, :, :] < e), axis=2)
        rows, cols = np.nonzero(overlap)
        clash = [(i + r, c) for r, c in zip(rows.tolist(), cols.tolist()) if i + r != c]
        if clash:
            a, b = clash[0]
            raise InvalidManifestError(
                f"{where}: chunk at {list(boxes[a].offsets)} overlaps the chunk at {list(boxes[b].offsets)}"
            )


# ---------------------------------------------------------------------------------------------------
# Splitting a state into its tensors and the rest


def split_tensors(state: Any, where: str) -> tuple[Any, dict[PathKey, torch.Tensor]]:
    """Return ``state`` with every tensor leaf replaced by None, and the tensors by path.

    Containers are dicts (string or integer keys) and lists; a tensor inside a tuple or under another
    kind of key cannot be put back in place and raises :class:`UnsupportedTypeError`.
    """
    tensors: dict[PathKey, torch.Tensor] = {}

    def walk(node: Any, path: PathKey, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise UnsupportedTypeError(too_deep(where, "state"))
        if isinstance(node, torch.Tensor):
            tensors[path] = node
            return None
        if isinstance(node, Mapping):
            out = {}
            for k, v in node.items():
                if isinstance(v, torch.Tensor) or _holds_tensor(v, depth + 1):
                    if not (isinstance(k, str) or (type(k) is int and abs(k) < 2**53)):
                        at = ".".join(map(str, (where, *path)))
                        raise UnsupportedTypeError(f"{at}: key {k!r} cannot hold a tensor")
                out[k] = walk(v, (*path, k), depth + 1)
            return out
        if isinstance(node, list):
            return [walk(v, (*path, i), depth + 1) for i, v in enumerate(node)]
        if isinstance(node, tuple) and _holds_tensor(node, depth):
            raise UnsupportedTypeError(f"{where}.{'.'.join(map(str, path))}: tensors inside a tuple are not supported")
        return node

    return walk(state, (), 0), tensors


def _holds_tensor(node: Any, depth: int) -> bool:
    return contains(node, lambda v: isinstance(v, torch.Tensor), depth)


def set_at(structure: Any, path: PathKey, value: Any) -> Any:
    """Put ``value`` at ``path`` inside ``structure`` (in place); return the structure (``value`` at the root)."""
    if not path:
        return value
    node = structure
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return structure


def delete_at(structure: Any, path: PathKey) -> None:
    """Remove the dict entry at ``path`` (used to drop tensors a non-strict load could not fill)."""
    node = structure
    for step in path[:-1]:
        node = node[step]
    if isinstance(node, dict):
        node.pop(path[-1], None)


# ---------------------------------------------------------------------------------------------------
# Writing


class SavegameStorageWriter(StorageWriter):
    """DCP storage writer: each rank's chunks into one hashed safetensors file of a shared transaction.

    ``txn`` is this rank's view of the checkpoint's transaction (the owner's on rank 0, a joined one
    elsewhere); the writer only opens and closes (makes durable) its file, never commits. After
    ``dcp.save`` returns, the coordinator's :attr:`tensors` and :attr:`files` describe everything all
    ranks wrote (filled by :meth:`finish`, which DCP calls once every rank has finished writing).
    """

    def __init__(self, txn: Transaction, *, rank: int) -> None:
        super().__init__()
        self.txn = txn
        self.rank = rank
        self.file = f"shards.rank{rank}.safetensors"
        self.tensors: dict[str, tuple[str, tuple[int, ...], list[ChunkRecord]]] = {}
        self.files: dict[str, FileEntry] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Nothing to reset: one writer object serves one save."""

    # The signature is DCP's (it passes rank= and use_collectives= by keyword); nothing here needs them.
    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        enc = make_encoder(copy=False, key_skip=0)
        pending: list[tuple[Any, str, dict[str, Any], int]] = []
        for item in plan.items:
            fqn = item.index.fqn
            if item.type == WriteItemType.BYTE_IO:
                raise UnsupportedTypeError(f"{fqn}: non-tensor value reached DCP (savegame never pickles; report this)")
            data = planner.resolve_data(item)
            if not isinstance(data, torch.Tensor):
                raise UnsupportedTypeError(f"{fqn}: DCP resolved {type(data).__name__}, expected a tensor")
            tensor = data.detach()
            if type(tensor) is not torch.Tensor:
                tensor = tensor.as_subclass(torch.Tensor)
            offsets = tuple(int(o) for o in (item.index.offset or ()))
            node = encode_hook(tensor, (f"{fqn}@{','.join(map(str, offsets))}",), enc)
            if node is None or "key" not in node:
                raise UnsupportedTypeError(f"{fqn}: cannot store this tensor")
            extra: dict[str, Any] = {k: node[k] for k in ("dtype", "shape") if k in node}
            pending.append((item.index, node["key"], extra, tensor.numel() * tensor.element_size()))
        results: list[WriteResult] = []
        if pending:
            written = self._write_file(enc.records)
            for index, key, extra, nbytes in pending:
                storage = {"file": self.file, "key": key, "extra": extra, "file_bytes": written.bytes,
                           "file_hash": written.hash}  # fmt: skip
                results.append(WriteResult(index=index, size_in_bytes=nbytes, storage_data=storage))
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _write_file(self, records: list[ArrayRecord]) -> FileEntry:
        """This rank's shard file through the one write loop (:mod:`savegame.engine.write_loop`): durable when
        this returns, a full disk a :class:`StorageError`, a progress bar on a terminal."""
        item = EncodedItem(name=self.file, kind="shards", skeleton=None, records=records, file=self.file)
        progress = ProgressBar(f"saving {self.txn.name} (rank {self.rank} shards)", item.nbytes)
        try:
            return write_files(self.txn, [item], progress, close_each=True).files[self.file]
        finally:
            progress.close()

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Coordinator, after every rank wrote: turn DCP's metadata and the results into our records."""
        placed: dict[tuple[str, tuple[int, ...]], dict[str, Any]] = {}
        for rank_results in results:
            for wr in rank_results:
                sd = wr.storage_data
                placed[(wr.index.fqn, tuple(int(o) for o in (wr.index.offset or ())))] = sd
                self.files[sd["file"]] = FileEntry(bytes=int(sd["file_bytes"]), hash=str(sd["file_hash"]))
        for fqn, md in metadata.state_dict_metadata.items():
            if not isinstance(md, TensorStorageMetadata):
                raise UnsupportedTypeError(f"{fqn}: DCP planned a non-tensor entry (savegame never pickles)")
            chunks = []
            for chunk in md.chunks:
                offsets = tuple(int(o) for o in chunk.offsets)
                sd = placed.get((fqn, offsets))
                if sd is None:
                    raise UnsupportedTypeError(f"{fqn}: no rank wrote the chunk at {list(offsets)}")
                chunks.append(ChunkRecord(offsets, tuple(int(s) for s in chunk.sizes), sd["file"], sd["key"],
                                          dict(sd["extra"])))  # fmt: skip
            self.tensors[fqn] = (dtype_name(md.properties.dtype), tuple(int(s) for s in md.size), chunks)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # only used explicitly, never picked by DCP's automatic storage detection


# ---------------------------------------------------------------------------------------------------
# Reading


class _Files:
    """Tensor files of one checkpoint opened on demand, each checked (size, hash, header) once."""

    def __init__(self, checkpoint: CheckpointReader | str, manifest: Manifest, *, verify: bool) -> None:
        self.checkpoint = checkpoint
        self.directory = checkpoint if isinstance(checkpoint, str) else checkpoint.where  # for messages
        self.manifest = manifest
        self.verify = verify
        self._open: dict[str, TensorFileReader] = {}

    def get(self, file: str, where: str) -> TensorFileReader:
        reader = self._open.get(file)
        if reader is None:
            if file not in self.manifest.files:
                raise InvalidManifestError(f"{where}: file {file[:80]!r} is not listed in the manifest")
            from savegame.api import open_file

            reader = open_file(self.checkpoint, self.manifest, file, verify=self.verify)
            self._open[file] = reader
        return reader


def read_chunk(files: _Files, record: TensorRecord, chunk: ChunkRecord) -> torch.Tensor:
    """A chunk as a tensor viewing the file mapping (copy-on-write), checked against its record."""
    where = f"{files.directory}: {record.fqn} chunk {list(chunk.offsets)}"
    reader = files.get(chunk.file, where)
    info = reader.tensors.get(chunk.key)
    if info is None:
        raise InvalidManifestError(f"{where}: key {chunk.key[:80]!r} is not in {chunk.file}")
    node: dict[str, Any] = {"$": "tensor", **{k: v for k, v in chunk.extra.items() if k in ("dtype", "shape")}}
    tensor = tensor_from_bytes(node, reader.raw(chunk.key), info.code, info.shape, where, "cpu")
    if tensor.dtype != record.torch_dtype or tuple(tensor.shape) != chunk.sizes:
        raise InvalidManifestError(
            f"{where}: stored {tensor.dtype} {list(tensor.shape)}, the manifest says {record.dtype} {list(chunk.sizes)}"
        )
    return tensor


def assemble_tensor(files: _Files, record: TensorRecord) -> torch.Tensor:
    """The full (unsharded) tensor of ``record``, assembled from its chunks (which
    :func:`parse_sharded_item` checked tile it exactly, so the result holds no uninitialised memory)."""
    full = torch.empty(record.size, dtype=record.torch_dtype)
    for chunk in record.chunks:
        src = read_chunk(files, record, chunk)
        full[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))] = src
    return full


class SavegameStorageReader(StorageReader):
    """DCP storage reader over a savegame checkpoint: metadata from the manifest's JSON, chunks from
    hash-checked safetensors files. Never unpickles anything and refuses ``BYTE_IO`` reads."""

    def __init__(
        self, checkpoint: CheckpointReader | str, manifest: Manifest, tensors: Sequence[TensorRecord], *, verify: bool
    ) -> None:
        super().__init__()
        self.files = _Files(checkpoint, manifest, verify=verify)
        self.records = {r.fqn: r for r in tensors}
        self.chunks: dict[tuple[str, tuple[int, ...]], ChunkRecord] = {
            (r.fqn, c.offsets): c for r in tensors for c in r.chunks
        }

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Nothing to reset: one reader object serves one load."""

    # The signature is DCP's (it may pass rank= by keyword); the metadata is global, so it is unused.
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        state: dict[str, Any] = {}
        for r in self.records.values():
            chunks = [ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)) for c in r.chunks]
            state[r.fqn] = TensorStorageMetadata(
                properties=TensorProperties(dtype=r.torch_dtype), size=torch.Size(r.size), chunks=chunks
            )
        return Metadata(state_dict_metadata=state, storage_meta=StorageMeta())

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        cache: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        for req in plan.items:
            fqn = req.storage_index.fqn
            if req.type == LoadItemType.BYTE_IO:
                raise UnsupportedTypeError(f"{fqn}: a non-tensor read was planned (savegame never unpickles)")
            offsets = tuple(int(o) for o in (req.storage_index.offset or ()))
            chunk = self.chunks.get((fqn, offsets))
            if chunk is None:
                raise InvalidManifestError(f"{self.files.directory}: no chunk of {fqn} at {list(offsets)}")
            src = cache.get((fqn, offsets))
            if src is None:
                src = read_chunk(self.files, self.records[fqn], chunk)
                cache[(fqn, offsets)] = src
            index = tuple(slice(int(o), int(o) + int(n)) for o, n in zip(req.storage_offsets, req.lengths))
            piece = src[index]
            dest = planner.resolve_tensor(req).detach()
            if tuple(dest.shape) != tuple(piece.shape):
                raise StateMismatchError(f"{fqn}: read {list(piece.shape)} for a target of {list(dest.shape)}")
            dest.copy_(piece)
            planner.commit_tensor(req, dest)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # only used explicitly, never picked by DCP's automatic storage detection
