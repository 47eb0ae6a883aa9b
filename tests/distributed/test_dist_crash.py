"""A rank SIGKILLed in the middle of a distributed save: nothing is committed, the previous checkpoint loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from _common import diff
from _launch import torchrun

import savegame
from savegame import distributed as sgd
from savegame.storage.local import LocalStorage

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]


@pytest.mark.parametrize(
    ("victim", "file"),
    [(1, "shards"), (0, "rng")],
    ids=["rank1-killed-writing-its-dcp-shard", "rank0-killed-writing-its-rng-file"],
)
def test_killed_rank_leaves_no_checkpoint(tmp_path: Path, victim: int, file: str) -> None:
    root, out = tmp_path / "ckpt", tmp_path / "out"
    root.mkdir()
    out.mkdir()
    proc = torchrun("_kill_worker.py", "--root", str(root), "--out", str(out), "--victim", str(victim),
                    "--file", file, expect_ok=False)  # fmt: skip
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert re.search(r"exitcode\s*:?\s*-9\b", proc.stderr), proc.stderr[-3000:]  # the victim died by SIGKILL
    assert "returned although" not in proc.stdout + proc.stderr

    storage = LocalStorage(root)
    assert storage.committed() == ["good"]  # "doomed" never became visible
    assert not (root / "doomed").exists()
    leftovers = [p.name for p in root.iterdir() if p.name != "good"]
    assert all(name.startswith(".staging-") for name in leftovers), leftovers
    for name in leftovers:  # a dead rank 0 cannot clean up: its staging directory stays, invisible
        with pytest.raises(savegame.NotACheckpointError):
            savegame.load(root / name)
    assert sorted(storage.cleanup()) == sorted(leftovers)  # the writers are dead: the next writer cleans up

    # The previous checkpoint is intact and restores.
    savegame.verify(root / "good")
    ref = savegame.load(out / "ref-good")
    full = sgd.load_full_state_dict(root / "good")
    assert full["step"] == 1
    assert diff(full["model"], ref["model"]) == [] and diff(full["optimizer"], ref["optimizer"]) == []
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    sgd.restore(root / "good", {"model": model})
    assert diff(dict(model.state_dict()), ref["model"]) == []
