"""Forged skeletons (manifest edited and re-signed, as a forger can always do) fail with an
InvalidManifestError in ``savegame.verify``, ``savegame verify`` and ``savegame.load`` alike, and
``Checkpointer.restore`` falls back to the older checkpoint instead of raising a bare TypeError.

Each case is something savegame never writes: an unknown torch dtype name, an optimizer state whose
``param_groups`` or ``state`` is not the structure ``Optimizer.load_state_dict`` relies on, a tensor on
the ``meta`` device (no data: the model would silently be left without weights).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame
from savegame import Checkpointer, InvalidManifestError, ResumeWarning
from savegame.format.manifest import sign_manifest

Body = dict[str, Any]


def _trained() -> tuple[torch.nn.Linear, torch.optim.Adam]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    return model, opt


def _skeleton(body: Body, item: str) -> Any:
    return body["items"][item]["skeleton"]


def _set_dtype(body: Body) -> None:
    _skeleton(body, "dtype")["v"] = "__class__"


def _param_groups(body: Body) -> None:
    _skeleton(body, "optimizer")["param_groups"] = 5


def _state(body: Body) -> None:
    _skeleton(body, "optimizer")["state"] = 5


def _params(body: Body) -> None:
    _skeleton(body, "optimizer")["param_groups"][0]["params"] = 5


def _state_entry(body: Body) -> None:
    _skeleton(body, "optimizer")["state"]["v"][0] = 5


def _meta_device(body: Body) -> None:
    _skeleton(body, "model")["weight"]["device"] = "meta"


def _garbage_device(body: Body) -> None:
    _skeleton(body, "model")["bias"]["device"] = "cuda:0; rm -rf /"


def _size(body: Body) -> None:
    body["items"]["shape"]["skeleton"]["v"] = [-1]


FORGERIES: dict[str, Callable[[Body], None]] = {
    "dtype __class__": _set_dtype,
    "param_groups 5": _param_groups,
    "state 5": _state,
    "params 5": _params,
    "state entry 5": _state_entry,
    "device meta": _meta_device,
    "device garbage": _garbage_device,
    "size -1": _size,
}
MESSAGES = {
    "dtype __class__": "unknown torch dtype '__class__'",
    "param_groups 5": "optimizer.param_groups: must be a list of dicts",
    "state 5": "optimizer.state: must map parameter ids to dicts",
    "params 5": "optimizer.param_groups.0.params",
    "state entry 5": "optimizer.state: must map parameter ids to dicts",
    "device meta": "model.weight: tensor recorded on the 'meta' device",
    "device garbage": "invalid torch.device",
    "size -1": "invalid torch.Size",
}


def _state_to_save() -> dict[str, Any]:
    model, opt = _trained()
    return {"model": model, "optimizer": opt, "dtype": torch.float32, "shape": torch.Size([2, 3])}


def forge(checkpoint: Path, edit: Callable[[Body], None]) -> None:
    body: Body = json.loads((checkpoint / "manifest.json").read_bytes())
    edited = copy.deepcopy(body)
    edit(edited)
    (checkpoint / "manifest.json").write_bytes(sign_manifest(edited))


@pytest.fixture(scope="module")
def forged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One run root holding a forged copy of one good checkpoint per case."""
    root = tmp_path_factory.mktemp("forged")
    good = root / "good"
    savegame.save(good, _state_to_save())
    out = {}
    for i, (case, edit) in enumerate(FORGERIES.items()):
        path = root / f"epoch={i:03d}"
        shutil.copytree(good, path)
        forge(path, edit)
        out[case] = path
    shutil.rmtree(good)
    return out


@pytest.mark.parametrize("case", FORGERIES)
def test_verify_and_load_refuse_the_forgery(forged: dict[str, Path], case: str) -> None:
    path = forged[case]
    for what, action in [
        ("verify", lambda: savegame.verify(path)),
        ("load", lambda: savegame.load(path)),
        ("load into live objects", lambda: savegame.load(path, {"model": _trained()[0], "optimizer": _trained()[1]})),
    ]:
        with pytest.raises(InvalidManifestError) as info:
            action()
        assert MESSAGES[case] in str(info.value), (what, str(info.value))


def test_cli_verify_refuses_every_forgery(forged: dict[str, Path]) -> None:
    """``savegame verify`` runs the checks of ``savegame.verify`` (it used to pass all of these)."""
    env = {**os.environ, "PYTHONPATH": str(Path(savegame.__file__).parents[1])}
    root = next(iter(forged.values())).parent
    result = subprocess.run([sys.executable, "-m", "savegame.cli", "verify", str(root)], capture_output=True,
                            text=True, env=env, timeout=300)  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"0 ok, {len(FORGERIES)} corrupt" in result.stdout.replace("\n", " ") + result.stderr, result.stdout
    for case, path in forged.items():
        line = next(ln for ln in result.stdout.splitlines() if path.name in ln)
        assert "CORRUPT" in line and MESSAGES[case][:30] in line, line


def test_restore_into_an_optimizer_from_a_forged_kind_is_a_checkpoint_error(tmp_path: Path) -> None:
    """With the item's kind forged too (so no kind-based check applies), restoring into a live
    optimizer still raises a CheckpointError naming the field, not torch's TypeError."""
    savegame.save(tmp_path / "c", _state_to_save())

    def edit(body: Body) -> None:
        body["items"]["optimizer"]["kind"] = "data"
        _param_groups(body)

    forge(tmp_path / "c", edit)
    with pytest.raises(InvalidManifestError, match=r"optimizer\.param_groups"):
        savegame.load(tmp_path / "c", {"optimizer": _trained()[1]}, strict=False)


@pytest.mark.parametrize("case", ["param_groups 5", "state 5", "dtype __class__", "device meta"])
def test_restore_falls_back_to_the_older_checkpoint(tmp_path: Path, case: str) -> None:
    model, opt = _trained()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save({"model": model, "optimizer": opt, "dtype": torch.float32, "shape": torch.Size([1])}, epoch=1)
        older_weight = model.weight.detach().clone()
        with torch.no_grad():
            model.weight.add_(1.0)
        ckpt.save({"model": model, "optimizer": opt, "dtype": torch.float32, "shape": torch.Size([1])}, epoch=2)
    newest = max((p for p in tmp_path.iterdir() if p.name.startswith("epoch")), key=lambda p: p.name)
    forge(newest, FORGERIES[case])
    fresh_model = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.Adam(fresh_model.parameters(), lr=0.01)
    with pytest.warns(ResumeWarning, match="damaged"):
        restored = Checkpointer(tmp_path).restore({"model": fresh_model, "optimizer": fresh_opt})
    assert restored is not None and restored.epoch == 1
    assert torch.equal(fresh_model.weight, older_weight)
    assert fresh_opt.state_dict()["state"][0]["exp_avg"].abs().sum() > 0
    assert not newest.exists()  # quarantined (renamed, kept), never deleted
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".quarantine")]


def test_an_integer_tensor_forged_to_require_grad_is_an_invalid_manifest(tmp_path: Path) -> None:
    """``"param": true`` on an int64 tensor's node: torch raised a bare RuntimeError ("Only Tensors of
    floating point and complex dtype can require gradients") out of a plain load."""
    savegame.save(tmp_path / "c", {"m": {"steps": torch.arange(4), "w": torch.ones(2, requires_grad=True)}})

    def edit(body: Body) -> None:
        _skeleton(body, "m")["steps"]["param"] = True

    forge(tmp_path / "c", edit)
    with pytest.raises(InvalidManifestError, match=r"m\.steps: a tensor of dtype int64 cannot require gradients"):
        savegame.load(tmp_path / "c")
    forge(tmp_path / "c", lambda body: _skeleton(body, "m")["steps"].update(param=False, requires_grad=True))
    with pytest.raises(InvalidManifestError, match=r"m\.steps: a tensor of dtype int64"):
        savegame.load(tmp_path / "c")


def test_many_nodes_of_one_array_cannot_make_a_load_allocate_without_bound(tmp_path: Path) -> None:
    """Nodes of one key that differ in a field (here an unknown one) are each built again: 200 of them
    over a 4 MiB big-endian array made a load allocate 800 MiB. Past the item's stored bytes plus 64 MiB
    of such copies the load is an InvalidManifestError; a few views of one key still load."""
    import numpy as np

    from savegame.engine.item_decoder import REBUILD_SLACK

    savegame.save(tmp_path / "c", {"m": {"w": np.zeros(1 << 20, dtype=">f4")}})
    node = json.loads((tmp_path / "c" / "manifest.json").read_bytes())["items"]["m"]["skeleton"]["w"]
    copies = (REBUILD_SLACK >> 22) + 4  # 4 MiB each: past the allowance

    def many(body: Body) -> None:
        body["items"]["m"]["skeleton"] = [{**node, "junk": i} for i in range(copies)]

    forge(tmp_path / "c", many)
    with pytest.raises(InvalidManifestError, match=r"array 'w' is built again .* forged or damaged"):
        savegame.load(tmp_path / "c")
    forge(tmp_path / "c", lambda body: body["items"]["m"].update(skeleton=[{**node, "junk": i} for i in range(3)]))
    assert len(savegame.load(tmp_path / "c")["m"]) == 3
