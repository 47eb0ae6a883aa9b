"""One nesting limit (savegame.format.tree.MAX_DEPTH) and one message for every recursive walk.

Save refuses state nested one level deeper than the deepest it writes; a forged manifest with that
skeleton is refused the same way by load, verify and the export/diff walker (before, they used 100,
200 or 300 levels and four different messages).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import savegame
from savegame.errors import InvalidManifestError, UnsupportedTypeError
from savegame.export import flatten_skeleton
from savegame.format.manifest import sign_manifest
from savegame.format.tree import MAX_DEPTH

MESSAGE = f"nested deeper than {MAX_DEPTH} levels"


def _nest(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"x": value}
    return value


def _forge(checkpoint: Path, skeleton: Any) -> None:
    """Replace item ``a``'s skeleton and re-sign the manifest (a forged but self-consistent one)."""
    body = json.loads((checkpoint / "manifest.json").read_text())
    body["items"]["a"]["skeleton"] = skeleton
    (checkpoint / "manifest.json").write_bytes(sign_manifest(body))


def test_the_deepest_state_saves_loads_verifies_and_flattens(tmp_path: Path) -> None:
    deepest = _nest(MAX_DEPTH - 1)  # the item name is the first level
    savegame.save(tmp_path / "c", {"a": deepest})
    assert savegame.load(tmp_path / "c")["a"] == deepest
    savegame.verify(tmp_path / "c")
    skeleton = json.loads((tmp_path / "c" / "manifest.json").read_text())["items"]["a"]["skeleton"]
    assert len(list(flatten_skeleton(skeleton, ("a",)))) == 1


def test_one_level_deeper_is_refused_alike_by_save_load_verify_and_export(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedTypeError, match=MESSAGE):
        savegame.save(tmp_path / "refused", {"a": _nest(MAX_DEPTH)})
    assert not (tmp_path / "refused").exists()

    savegame.save(tmp_path / "c", {"a": _nest(MAX_DEPTH - 1)})
    _forge(tmp_path / "c", _nest(MAX_DEPTH))
    with pytest.raises(InvalidManifestError, match=MESSAGE):
        savegame.load(tmp_path / "c")
    with pytest.raises(InvalidManifestError, match=MESSAGE):
        savegame.verify(tmp_path / "c")
    with pytest.raises(InvalidManifestError, match=MESSAGE):
        list(flatten_skeleton(_nest(MAX_DEPTH), ("a",)))
