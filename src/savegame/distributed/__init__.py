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

from savegame.distributed.items import classify as classify
from savegame.distributed.loading import Layout as Layout
from savegame.distributed.loading import item_names as item_names
from savegame.distributed.loading import load_full_state_dict as load_full_state_dict
from savegame.distributed.loading import load_state as load_state
from savegame.distributed.loading import read_layout as read_layout
from savegame.distributed.loading import restore as restore
from savegame.distributed.ranks import LAYOUT_ITEM as LAYOUT_ITEM
from savegame.distributed.ranks import LAYOUT_VERSION as LAYOUT_VERSION
from savegame.distributed.ranks import DistributedWarning as DistributedWarning
from savegame.distributed.ranks import RankContext as RankContext
from savegame.distributed.ranks import current_context as current_context
from savegame.distributed.saving import save as save
from savegame.distributed.saving import write_state as write_state

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
