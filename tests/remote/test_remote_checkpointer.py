"""The Checkpointer's flows on an S3 root (moto): retention, best, fallback from a corrupted remote
checkpoint with quarantine, verify on the S3 root; and the local-then-remote mirror: a fresh node with an
empty disk resumes from the mirror.

The endpoint and credentials reach the Checkpointer only through ``storage_options=`` (the environment
is not used), so every read it makes goes through its configured storage.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch

import savegame
from savegame.storage import RemoteStorage

Train = Callable[..., tuple[torch.nn.Module, torch.optim.Optimizer]]


@pytest.fixture
def make(bucket: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    root = f"{bucket}/run"
    return lambda **kw: savegame.Checkpointer(root, storage_options=s3_options, **kw)


def test_checkpointer_mirror_uploads_and_a_fresh_node_resumes_from_it(
    tmp_path: Path, bucket: str, s3_options: dict[str, Any], train: Train
) -> None:
    model, opt = train(steps=2)
    remote_url = f"{bucket}/mirrored"
    with savegame.Checkpointer(tmp_path / "node1", mirror=remote_url, mirror_options=s3_options, keep_last=2) as ckpt:
        for epoch in range(1, 5):
            ckpt.save({"model": model, "optimizer": opt}, epoch=epoch)
        local_names = [r.name for r in ckpt.list()]
    remote = RemoteStorage(remote_url, storage_options=s3_options)
    assert local_names == ["epoch=003", "epoch=004"]
    assert remote.committed() == local_names, "close() waits for the uploads; retention mirrored"
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    fresh, fresh_opt = train(steps=0)
    assert not all(torch.equal(fresh.state_dict()[k], v) for k, v in expected.items())
    with savegame.Checkpointer(tmp_path / "node2", mirror=remote_url, mirror_options=s3_options) as again:
        restored = again.restore({"model": fresh, "optimizer": fresh_opt})
        assert restored is not None and restored.name == "epoch=004" and restored.epoch == 4
        assert [r.name for r in again.list()] == ["epoch=004"]  # downloaded into the empty local directory
    for k, v in expected.items():
        assert torch.equal(fresh.state_dict()[k], v)
    assert fresh_opt.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def test_checkpointer_mirror_needs_a_local_directory(bucket: str, s3_options: dict[str, Any]) -> None:
    with pytest.raises(savegame.ConfigError, match="mirror"):
        savegame.Checkpointer(f"{bucket}/x", storage_options=s3_options, mirror=f"{bucket}/y")


def test_checkpointer_retention_best_and_fallback_on_s3(
    make: Callable[..., Any], bucket: str, s3_options: dict[str, Any], train: Train
) -> None:
    model, opt = train(steps=2)
    ckpt = make(monitor="val_loss", keep_last=2, keep_best=1)
    for epoch, loss in enumerate([0.5, 0.3, 0.4, 0.45], start=1):
        ckpt.save({"model": model, "optimizer": opt}, epoch=epoch, metrics={"val_loss": loss})
    ckpt.close()
    records = ckpt.list()
    epochs = sorted(r.epoch for r in records)
    assert epochs == [2, 3, 4], "keep_last=2 plus the best (epoch 2); epoch 1 deleted remotely"
    assert ckpt.best is not None and ckpt.best.epoch == 2
    storage = RemoteStorage(f"{bucket}/run", storage_options=s3_options)
    assert storage.committed() == sorted(r.name for r in records)
    for name in storage.committed():
        savegame.verify(storage.ref(name))  # verify on the S3 root

    newest = max(records, key=lambda r: r.epoch)
    fs = fsspec.filesystem("s3", **s3_options)
    fs.invalidate_cache()
    key = next(k for k in fs.find(f"{bucket.removeprefix('s3://')}/run/{newest.name}") if "model" in k
               and k.endswith(".safetensors"))  # fmt: skip
    raw = bytearray(fs.cat_file(key))
    raw[-5] ^= 0x04
    fs.pipe_file(key, bytes(raw))

    fresh_model, fresh_opt = train(steps=0, seed=3)
    restarted = make(monitor="val_loss", keep_last=2, keep_best=1)
    with pytest.warns(savegame.ResumeWarning):
        restored = restarted.restore({"model": fresh_model, "optimizer": fresh_opt})
    restarted.close()
    assert restored is not None and restored.epoch == 3
    assert newest.name not in storage.committed()
    assert storage.quarantined()[0].startswith(f".quarantine-{newest.name}-")
