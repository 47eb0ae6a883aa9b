"""Shared test helpers: a small real training checkpoint, and a way to forge a consistent manifest.

``resign_manifest`` edits a checkpoint's ``manifest.json`` and re-signs it with savegame's own canonical
helpers (file sizes and hashes recomputed from disk, then ``manifest_hash``), so that the check a test
aims at is the one that fires, not the hash check in front of it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame
from savegame.format import manifest as manifest_mod
from savegame.format.hashing import hash_buffer

Mutator = Callable[[dict[str, Any]], None]


def train_small(steps: int = 3, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A tiny MLP and an Adam optimizer after ``steps`` real training steps."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
    return model, opt


def resign_manifest(ckpt: str | Path, mutate: Mutator | None = None, *, rehash: bool = True) -> dict[str, Any]:
    """Rewrite ``ckpt/manifest.json``: refresh file sizes/hashes (``rehash``), apply ``mutate``, re-sign."""
    path = Path(ckpt) / "manifest.json"
    body = json.loads(path.read_bytes())
    body.pop("manifest_hash", None)
    if rehash:
        for name, entry in body["files"].items():
            file = Path(ckpt) / name
            if file.is_file():
                data = file.read_bytes()
                entry["bytes"] = len(data)
                entry["hash"] = hash_buffer(data, len(data), body.get("hash_chunk_bytes"))
    if mutate is not None:
        mutate(body)
    data = manifest_mod.sign_manifest(body)
    path.write_bytes(data)
    body["manifest_hash"] = json.loads(data)["manifest_hash"]
    return body


@pytest.fixture
def resign() -> Callable[..., dict[str, Any]]:
    """The :func:`resign_manifest` helper (tests take it as a fixture rather than importing conftest)."""
    return resign_manifest


@pytest.fixture
def train() -> Callable[..., tuple[torch.nn.Module, torch.optim.Optimizer]]:
    """The :func:`train_small` helper."""
    return train_small


@pytest.fixture
def small_checkpoint(tmp_path: Path) -> Path:
    """A committed checkpoint of a trained model, its Adam optimizer, an epoch counter and metadata."""
    model, opt = train_small()
    path = tmp_path / "ckpt"
    savegame.save(path, {"model": model, "optimizer": opt, "epoch": 3}, metadata={"run": "t", "lr": 0.01})
    return path
