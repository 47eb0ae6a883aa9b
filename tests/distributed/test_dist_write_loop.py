"""The name-clash rule of the one write loop at world size 2: a name taken meanwhile is retried under the
next free name on every rank together (the sync and background cases are in tests/test_write_loop.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from _launch import torchrun

import savegame


def test_a_name_taken_meanwhile_is_saved_under_the_next_free_name_on_every_rank(tmp_path: Path) -> None:
    root, out = tmp_path / "ckpt", tmp_path / "out"
    out.mkdir()
    torchrun("_clash_worker.py", "--root", str(root), "--out", str(out))
    zero, one = (json.loads((out / f"clash.rank{r}.json").read_text()) for r in (0, 1))
    assert zero["took"] == ["epoch=001"] and one["took"] == []
    for result in (zero, one):
        assert result["name"] == result["latest"] == result["best"] == "epoch=001-v1", result
    assert savegame.load(root / "epoch=001")["theirs"].tolist() == [0, 1, 2]  # the intruder's, untouched
    manifest = savegame.verify(root / "epoch=001-v1")
    assert manifest.progress is not None and manifest.progress["best"]["name"] == "epoch=001-v1"
    assert {"gen.rank0", "gen.rank1"} <= set(manifest.items)
    assert not [n for n in os.listdir(root) if n.startswith((".staging-", ".trash-"))]
