"""The local-then-remote mirror against the real (moto) S3 server: background upload, restore on a fresh
node from the mirror with identical state, retention that never deletes before the successor is
committed remotely, and fallback from a damaged remote checkpoint."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import torch

import savegame
from savegame.engine.mirror import Mirror, restore_newest
from savegame.storage import RemoteStorage

Train = Callable[..., tuple[torch.nn.Module, torch.optim.Optimizer]]


def _save(root: Path, name: str, value: float) -> None:
    savegame.save(root / name, {"x": {"w": np.full(8, value)}, "value": value})
    time.sleep(0.002)  # distinct creation times


def test_mirror_upload_then_resume_on_a_fresh_node(
    tmp_path: Path, bucket: str, s3_options: dict[str, Any], train: Train
) -> None:
    local = tmp_path / "run"
    remote = f"{bucket}/run"
    model, opt = train(steps=3, seed=0)
    rng = savegame.RNGState()
    savegame.save(local / "step-3", {"model": model, "optimizer": opt, "rng": rng, "step": 3})
    mirror = Mirror(local, remote, storage_options=s3_options).start()
    mirror.notify()
    assert mirror.wait(timeout=60)
    mirror.close()
    assert RemoteStorage(remote, storage_options=s3_options).committed() == ["step-3"]

    # the uninterrupted run continues...
    torch.manual_seed(123)
    x = torch.randn(5, 4)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    # ...while the node dies with its disk; a fresh node restores from the mirror
    shutil.rmtree(local)
    path = restore_newest(local, remote, storage_options=s3_options)
    assert path == str(local / "step-3") and (local / "step-3" / "manifest.json").is_file()
    fresh_model, fresh_opt = train(steps=0, seed=5)
    report = savegame.load(path, {"model": fresh_model, "optimizer": fresh_opt})
    assert report.state["step"] == 3
    torch.manual_seed(123)
    x = torch.randn(5, 4)
    fresh_opt.zero_grad()
    fresh_model(x).pow(2).mean().backward()
    fresh_opt.step()
    for k, v in fresh_model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    savegame.verify(path)


def test_retention_follows_local_deletes_but_never_before_the_successor_is_remote(
    tmp_path: Path, bucket: str, s3_options: dict[str, Any]
) -> None:
    local = tmp_path / "run"
    remote = RemoteStorage(f"{bucket}/run", storage_options=s3_options)
    mirror = Mirror(local, remote.url_text, remote=remote)
    _save(local, "c1", 1.0)
    assert mirror.sync().uploaded == ["c1"]

    # c2 is committed locally and c1 deleted there (keep_last=1), but c2 cannot be uploaded (damaged):
    _save(local, "c2", 2.0)
    shutil.rmtree(local / "c1")
    data = next((local / "c2").glob("*.safetensors"))
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    report = mirror.sync()
    assert report.uploaded == [] and "c2" in report.failed
    assert remote.committed() == ["c1"], "c1 stays: its successor is not committed remotely"

    # once a successor is up, c1 goes
    _save(local, "c3", 3.0)
    report = mirror.sync()
    assert report.uploaded == ["c3"] and report.deleted_remote == ["c1"]
    assert remote.committed() == ["c3"]
    # a fresh node (empty local dir) never deletes what it did not see locally
    assert Mirror(tmp_path / "empty", remote.url_text, remote=remote).sync().deleted_remote == []
    assert remote.committed() == ["c3"]


def test_uploads_newest_first_and_prune_remote(tmp_path: Path, bucket: str, s3_options: dict[str, Any]) -> None:
    local = tmp_path / "run"
    for i in range(4):
        _save(local, f"c{i}", float(i))
    mirror = Mirror(local, f"{bucket}/run", storage_options=s3_options)
    assert mirror.pending() == ["c3", "c2", "c1", "c0"]
    assert mirror.sync().uploaded == ["c3", "c2", "c1", "c0"]
    assert mirror.pending() == [] and mirror.sync().uploaded == []
    assert mirror.prune_remote(keep={"c1"}) == ["c0", "c2"]  # c3 is the newest: never pruned
    assert mirror.remote.committed() == ["c1", "c3"]


def test_restore_newest_picks_the_newest_valid_of_either_side(
    tmp_path: Path, bucket: str, s3_options: dict[str, Any]
) -> None:
    local = tmp_path / "run"
    remote_url = f"{bucket}/run"
    _save(local, "c1", 1.0)
    _save(local, "c2", 2.0)
    mirror = Mirror(local, remote_url, storage_options=s3_options)
    mirror.sync()
    _save(local, "c3", 3.0)  # newest, local only (not uploaded yet)
    assert restore_newest(local, remote_url, storage_options=s3_options) == str(local / "c3")

    # a fresh node: the remote's newest (c2) is damaged -> quarantined, c1 is restored instead
    fs = fsspec.filesystem("s3", **s3_options)
    fs.invalidate_cache()
    key = next(k for k in fs.find(f"{bucket.removeprefix('s3://')}/run/c2") if k.endswith(".safetensors"))
    raw = bytearray(fs.cat_file(key))
    raw[-3] ^= 0x10
    fs.pipe_file(key, bytes(raw))
    fresh = tmp_path / "fresh"
    path = restore_newest(fresh, remote_url, storage_options=s3_options)
    assert path == str(fresh / "c1")
    assert savegame.load(path)["value"] == 1.0
    remote = RemoteStorage(remote_url, storage_options=s3_options)
    assert remote.committed() == ["c1"] and remote.quarantined()[0].startswith(".quarantine-c2-")
    assert restore_newest(tmp_path / "nothing", f"{bucket}/other", storage_options=s3_options) is None


def test_a_damaged_local_newest_is_taken_from_its_intact_remote_copy(
    tmp_path: Path, bucket: str, s3_options: dict[str, Any]
) -> None:
    """The local copy of the newest checkpoint damaged, its uploaded copy intact: the remote copy was
    dropped as the same checkpoint, so the resume fell back to an older one. Now the damaged local copy is
    set aside (never deleted) and the remote one downloaded."""
    local = tmp_path / "run"
    remote_url = f"{bucket}/run"
    _save(local, "c1", 1.0)
    _save(local, "c2", 2.0)
    Mirror(local, remote_url, storage_options=s3_options).sync()
    data = local / "c2" / "x.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-3] ^= 0x10
    data.write_bytes(bytes(raw))
    with pytest.warns(savegame.ResumeWarning, match=r"c2 is damaged .* moved aside .* intact copy .* taken instead"):
        path = restore_newest(local, remote_url, storage_options=s3_options)
    assert path == str(local / "c2") and savegame.load(path)["value"] == 2.0
    assert [p.name for p in local.iterdir() if p.name.startswith(".quarantine-c2-")]


def test_mirror_checks_multi_chunk_files_both_ways(
    tmp_path: Path, bucket: str, s3_options: dict[str, Any], monkeypatch: Any
) -> None:
    """Upload and restore stream each file through the manifest's chunked hash (files over hash_chunk_bytes)."""
    from savegame.errors import HashMismatchError
    from savegame.format import hashing

    monkeypatch.setattr(hashing, "HASH_CHUNK_BYTES", hashing.MIN_CHUNK_BYTES)
    local = tmp_path / "run"
    weights = torch.randn(5 * hashing.MIN_CHUNK_BYTES // 4)
    savegame.save(local / "big", {"model": {"w": weights}})
    mirror = Mirror(local, f"{bucket}/run", storage_options=s3_options)
    mirror.upload("big")
    shutil.rmtree(local)
    path = restore_newest(local, f"{bucket}/run", storage_options=s3_options)
    assert torch.equal(savegame.load(path)["model"]["w"], weights)

    data = Path(path) / "model.safetensors"
    raw = bytearray(data.read_bytes())
    raw[3 * hashing.MIN_CHUNK_BYTES + 5] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(HashMismatchError):
        Mirror(local, f"{bucket}/run2", storage_options=s3_options).upload("big")  # a damaged file is not uploaded


def test_the_mirror_never_shows_credentials_of_its_url(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``Mirror(..., "memory://user:pw@b/run?sig=...")`` printed the user info and the query string in its
    repr, in every log line and in its errors (the storage and the CLI strip them)."""
    import logging

    url = "memory://user:hunter2@b/run_secret?sig=TOPSECRET"
    _save(tmp_path / "run", "c1", 1.0)
    mirror = Mirror(tmp_path / "run", url)
    mirror.sync()
    with caplog.at_level(logging.INFO, logger="savegame"):
        damaged = tmp_path / "run" / "c1" / "x.safetensors"
        damaged.write_bytes(damaged.read_bytes()[:-1] + b"\x00")
        with pytest.warns(savegame.ResumeWarning, match="moved aside") as warned:
            mirror.restore_newest()
    shown = repr(mirror) + mirror.remote_url + " ".join(r.getMessage() for r in caplog.records)
    shown += " ".join(str(w.message) for w in warned)
    assert "memory://b/run_secret" in repr(mirror)
    assert "hunter2" not in shown and "TOPSECRET" not in shown
