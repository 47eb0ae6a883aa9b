"""Checkpoints on S3 (moto's real server over HTTP, through s3fs): round-trip, commit protocol, damage,
cleanup, quarantine, retries, and credentials that never leak."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import fsspec
import numpy as np
import pytest
import torch

import savegame
from savegame.engine.writer import encode_state, write_items
from savegame.errors import (
    CheckpointNotFoundError,
    CommitError,
    ConfigError,
    CorruptCheckpointError,
    HashMismatchError,
    MissingFileError,
    NotACheckpointError,
    StorageError,
)
from savegame.storage import RemoteStorage, locate, storage_for
from savegame.storage.remote import _LIVE_OWNERS, STAGING_MARKER, is_transient

Train = Callable[..., tuple[torch.nn.Module, torch.optim.Optimizer]]
SECRET = "sg-secret-5f1c9e0d7a2b4c68"


def _fs(options: dict[str, Any]) -> Any:
    fs = fsspec.filesystem("s3", **options)
    fs.invalidate_cache()
    return fs


def _keys(fs: Any, url: str) -> list[str]:
    fs.invalidate_cache()
    root = url.removeprefix("s3://")
    return sorted(p[len(root) + 1 :] for p in fs.find(root))


def _assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            _assert_same_state(a[k], b[k])
        elif isinstance(a[k], list):
            assert len(a[k]) == len(b[k])
            for x, y in zip(a[k], b[k]):
                _assert_same_state({"_": x}, {"_": y})
        else:
            assert a[k] == b[k], k


def test_round_trip_of_a_trained_model_and_optimizer(bucket: str, s3_options: dict[str, Any], train: Train) -> None:
    model, opt = train(steps=3, seed=0)
    url = f"{bucket}/run/step-3"
    savegame.save(url, {"model": model, "optimizer": opt, "epoch": 3}, metadata={"lr": 0.01},
                  storage_options=s3_options)  # fmt: skip

    fresh_model, fresh_opt = train(steps=1, seed=1)
    report = savegame.load(url, {"model": fresh_model, "optimizer": fresh_opt}, storage_options=s3_options)
    assert report.state == {"epoch": 3}
    _assert_same_state(model.state_dict(), fresh_model.state_dict())
    _assert_same_state(opt.state_dict(), fresh_opt.state_dict())

    saved_weight = model.state_dict()["0.weight"].clone()
    # one more identical step on both: bit-identical parameters
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(7))
    for m, o in ((model, opt), (fresh_model, fresh_opt)):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
    _assert_same_state(model.state_dict(), fresh_model.state_dict())

    manifest = savegame.verify(url, storage_options=s3_options)
    assert manifest.metadata == {"lr": 0.01}
    assert savegame.read_manifest(url, storage_options=s3_options).files == manifest.files
    plain = savegame.load(url, storage_options=s3_options)
    assert plain["epoch"] == 3 and torch.equal(plain["model"]["0.weight"], saved_weight)


def test_layout_listing_and_self_contained_version(bucket: str, s3_options: dict[str, Any], tmp_path: Any) -> None:
    storage = RemoteStorage(f"{bucket}/run", storage_options=s3_options)
    assert storage.committed() == []
    savegame.save(f"{bucket}/run/a", {"x": {"w": np.arange(10.0)}, "n": 1}, storage_options=s3_options)
    savegame.save(f"{bucket}/run/b", {"x": {"w": np.ones(3)}}, storage_options=s3_options)
    assert storage.committed() == ["a", "b"]
    keys = _keys(_fs(s3_options), f"{bucket}/run")
    a_keys = [k for k in keys if k.startswith("a/")]
    assert a_keys[0] == "a/manifest.json" and len(a_keys) == 3
    version = a_keys[1].split("/")[1]
    assert sorted(a_keys[1:]) == [f"a/{version}/manifest.json", f"a/{version}/x.safetensors"]
    assert not any(STAGING_MARKER in k for k in keys)
    # the version folder is a complete checkpoint directory: copy it and load it locally
    _fs(s3_options).get(f"{bucket.removeprefix('s3://')}/run/a/{version}/", str(tmp_path / "copy"), recursive=True)
    assert savegame.load(tmp_path / "copy")["n"] == 1
    assert storage.url("a") == f"{bucket}/run/a" and storage.exists("a") and not storage.exists("zz")


def test_corrupted_remote_object_is_detected_by_verify_and_load(bucket: str, s3_options: dict[str, Any]) -> None:
    url = f"{bucket}/run/c"
    savegame.save(url, {"model": {"w": torch.arange(1000.0)}}, storage_options=s3_options)
    fs = _fs(s3_options)
    data_key = next(k for k in fs.find(url.removeprefix("s3://")) if k.endswith(".safetensors"))
    raw = bytearray(fs.cat_file(data_key))
    raw[len(raw) - 100] ^= 0x01
    fs.pipe_file(data_key, bytes(raw))
    with pytest.raises(HashMismatchError, match="content hash differs"):
        savegame.verify(url, storage_options=s3_options)
    with pytest.raises(HashMismatchError):
        savegame.load(url, storage_options=s3_options)
    fs.pipe_file(data_key, bytes(raw[:-8]))  # truncated
    with pytest.raises(CorruptCheckpointError, match="bytes, the manifest says"):
        savegame.verify(url, storage_options=s3_options)
    fs.rm_file(data_key)
    with pytest.raises(MissingFileError):
        savegame.load(url, storage_options=s3_options)
    top = f"{url.removeprefix('s3://')}/manifest.json"
    fs.pipe_file(top, fs.cat_file(top).replace(b'"hash_algorithm": "xxh3_128"', b'"hash_algorithm": "xxh3_129"'))
    with pytest.raises(CorruptCheckpointError):
        savegame.read_manifest(url, storage_options=s3_options)


def test_missing_and_uncommitted_paths(bucket: str, s3_options: dict[str, Any]) -> None:
    with pytest.raises(CheckpointNotFoundError):
        savegame.load(f"{bucket}/run/nothing", storage_options=s3_options)
    fs = _fs(s3_options)
    fs.pipe_file(f"{bucket.removeprefix('s3://')}/run/half/v20260101T000000000000-00000000/x.safetensors", b"x")
    with pytest.raises(NotACheckpointError, match="interrupted upload"):
        savegame.verify(f"{bucket}/run/half", storage_options=s3_options)
    with pytest.raises(ConfigError):
        savegame.load("/tmp/some/local/path", storage_options=s3_options)


def test_overwrite_keeps_the_old_version_until_the_new_manifest_is_written(
    bucket: str, s3_options: dict[str, Any]
) -> None:
    storage = RemoteStorage(f"{bucket}/run", storage_options=s3_options)
    url = f"{bucket}/run/c"
    savegame.save(url, {"x": {"w": np.zeros(4)}, "v": "old"}, storage_options=s3_options)
    txn = storage.begin("c", overwrite=True)
    items = encode_state({"x": {"w": np.ones(4)}, "v": "new"})
    sink = txn.open("x.safetensors")
    from savegame.format.tensorfile import order_for_alignment, write_tensor_file

    written = write_tensor_file(sink, order_for_alignment([r.data for r in items[0].records]))
    # mid-upload: readers still get the complete old checkpoint
    assert savegame.load(url, storage_options=s3_options)["v"] == "old"
    txn.abort()
    assert savegame.load(url, storage_options=s3_options)["v"] == "old"
    assert written.bytes > 0
    # a full overwrite replaces it atomically and removes the old version's objects
    savegame.save(url, {"x": {"w": np.ones(4)}, "v": "new"}, storage_options=s3_options)
    assert savegame.load(url, storage_options=s3_options)["v"] == "new"
    versions = {k.split("/")[1] for k in _keys(_fs(s3_options), f"{bucket}/run") if k.count("/") == 2}
    assert len(versions) == 1
    with pytest.raises(CommitError) as info:
        savegame.save(url, {"v": 1}, overwrite=False, storage_options=s3_options)
    assert info.value.errno == 17


def test_two_writers_racing_for_one_name_exactly_one_wins(bucket: str, s3_options: dict[str, Any]) -> None:
    storage = RemoteStorage(f"{bucket}/run", storage_options=s3_options)
    a = storage.begin("c", overwrite=False)
    b = storage.begin("c", overwrite=False)  # both pass the early check; the commit decides
    items_a, items_b = encode_state({"who": "a"}), encode_state({"who": "b"})
    from savegame.format.manifest import ItemEntry, dump_manifest, utc_now

    def manifest(items: Any) -> bytes:
        entries = {i.name: ItemEntry(kind=i.kind, file=None, skeleton=i.skeleton) for i in items}
        return dump_manifest(created=utc_now(), versions={}, metadata={}, progress=None, files={}, items=entries)

    a.commit(manifest(items_a))
    with pytest.raises(CommitError) as info:
        b.commit(manifest(items_b))
    assert info.value.errno == 17
    assert savegame.load(f"{bucket}/run/c", storage_options=s3_options)["who"] == "a"
    versions = {k.split("/")[1] for k in _keys(_fs(s3_options), f"{bucket}/run") if k.count("/") == 2}
    assert versions == {a.version}, "the loser's upload is removed"


def test_uncommitted_upload_is_invisible_and_cleaned(bucket: str, s3_options: dict[str, Any]) -> None:
    storage = RemoteStorage(f"{bucket}/run", storage_options=s3_options)
    savegame.save(f"{bucket}/run/old", {"x": {"w": np.ones(3)}}, storage_options=s3_options)
    txn = storage.begin("new")
    sink = txn.open("x.safetensors")
    sink.write(b"\0" * (9 << 20))  # one full part uploaded, multipart upload open
    sink.seal()
    for future in sink._futures:  # type: ignore[attr-defined]
        future.result()
    assert storage.committed() == ["old"]
    assert storage.cleanup() == [], "a live writer of this process is never cleaned"
    # the writer "dies" without aborting: no longer live in this process, its marker names this pid
    _LIVE_OWNERS.discard(txn.owner)
    removed = storage.cleanup()
    assert removed == [f"new/{txn.version}"]
    assert [k for k in _keys(_fs(s3_options), f"{bucket}/run") if k.startswith("new/")] == []
    assert storage.committed() == ["old"]
    bucket_name = bucket.removeprefix("s3://")
    uploads = _fs(s3_options).call_s3("list_multipart_uploads", Bucket=bucket_name).get("Uploads", [])
    assert uploads == [], "the unfinished multipart upload was aborted"


def _marker(owner: str, *, host: str, pid: int, heartbeat: float) -> bytes:
    return json.dumps({"format": "savegame-staging", "owner": owner, "host": host, "pid": pid,
                       "started": heartbeat, "heartbeat": heartbeat}).encode()  # fmt: skip


def test_cleanup_respects_other_hosts_until_the_grace_period(bucket: str, s3_options: dict[str, Any]) -> None:
    storage = RemoteStorage(f"{bucket}/run", storage_options=s3_options, grace_seconds=600)
    fs = _fs(s3_options)
    root = f"{bucket.removeprefix('s3://')}/run"
    fresh, stale = "v20260101T000000000000-0000000a", "v20260101T000000000000-0000000b"
    fs.pipe_file(f"{root}/c/{fresh}/{STAGING_MARKER}", _marker("f", host="elsewhere", pid=1, heartbeat=time.time()))
    fs.pipe_file(f"{root}/c/{fresh}/x.safetensors", b"data")
    old_beat = time.time() - 3600
    fs.pipe_file(f"{root}/d/{stale}/{STAGING_MARKER}", _marker("s", host="elsewhere", pid=1, heartbeat=old_beat))
    fs.pipe_file(f"{root}/d/{stale}/x.safetensors", b"data")
    assert storage.cleanup() == [f"d/{stale}"]
    assert storage.committed() == []
    assert any(k.startswith(f"c/{fresh}/") for k in _keys(fs, f"{bucket}/run"))
    # without a marker (a crash mid-delete): removed once older than the grace period
    fs.rm_file(f"{root}/c/{fresh}/{STAGING_MARKER}")
    assert RemoteStorage(f"{bucket}/run", storage_options=s3_options, grace_seconds=600).cleanup() == []
    assert RemoteStorage(f"{bucket}/run", storage_options=s3_options, grace_seconds=0).cleanup() == [f"c/{fresh}"]


def test_delete_and_quarantine(bucket: str, s3_options: dict[str, Any]) -> None:
    storage = RemoteStorage(f"{bucket}/run", storage_options=s3_options, grace_seconds=0)
    for name in ("a", "b", "c"):
        savegame.save(f"{bucket}/run/{name}", {"x": {"w": np.ones(3)}, "name": name}, storage_options=s3_options)
    storage.delete("a")
    assert storage.committed() == ["b", "c"]
    assert not any(k.startswith("a/") for k in _keys(_fs(s3_options), f"{bucket}/run"))
    with pytest.raises(StorageError):
        storage.delete("a")
    # a delete interrupted after its first step (the manifest) leaves an unlisted folder cleanup removes
    fs = _fs(s3_options)
    fs.rm_file(f"{bucket.removeprefix('s3://')}/run/b/manifest.json")
    assert storage.committed() == ["c"]
    assert [r.split("/")[0] for r in storage.cleanup()] == ["b"]
    moved = storage.quarantine("c")
    assert moved.startswith(".quarantine-c-")
    assert storage.committed() == [] and storage.quarantined() == [moved]
    with pytest.raises(CheckpointNotFoundError):
        savegame.load(f"{bucket}/run/c", storage_options=s3_options)
    assert storage.cleanup() == [], "quarantined folders are kept"


def test_memory_filesystem_root() -> None:
    url = f"memory://sg-test-{os.getpid()}/run"
    savegame.save(f"{url}/a", {"x": {"w": torch.arange(5.0)}, "n": 7})
    assert savegame.load(f"{url}/a")["n"] == 7
    savegame.verify(f"{url}/a")
    storage = storage_for(url)
    assert storage.committed() == ["a"]
    with pytest.raises(CommitError):
        savegame.save(f"{url}/a", {"n": 8}, overwrite=False)
    savegame.save(f"{url}/a", {"n": 8})
    assert savegame.load(f"{url}/a")["n"] == 8
    s, name = locate(f"{url}/a")
    assert name == "a" and isinstance(s, RemoteStorage)
    storage.delete("a")
    assert storage.committed() == []


# ---------------------------------------------------------------------------------------------------
# Retries and errors


class _Flaky:
    def __init__(self, errors: list[BaseException]) -> None:
        self.errors = errors
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def _client_error(status: int, code: str) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")  # fmt: skip


def test_retries_transient_errors_with_backoff_but_never_4xx() -> None:
    from botocore.exceptions import EndpointConnectionError

    storage = RemoteStorage("memory://sg-retry/run", backoff=0.01, retries=3)
    assert is_transient(_client_error(503, "SlowDown")) and is_transient(_client_error(500, "InternalError"))
    assert not is_transient(_client_error(403, "AccessDenied")) and not is_transient(_client_error(404, "NoSuchKey"))
    assert is_transient(ConnectionResetError()) and is_transient(EndpointConnectionError(endpoint_url="http://x"))
    wrapped = OSError(5, "wrapped")
    wrapped.__cause__ = _client_error(502, "BadGateway")
    assert is_transient(wrapped)
    flaky = _Flaky([_client_error(503, "SlowDown"), ConnectionResetError("reset")])
    assert storage._call("op", flaky) == "ok" and flaky.calls == 3
    forbidden = _Flaky([_client_error(403, "AccessDenied")])
    with pytest.raises(StorageError, match="op: ClientError"):
        storage._call("op", forbidden)
    assert forbidden.calls == 1
    always = _Flaky([_client_error(500, "InternalError")] * 10)
    with pytest.raises(StorageError):
        storage._call("op", always)
    assert always.calls == 4


def test_save_survives_the_server_going_away_briefly(bucket: str, s3_options: dict[str, Any], moto: Any) -> None:
    url = f"{bucket}/run/c"
    storage = RemoteStorage(f"{bucket}/run", storage_options=s3_options, backoff=0.3, retries=6)
    moto.stop()
    restarter = threading.Timer(1.0, moto.start)
    restarter.start()
    try:
        write_items(storage, "c", encode_state({"x": {"w": np.arange(100.0)}}), metadata=None, progress=None,
                    overwrite=False)  # fmt: skip
    finally:
        restarter.join()
    assert savegame.load(url, storage_options=s3_options)["x"]["w"][99] == 99.0


def test_credentials_never_appear_in_errors_logs_or_manifests(
    bucket: str, s3_options: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    assert s3_options["secret"] == SECRET
    caplog.set_level(logging.DEBUG, logger="savegame")
    failures: list[BaseException] = []
    for action in (
        lambda: savegame.load("s3://sg-no-such-bucket/run/c", storage_options=s3_options),
        lambda: savegame.save("s3://sg-no-such-bucket/run/c", {"x": 1}, storage_options=s3_options),
        lambda: RemoteStorage(f"{bucket}/run", storage_options={**s3_options, "endpoint_url": _dead_endpoint()},
                              retries=1, backoff=0.01).committed(),
    ):  # fmt: skip
        with pytest.raises(Exception) as info:  # whatever fails, it must not leak
            action()
        failures.append(info.value)
    assert isinstance(failures[0], (CheckpointNotFoundError, StorageError))
    for exc in failures:
        text = "".join(traceback.format_exception(exc))
        assert SECRET not in text and SECRET not in repr(exc.args)
    assert "StorageError" in "".join(traceback.format_exception(failures[2]))
    assert SECRET not in caplog.text
    savegame.save(f"{bucket}/run/ok", {"x": {"w": np.ones(2)}}, metadata={"note": "n"}, storage_options=s3_options)
    fs = _fs(s3_options)
    for key in fs.find(bucket.removeprefix("s3://")):
        assert SECRET.encode() not in fs.cat_file(key)
    assert SECRET not in repr(RemoteStorage(f"{bucket}/run", storage_options=s3_options))
    # a URL with user info is shown without it
    storage = RemoteStorage("memory://user:pw-9a8b7c6d@sg-host/run")
    assert "pw-9a8b7c6d" not in storage.url("c")


def _dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_progress_bar_only_on_a_terminal(bucket: str, s3_options: dict[str, Any], monkeypatch: Any) -> None:
    from savegame._util import progress

    stream = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", stream)
    savegame.save(f"{bucket}/run/p", {"x": {"w": np.ones(1 << 20)}}, storage_options=s3_options)
    savegame.load(f"{bucket}/run/p", storage_options=s3_options)
    assert stream.getvalue() == ""


def test_multi_chunk_files_round_trip_and_are_checked_per_chunk(
    bucket: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files longer than the manifest's hash_chunk_bytes are hashed chunk by chunk (in parallel) on the
    downloaded buffer; a flipped byte in the middle chunk is still found before anything is restored."""
    from savegame.format import hashing

    monkeypatch.setattr(hashing, "HASH_CHUNK_BYTES", hashing.MIN_CHUNK_BYTES)
    url = f"{bucket}/run/big"
    weights = torch.randn(3 * hashing.MIN_CHUNK_BYTES // 4 + 100)  # just over three chunks
    savegame.save(url, {"model": {"w": weights}}, storage_options=s3_options)
    assert savegame.verify(url, storage_options=s3_options).hash_chunk_bytes == hashing.MIN_CHUNK_BYTES
    assert torch.equal(savegame.load(url, storage_options=s3_options)["model"]["w"], weights)
    fs = _fs(s3_options)
    data_key = next(k for k in fs.find(url.removeprefix("s3://")) if k.endswith(".safetensors"))
    raw = bytearray(fs.cat_file(data_key))
    raw[hashing.MIN_CHUNK_BYTES + 17] ^= 0x01
    fs.pipe_file(data_key, bytes(raw))
    target = {"w": torch.zeros_like(weights)}
    with pytest.raises(HashMismatchError, match="content hash differs"):
        savegame.load(url, {"model": target}, storage_options=s3_options)
    assert not target["w"].any()
    with pytest.raises(HashMismatchError):
        savegame.verify(url, storage_options=s3_options)
