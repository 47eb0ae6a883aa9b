"""Small rules and types that were written twice (and drifted apart) now exist once.

An ``ast`` scan of src/savegame counts the module-level definitions (class, def, or assignment other
than a plain re-export alias like ``KerasLoadReport = LoadReport``) of each name; the behaviour tests
check that the old names still reach the one definition.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import savegame
from savegame import api, distributed
from savegame.adapters import torch as torch_adapter
from savegame.adapters.report import LoadReport
from savegame.distributed import loading as _dist_loading  # noqa: F401  (binds distributed.loading)
from savegame.engine import capture
from savegame.storage import base

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "savegame"

ONCE = ("Mode", "Restart", "Location", "PathLike", "LoadReport", "check_count", "_check_count", "check_checkpoint_name",
        "validate_name", "writer_is_live", "FOREIGN_WRITER_GRACE_SECONDS", "dtype_from_name", "MAX_DEPTH",
        "too_deep")  # fmt: skip


def _definitions(name: str) -> list[str]:
    """Where ``name`` is defined at module level (an alias of another name does not count)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                alias = isinstance(node.value, ast.Name)  # X = Y: another name for Y
                if not alias and any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return found


@pytest.mark.parametrize("name", [n for n in ONCE if n != "_check_count"])
def test_defined_once(name: str) -> None:
    places = _definitions(name)
    assert len(places) == 1, f"{name} is defined in {places}: one job, one place"


def test_the_private_count_check_copy_is_gone() -> None:
    assert _definitions("_check_count") == []


def test_every_loader_returns_the_one_load_report(tmp_path: Path) -> None:
    assert savegame.LoadReport is capture.LoadReport is LoadReport
    assert torch_adapter.ModuleReport is LoadReport
    keras_adapter = pytest.importorskip("savegame.adapters.keras")
    assert keras_adapter.KerasLoadReport is LoadReport

    saved = torch.nn.Linear(3, 2)
    savegame.save(tmp_path / "c", {"model": saved, "epoch": 4})
    target = torch.nn.Sequential(torch.nn.Linear(3, 2))  # different key names: 0.weight vs weight
    report = savegame.load(tmp_path / "c", {"model": target}, strict=False)
    assert type(report) is LoadReport
    assert report.missing_keys and report.missing is report.missing_keys  # the Keras report's names
    assert report.unexpected is report.unexpected_keys and report.mismatched is report.mismatched_keys
    assert report.state["epoch"] == 4 and not report.clean
    assert report.describe("model").startswith("model: missing from the checkpoint: ")

    module_report = torch_adapter.restore_module(torch.nn.Linear(3, 2), saved.state_dict(), strict=True, where="m")
    assert type(module_report) is LoadReport and module_report.clean
    assert module_report.loaded_keys == module_report.loaded == ["weight", "bias"]


def test_the_location_types_are_the_storage_ones() -> None:
    assert api.Location is base.Location and api.PathLike is base.PathLike
    assert distributed.loading.Location is base.SavedAt


def test_mode_and_restart_are_the_policy_ones() -> None:
    from savegame import config, policies
    from savegame.policies import knobs
    from savegame.run import checkpointer

    assert checkpointer.Mode is config.Mode is policies.Mode
    assert checkpointer.Restart is config.Restart is knobs.Restart
    assert policies.resolve_mode("val_accuracy", "auto") == "max"


def test_one_decoder_of_stored_torch_dtype_names(tmp_path: Path) -> None:
    """Skeleton tags and DCP tensor records decode dtype names through the adapter's one table lookup
    (the DCP copy used ``getattr(torch, name)`` on file data)."""
    from savegame.distributed import dcp
    from savegame.errors import InvalidManifestError
    from savegame.format.manifest import sign_manifest

    assert dcp.dtype_from_name is torch_adapter.dtype_from_name
    assert "getattr(torch" not in (PACKAGE / "distributed" / "dcp.py").read_text(encoding="utf-8")

    record = dcp.TensorRecord(path=("w",), fqn="model.w", dtype="__class__", size=(2,), chunks=())
    with pytest.raises(InvalidManifestError, match=r"model\.w: unknown torch dtype '__class__'"):
        _ = record.torch_dtype
    assert dcp.TensorRecord(path=("w",), fqn="w", dtype="bfloat16", size=(2,), chunks=()).torch_dtype is torch.bfloat16

    savegame.save(tmp_path / "c", {"a": {"t": torch.float16}})
    assert savegame.load(tmp_path / "c")["a"]["t"] is torch.float16
    body = json.loads((tmp_path / "c" / "manifest.json").read_text())
    body["items"]["a"]["skeleton"]["t"]["v"] = "__class__"
    (tmp_path / "c" / "manifest.json").write_bytes(sign_manifest(body))
    for read in (savegame.load, savegame.verify):
        with pytest.raises(InvalidManifestError, match="unknown torch dtype '__class__'"):
            read(tmp_path / "c")
