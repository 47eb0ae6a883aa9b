"""One verifier (issue 16): ``savegame.verify``, ``load``, the CLI's ``verify`` and ``ls --verify``, and the
Checkpointer's resume with a mirror all check a checkpoint through :mod:`savegame.engine.verifier`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import savegame
from savegame.engine.verifier import verify_checkpoint, verify_files
from savegame.errors import HashMismatchError, InvalidManifestError
from savegame.format import hashing
from savegame.format.manifest import sign_manifest
from savegame.run.checkpointer import Checkpointer
from savegame.storage import LocalStorage

SRC = str(Path(savegame.__file__).resolve().parents[1])


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC, "SAVEGAME_PROGRESS": "0"}
    env.pop("NO_COLOR", None)
    return subprocess.run([sys.executable, "-m", "savegame.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip


def _forge_shape(path: Path) -> None:
    """The issue's repro: the array node's logical shape says 7 complex numbers, the file holds 6; the
    manifest is re-signed, so only the check of the node against the tensor header can see it."""
    body = json.loads((path / "manifest.json").read_bytes())
    node = body["items"]["d"]["skeleton"]["w"]
    assert node["shape"] == [6]
    node["shape"] = [7]
    (path / "manifest.json").write_bytes(sign_manifest(body))


def test_a_forged_logical_shape_is_reported_by_verify_load_the_cli_and_ls_verify(tmp_path: Path) -> None:
    root = tmp_path / "run"
    path = root / "c"
    savegame.save(path, {"d": {"w": np.arange(6, dtype=np.complex128)}})
    _forge_shape(path)
    with pytest.raises(InvalidManifestError, match=r"d\.w: logical shape \[7\] x complex128"):
        savegame.verify(path)
    with pytest.raises(InvalidManifestError, match=r"d\.w: logical shape \[7\] x complex128"):
        savegame.load(path)
    with LocalStorage(root).reader("c") as reader, pytest.raises(InvalidManifestError, match="logical shape"):
        verify_checkpoint(reader)
    result = _cli("verify", path)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "CORRUPT" in result.stdout and "logical shape [7] x complex128" in result.stdout
    assert "ok" not in result.stdout.split()
    listing = _cli("ls", "--verify", root)
    assert listing.returncode == 1, (listing.stdout, listing.stderr)
    assert "corrupt" in listing.stdout and "logical shape [7]" in listing.stderr


def test_progress_is_told_every_byte_hashed_and_a_flipped_byte_is_found(tmp_path: Path) -> None:
    path = tmp_path / "c"
    savegame.save(path, {"a": {"w": np.arange(5 << 20, dtype=np.uint8)}, "b": {"w": np.ones(3)}, "n": 1})
    told: list[int] = []
    with LocalStorage(tmp_path).reader("c") as reader:
        manifest = verify_checkpoint(reader, progress=told.append)
    assert sum(told) == manifest.total_bytes and len(told) > 1  # the 5 MiB file is reported in steps
    data = path / manifest.items["a"].file  # type: ignore[operator]
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    with LocalStorage(tmp_path).reader("c") as reader:
        verify_files(reader, manifest, [manifest.items["b"].file])  # type: ignore[list-item]
        with pytest.raises(HashMismatchError, match=str(data)):
            verify_files(reader, manifest, progress=told.append)


class _CountingXxhash:
    """``xxhash`` as :mod:`savegame.format.hashing` uses it, counting the bytes hashed (from any thread)."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.lock = threading.Lock()
        self.hashed = 0

    def _count(self, data: Any) -> None:
        with self.lock:
            self.hashed += memoryview(data).nbytes

    def xxh3_128(self, *args: Any) -> Any:
        inner = self._real.xxh3_128(*args)
        counter = self

        class Counting:
            def update(self, data: Any) -> None:
                counter._count(data)
                inner.update(data)

            def digest(self) -> bytes:
                return bytes(inner.digest())

            def hexdigest(self) -> str:
                return str(inner.hexdigest())

        if args:
            self._count(args[0])
        return Counting()

    def xxh3_128_digest(self, data: Any) -> bytes:
        self._count(data)
        return bytes(self._real.xxh3_128_digest(data))

    def xxh3_128_hexdigest(self, data: Any) -> str:
        self._count(data)
        return str(self._real.xxh3_128_hexdigest(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def test_resume_with_a_mirror_hashes_the_newest_checkpoint_once(tmp_path: Path, monkeypatch: Any) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 1024)  # 4 MiB of weights
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Checkpointer(tmp_path / "local", mirror=tmp_path / "remote") as ckpt:
        ckpt.save({"model": model, "optimizer": optimizer}, epoch=1)
    size = savegame.read_manifest(tmp_path / "local" / "epoch=001").total_bytes
    counter = _CountingXxhash(hashing.xxhash)
    monkeypatch.setattr(hashing, "xxhash", counter)
    fresh = torch.nn.Linear(1024, 1024)
    with Checkpointer(tmp_path / "local", mirror=tmp_path / "remote") as ckpt:
        restored = ckpt.restore({"model": fresh, "optimizer": torch.optim.SGD(fresh.parameters(), lr=0.1)})
    assert restored is not None and restored.epoch == 1
    assert torch.equal(fresh.weight, model.weight)
    assert size <= counter.hashed < 1.5 * size, (counter.hashed, size)  # before: 2 x size (mirror, then load)


def _flip_last_byte(folder: Path) -> None:
    data = next(p for p in folder.iterdir() if p.suffix == ".safetensors")
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))


@pytest.mark.parametrize("remote_damaged", [False, True])
def test_resume_with_a_mirror_still_quarantines_a_damaged_newest(tmp_path: Path, remote_damaged: bool) -> None:
    """A damaged local newest is set aside (never deleted) with a ResumeWarning; its intact mirror copy is
    taken instead, and when that copy is damaged too it is quarantined and the resume falls back."""
    model = torch.nn.Linear(64, 64)
    with Checkpointer(tmp_path / "local", mirror=tmp_path / "remote", keep_last=5) as ckpt:
        ckpt.save({"model": model}, epoch=1)
        ckpt.save({"model": model}, epoch=2)
    newest = tmp_path / "local" / "epoch=002"
    _flip_last_byte(newest)
    if remote_damaged:
        _flip_last_byte(tmp_path / "remote" / "epoch=002")
    fresh = torch.nn.Linear(64, 64)
    with pytest.warns(savegame.ResumeWarning, match="moved aside") as caught, Checkpointer(
        tmp_path / "local", mirror=tmp_path / "remote"
    ) as ckpt:
        restored = ckpt.restore({"model": fresh})
    assert restored is not None and restored.epoch == (1 if remote_damaged else 2)
    assert [p.name for p in (tmp_path / "local").iterdir() if p.name.startswith(".quarantine-epoch=002-")]
    if remote_damaged:
        assert not newest.exists() and "damaged too" in str(caught[0].message)
        assert [p.name for p in (tmp_path / "remote").iterdir() if p.name.startswith(".quarantine-epoch=002-")]
    else:
        savegame.verify(newest)  # the intact copy, downloaded
    assert torch.equal(fresh.weight, model.weight)


@pytest.mark.parametrize(
    ("value", "forge"),
    [
        (np.arange(6, dtype=np.complex128), {"shape": [7]}),  # logical shape larger than the bytes
        (torch.arange(6, dtype=torch.float64).to(torch.complex128), {"shape": [7]}),  # a torch view type
        (np.float64(2.5), {"$": "npscalar", "dtype": "complex64", "shape": [2]}),  # a scalar with a shape
    ],
)
def test_verify_and_load_refuse_a_forged_node_with_the_one_rule(
    tmp_path: Path, value: Any, forge: dict[str, Any]
) -> None:
    """``verify`` (without building arrays) and ``load`` (while building them) ask the same rule
    (``format.tree.check_array_node``): the same refusal, word for word after the key."""
    path = tmp_path / "c"
    savegame.save(path, {"d": {"w": value}})
    body = json.loads((path / "manifest.json").read_bytes())
    body["items"]["d"]["skeleton"]["w"].update(forge)
    (path / "manifest.json").write_bytes(sign_manifest(body))
    with pytest.raises(InvalidManifestError) as by_verify:
        savegame.verify(path)
    with pytest.raises(InvalidManifestError) as by_load:
        savegame.load(path, verify=False)
    assert str(by_verify.value).split(": ", 1)[1] == str(by_load.value).split(": ", 1)[1]
