"""The FSDP2 runs that several distributed tests share (each a ``torchrun`` launch, see ``_launch``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from _launch import FsdpRuns, torchrun


@pytest.fixture(scope="session")
def fsdp_saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FsdpRuns]:
    """FSDP2 at world size 2: train, save ``ws2`` (sharded), write full-state references."""
    base = tmp_path_factory.mktemp("fsdp")
    runs = FsdpRuns(root=base / "ckpt", out=base / "out")
    runs.root.mkdir()
    runs.out.mkdir()
    torchrun("_fsdp_worker.py", "--mode", "save", "--root", str(runs.root), "--out", str(runs.out))
    yield runs


@pytest.fixture(scope="session")
def fsdp_restored(fsdp_saved: FsdpRuns) -> FsdpRuns:
    """Restore ``ws2`` at world size 1 (and save it as ``ws1``), then ``ws2`` and ``ws1`` at world size 2."""
    args = ("--root", str(fsdp_saved.root), "--out", str(fsdp_saved.out))
    torchrun("_fsdp_worker.py", "--mode", "restore1", *args, nproc=1)
    torchrun("_fsdp_worker.py", "--mode", "restore2", *args, nproc=2)
    return fsdp_saved
