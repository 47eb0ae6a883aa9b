"""A DCP-written (sharded) checkpoint holds no pickle, and loading one never unpickles anything."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from _common import diff
from _launch import FsdpRuns
from safetensors import safe_open

import savegame
from savegame import distributed as sgd

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]
SRC = Path(__file__).resolve().parents[2] / "src" / "savegame"


def test_no_file_is_a_pickle(fsdp_restored: FsdpRuns) -> None:
    for ckpt in (fsdp_restored.root / "ws2", fsdp_restored.root / "ws1"):
        for f in ckpt.iterdir():
            assert f.name != ".metadata" and not f.name.endswith((".pkl", ".pt", ".distcp"))
            if f.name == "manifest.json":
                json.loads(f.read_text())
                continue
            assert f.suffix == ".safetensors", f
            with safe_open(str(f), framework="pt") as opened:  # a valid safetensors file: header + raw bytes
                assert list(opened.keys())


def test_two_rank_dcp_load_never_called_pickle(fsdp_restored: FsdpRuns) -> None:
    # The workers restored with pickle.load, pickle.loads and torch.load patched to raise.
    for mode in ("restore1", "restore2"):
        report = json.loads((fsdp_restored.out / f"{mode}.json").read_text())
        assert report["pickle_calls"] == [] and report["diff_ws2"] == []


def test_dcp_load_works_with_every_unpickler_disabled(fsdp_saved: FsdpRuns, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def banned(name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} called")

        return fail

    monkeypatch.setattr(pickle, "load", banned("pickle.load"))
    monkeypatch.setattr(pickle, "loads", banned("pickle.loads"))
    monkeypatch.setattr(pickle, "Unpickler", banned("pickle.Unpickler"))
    monkeypatch.setattr(torch, "load", banned("torch.load"))
    ref = savegame.load(fsdp_saved.out / "ref")
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    opt = torch.optim.Adam(model.parameters())
    sgd.restore(fsdp_saved.root / "ws2", {"model": model, "optimizer": opt, "rng": savegame.RNGState()})
    full = sgd.load_full_state_dict(fsdp_saved.root / "ws2")
    assert calls == []
    assert diff(dict(model.state_dict()), ref["model"]) == [] and diff(full["model"], ref["model"]) == []


def test_distributed_modules_never_unpickle() -> None:
    for name in ("distributed/__init__.py", "distributed/dcp.py"):
        text = (SRC / name).read_text()
        for forbidden in ("import pickle", "torch.load(", "pickle.load", "FileSystemReader", "FileSystemWriter",
                          "weights_only=False", "load_bytes("):  # fmt: skip
            assert forbidden not in text, f"{name} contains {forbidden!r}"
