"""Helpers shared by the worker scripts that the distributed tests launch with ``torchrun`` (gloo, CPU)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from savegame.storage.local import FileOps


def init() -> tuple[int, int]:
    """Join the torchrun job on the gloo backend; return (rank, world size)."""
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    return dist.get_rank(), dist.get_world_size()


def finish(code: int = 0) -> None:
    """Leave the job and exit at once (a normal interpreter teardown with torch loaded takes seconds)."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def write_json(path: str, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def digest(tensors: Iterator[torch.Tensor]) -> str:
    """SHA-256 over the exact bytes of the tensors, in order (bit-identical check)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def diff(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two nested states differ (tensors compared bit for bit); empty when identical."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{where}: {type(a).__name__} vs {type(b).__name__}"]
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{where}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"]
        same = torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        return [] if same else [f"{where}: values differ"]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"]
        return [d for k in a for d in diff(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{where}.{i}")]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


@contextmanager
def pickle_forbidden() -> Iterator[list[str]]:
    """Make ``pickle.load``, ``pickle.loads`` and ``torch.load`` raise; yields the list of attempted calls."""
    calls: list[str] = []

    def banned(name: str) -> Callable[..., Any]:
        def fail(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} was called during a savegame load")

        return fail

    saved = (pickle.load, pickle.loads, torch.load)
    pickle.load, pickle.loads, torch.load = banned("pickle.load"), banned("pickle.loads"), banned("torch.load")
    try:
        yield calls
    finally:
        pickle.load, pickle.loads, torch.load = saved


class Intruder(FileOps):
    """Another writer commits a checkpoint under the name being published, just before the publishing
    rename (the race a Checkpointer's name choice cannot see); once. Used by tests/test_write_loop.py
    (sync and background saves) and _clash_worker.py (a 2-rank save)."""

    def __init__(self) -> None:
        self.took: list[str] = []

    def rename(self, src: str, dst: str) -> None:
        if not self.took and os.path.basename(src).startswith(".staging-"):
            import numpy as np

            import savegame

            savegame.save(dst, {"theirs": np.arange(3)})
            self.took.append(os.path.basename(dst))
        super().rename(src, dst)
