"""Interrupted uploads against the real (moto) S3 server: the writer SIGKILLed part-way, and the server
taken away part-way. Nothing partial is ever listed, the previous checkpoint still loads, and the next
writer's cleanup removes the orphans (objects and unfinished multipart uploads)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest

import savegame
from savegame.errors import NotACheckpointError, StorageError
from savegame.storage import RemoteStorage
from savegame.storage import remote as remote_mod

HERE = Path(__file__).parent


def _uploads(s3_options: dict[str, Any], bucket: str) -> list[Any]:
    fs = fsspec.filesystem("s3", **s3_options)
    return list(fs.call_s3("list_multipart_uploads", Bucket=bucket.removeprefix("s3://")).get("Uploads", []))


def _objects(s3_options: dict[str, Any], prefix: str) -> list[str]:
    fs = fsspec.filesystem("s3", **s3_options)
    fs.invalidate_cache()
    return sorted(fs.find(prefix.removeprefix("s3://")))


@pytest.mark.subprocess
def test_writer_sigkilled_mid_upload(bucket: str, s3_options: dict[str, Any]) -> None:
    root = f"{bucket}/run"
    savegame.save(f"{root}/c1", {"model": {"w": np.arange(1000.0)}, "epoch": 1}, storage_options=s3_options)
    writer = subprocess.Popen(
        [sys.executable, str(HERE / "_writer.py"), f"{root}/c2", json.dumps(s3_options), "64"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert writer.stdout is not None
        for line in writer.stdout:
            if line.startswith("PART 2"):
                writer.send_signal(signal.SIGKILL)
                break
            assert not line.startswith("DONE"), "the writer finished before it could be killed"
    finally:
        writer.kill()
        writer.wait(timeout=60)
    assert writer.returncode == -signal.SIGKILL

    storage = RemoteStorage(root, storage_options=s3_options)
    assert storage.committed() == ["c1"], "nothing partial is listed"
    assert savegame.load(f"{root}/c1", storage_options=s3_options)["epoch"] == 1
    with pytest.raises(NotACheckpointError):
        savegame.load(f"{root}/c2", storage_options=s3_options)
    leftovers = _objects(s3_options, f"{root}/c2")
    assert any(p.endswith("/.staging") for p in leftovers) and _uploads(s3_options, bucket)

    # the next writer (same host, the dead pid in the marker) cleans up, then saves
    removed = storage.cleanup()
    assert len(removed) == 1 and removed[0].startswith("c2/v")
    assert _objects(s3_options, f"{root}/c2") == []
    assert _uploads(s3_options, bucket) == [], "the unfinished multipart upload is aborted"
    savegame.save(f"{root}/c2", {"model": {"w": np.ones(10)}, "epoch": 2}, storage_options=s3_options)
    assert storage.committed() == ["c1", "c2"]
    assert storage.cleanup() == []


def test_server_stopped_mid_upload(bucket: str, s3_options: dict[str, Any], moto: Any, monkeypatch: Any) -> None:
    root = f"{bucket}/run"
    savegame.save(f"{root}/c1", {"model": {"w": np.arange(1000.0)}, "epoch": 1}, storage_options=s3_options)
    original = remote_mod._MultipartSink._put_part
    first_part = threading.Event()

    def put_part(self: Any, number: int, body: Any, recycle: bool) -> None:
        original(self, number, body, recycle)
        if number == 1:
            first_part.set()
            moto.stop()  # the server goes away with the upload half done

    monkeypatch.setattr(remote_mod._MultipartSink, "_put_part", put_part)
    storage = RemoteStorage(root, storage_options=s3_options, retries=2, backoff=0.05)
    from savegame.engine.writer import encode_state, write_items

    state = {"model": {"w": np.random.default_rng(1).random((24 << 20) // 8)}, "epoch": 2}
    try:
        with pytest.raises(StorageError):
            write_items(storage, "c2", encode_state(state), metadata=None, progress=None, overwrite=False)
        assert first_part.is_set()
    finally:
        moto.start()
    monkeypatch.undo()

    assert storage.committed() == ["c1"]
    assert savegame.load(f"{root}/c1", storage_options=s3_options)["epoch"] == 1
    # the aborted transaction could not clean up (server down): its leftovers are removed next time
    storage.cleanup()
    assert _objects(s3_options, f"{root}/c2") == []
    assert _uploads(s3_options, bucket) == []
    savegame.save(f"{root}/c2", state, storage_options=s3_options)
    assert np.array_equal(savegame.load(f"{root}/c2", storage_options=s3_options)["model"]["w"], state["model"]["w"])
