"""S3 commit order under faults (moto's real server): the commit marker is written only after every part
of every data file is stored and every multipart upload completed.

A failure injected into the last part of the last data file, or into the completion of its multipart
upload, must leave no committed checkpoint visible: a new name is not listed and does not load, an
overwritten name still loads its old version, and the failed version's objects are gone. (A commit that
wrote the manifest first would publish a checkpoint whose data never arrived, or replace the old one
by it.)
"""

from __future__ import annotations

import errno
from typing import Any

import fsspec
import numpy as np
import pytest

import savegame
from savegame.engine.writer import write_items
from savegame.errors import CheckpointError, CheckpointNotFoundError, NotACheckpointError
from savegame.storage import RemoteStorage
from savegame.storage.remote import MIN_PART_SIZE

PARTS = 3
"""The data file below takes this many parts of MIN_PART_SIZE (the last one shorter)."""


def _big(value: float) -> dict[str, Any]:
    n = (MIN_PART_SIZE * (PARTS - 1) + (1 << 20)) // 8  # two full parts and 1 MiB more
    return {"model": {"w": np.full(n, value)}, "small": {"b": np.arange(3.0)}, "tag": value}


class Inject:
    """Wraps ``fs.call_s3`` to fail one request: the given ``method`` (for ``upload_part``, only the part
    numbered ``part``) of the given object ``key_suffix``; records every request made."""

    def __init__(self, call_s3: Any, method: str, *, key_suffix: str, part: int | None = None) -> None:
        self.call_s3 = call_s3
        self.method = method
        self.key_suffix = key_suffix
        self.part = part
        self.fired = False
        self.calls: list[tuple[str, str, Any]] = []

    def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        key = str(kwargs.get("Key", ""))
        self.calls.append((method, key, kwargs.get("PartNumber")))
        if (
            method == self.method and key.endswith(self.key_suffix)
            and (self.part is None or kwargs.get("PartNumber") == self.part)
        ):  # fmt: skip
            self.fired = True
            raise OSError(errno.EIO, f"injected failure of {method}")
        return self.call_s3(method, *args, **kwargs)


def _storage(bucket: str, s3_options: dict[str, Any]) -> RemoteStorage:
    return RemoteStorage(f"{bucket}/run", storage_options=s3_options, part_size=MIN_PART_SIZE, retries=0)


def _objects(bucket: str, s3_options: dict[str, Any]) -> list[str]:
    fs = fsspec.filesystem("s3", **s3_options)
    fs.invalidate_cache()
    root = f"{bucket.removeprefix('s3://')}/run"
    return sorted(p[len(root) + 1 :] for p in fs.find(root))


FAULTS = [
    pytest.param("upload_part", PARTS, id="last-part-upload"),
    pytest.param("complete_multipart_upload", None, id="multipart-completion"),
]


@pytest.mark.parametrize(("method", "part"), FAULTS)
def test_failed_last_part_leaves_no_new_checkpoint(
    bucket: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch, method: str, part: int | None
) -> None:
    storage = _storage(bucket, s3_options)
    savegame.save(f"{bucket}/run/old", {"x": np.ones(3)}, storage_options=s3_options)
    inject = Inject(storage.fs.call_s3, method, key_suffix="/model.safetensors", part=part)
    monkeypatch.setattr(storage.fs, "call_s3", inject)
    with pytest.raises(CheckpointError, match="injected"):
        write_items(storage, "new", savegame.api.encode_state(_big(1.0)), metadata=None, progress=None,
                    overwrite=False)  # fmt: skip
    monkeypatch.undo()
    assert inject.fired
    parts = [n for m, k, n in inject.calls if m == "upload_part" and k.endswith("/model.safetensors")]
    assert max(parts) == PARTS  # the failure hit the last part (or the completion after it)
    fresh = _storage(bucket, s3_options)
    assert fresh.committed() == ["old"]
    assert not fresh.exists("new")
    with pytest.raises((CheckpointNotFoundError, NotACheckpointError)):
        savegame.load(f"{bucket}/run/new", storage_options=s3_options)
    assert [k for k in _objects(bucket, s3_options) if k.startswith("new/")] == []  # the upload was removed
    uploads = fresh.fs.call_s3("list_multipart_uploads", Bucket=bucket.removeprefix("s3://")).get("Uploads", [])
    assert uploads == []  # and its multipart upload aborted


@pytest.mark.parametrize(("method", "part"), FAULTS)
def test_failed_last_part_of_an_overwrite_keeps_the_old_version(
    bucket: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch, method: str, part: int | None
) -> None:
    storage = _storage(bucket, s3_options)
    url = f"{bucket}/run/c"
    savegame.save(url, _big(0.5), storage_options=s3_options)
    before = _objects(bucket, s3_options)
    inject = Inject(storage.fs.call_s3, method, key_suffix="/model.safetensors", part=part)
    monkeypatch.setattr(storage.fs, "call_s3", inject)
    with pytest.raises(CheckpointError, match="injected"):
        write_items(storage, "c", savegame.api.encode_state(_big(2.0)), metadata=None, progress=None,
                    overwrite=True)  # fmt: skip
    monkeypatch.undo()
    assert inject.fired
    savegame.verify(url, storage_options=s3_options)  # the old version, complete and committed
    loaded = savegame.load(url, storage_options=s3_options)
    assert loaded["tag"] == 0.5 and np.all(loaded["model"]["w"] == 0.5)
    assert _objects(bucket, s3_options) == before  # the failed version left nothing behind
