"""Distributed checkpoints on an object-store root.

In process (``memory://``): ``RemoteStorage.join`` validates its token and a participant writes into the
owner's version folder, never commits, and its abort removes only its own files. Under torchrun (two
ranks) against moto's S3 server over HTTP: the Checkpointer under DDP saves to ``s3://``, retains on
rank 0 and resumes bit-identically; an FSDP2 state is saved sharded by both ranks and restored; the
bucket then holds only committed checkpoints. The children get the endpoint and credentials as
``storage_options`` only (no AWS variables in their environment).
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _common import diff
from _launch import torchrun

import savegame
from savegame import distributed as sgd
from savegame.errors import CommitError, InvalidNameError, StorageError
from savegame.storage.remote import STAGING_MARKER, RemoteStorage

pytest.importorskip("fsspec")


def _memory_root() -> str:
    return f"memory://sg-join-{uuid.uuid4().hex[:10]}/run"


def test_join_accepts_only_version_folder_tokens_of_a_running_upload() -> None:
    storage = RemoteStorage(_memory_root())
    owner = storage.begin("ckpt")
    for bad in ("", "../elsewhere", ".staging-host-1-abc", "v1", owner.token + "/x", "x/" + owner.token,
                owner.token.upper(), owner.token + "\0", f"../{owner.token}"):  # fmt: skip
        with pytest.raises(InvalidNameError):
            storage.join("ckpt", bad)
    with pytest.raises(InvalidNameError):
        storage.join("../ckpt", owner.token)
    with pytest.raises(StorageError) as missing:  # well formed, but nobody is uploading there
        storage.join("ckpt", "v20240101T000000000000-0123abcd", timeout=0.05)
    assert missing.value.errno == errno.ENOENT
    with pytest.raises(StorageError):  # the marker names another checkpoint
        storage.join("other", owner.token, timeout=0.05)
    owner.abort()
    with pytest.raises(StorageError):  # the owner gave up: its marker is gone
        storage.join("ckpt", owner.token, timeout=0.05)


def test_participant_uploads_into_the_owners_version_never_commits_and_aborts_only_its_files() -> None:
    storage = RemoteStorage(_memory_root())
    owner = storage.begin("ckpt")
    sink = owner.open("model.safetensors")
    sink.write(b"owner")
    sink.close()
    joined = storage.join("ckpt", owner.token)
    sink = joined.open("rng.rank1.safetensors")
    sink.write(b"rank1")
    sink.close()
    folder = storage._key("ckpt", owner.token)
    listing = storage._list(storage._key("ckpt"))
    assert set(listing) == {f"{folder}/model.safetensors", f"{folder}/rng.rank1.safetensors", f"{folder}/.staging"}
    marker = json.loads(storage._cat(f"{folder}/{STAGING_MARKER}"))
    joined._beat(force=True)  # a participant only refreshes the owner's heartbeat
    refreshed = json.loads(storage._cat(f"{folder}/{STAGING_MARKER}"))
    same = {k: v for k, v in marker.items() if k != "heartbeat"}
    assert {k: v for k, v in refreshed.items() if k != "heartbeat"} == same
    assert refreshed["heartbeat"] >= marker["heartbeat"]
    with pytest.raises(CommitError) as refused:
        joined.commit(b"{}")
    assert refused.value.errno == errno.EPERM
    with pytest.raises(InvalidNameError):
        joined.open("manifest.json")
    assert storage.cleanup() == []  # the owner's marker protects the folder
    joined.abort()
    assert set(storage._list(storage._key("ckpt"))) == {f"{folder}/model.safetensors", f"{folder}/.staging"}
    assert storage.committed() == []
    owner.abort()
    assert storage._list(storage._key("ckpt")) == {}


def test_single_process_save_and_restore_by_url_and_by_ref(tmp_path: Path) -> None:
    import torch

    root = _memory_root()
    model = torch.nn.Linear(3, 2)
    sgd.save(f"{root}/one", {"model": model, "rng": savegame.RNGState(), "epoch": 4})
    fresh = torch.nn.Linear(3, 2)
    report = sgd.restore(RemoteStorage(root).ref("one"), {"model": fresh, "epoch": 0})
    assert report.state["epoch"] == 4 and torch.equal(fresh.weight, model.weight)
    full = sgd.load_full_state_dict(f"{root}/one")
    assert set(full) == {"model", "rng.rank0", "epoch"} and torch.equal(full["model"]["weight"], model.weight)
    with pytest.raises(savegame.ConfigError):
        sgd.save(RemoteStorage(root).ref("two"), {"epoch": 1}, storage_options={"key": "k"})


# ---------------------------------------------------------------------------------------------------
# Two ranks against moto's S3 server


@pytest.fixture(scope="module")
def s3() -> Iterator[tuple[dict[str, Any], str]]:
    """moto's S3 server on 127.0.0.1 (a free port) and a fresh bucket: (storage_options, bucket URL)."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import fsspec

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {
        "endpoint_url": f"http://127.0.0.1:{port}", "key": "AKIDSAVEGAMEDIST", "secret": "sg-dist-secret-7e3d",
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 30},
    }  # fmt: skip
    bucket = f"sg-dist-{uuid.uuid4().hex[:10]}"
    fsspec.filesystem("s3", skip_instance_cache=True, **options).mkdir(bucket)
    try:
        yield options, f"s3://{bucket}"
    finally:
        server.stop()


def _read(out: Path, mode: str, rank: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / f"{mode}.rank{rank}.json").read_text())
    return data


def _only_committed(storage: RemoteStorage) -> dict[str, set[str]]:
    """Every object under the root, checked to belong to a committed checkpoint: {name: its files}."""
    listing = storage._list(storage._root)
    found: dict[str, set[str]] = {}
    versions: dict[str, set[str]] = {}
    for path in listing:
        parts = path[len(storage._root) + 1 :].split("/")
        assert len(parts) in (2, 3), path
        if len(parts) == 2:
            assert parts[1] == "manifest.json", path
            continue
        versions.setdefault(parts[0], set()).add(parts[1])
        found.setdefault(parts[0], set()).add(parts[2])
    assert set(found) == set(storage.committed())
    for name, files in found.items():
        assert len(versions[name]) == 1, f"{name}: several versions {versions[name]}"
        manifest = savegame.read_manifest(storage.ref(name))
        assert files == {*manifest.files, "manifest.json"}, f"{name}: {files}"  # no .staging, nothing else
    return found


def test_ddp_and_fsdp2_save_to_s3_and_resume_bit_identically(s3: tuple[dict[str, Any], str], tmp_path: Path) -> None:
    options, bucket = s3
    root, fsdp_root = f"{bucket}/ddp", f"{bucket}/fsdp"
    out = tmp_path / "out"
    out.mkdir()
    args = ("--root", root, "--fsdp-root", fsdp_root, "--options", json.dumps(options), "--out", str(out))
    torchrun("_s3_worker.py", "--mode", "train", *args, drop_env=("AWS_",))
    names = ["step=000004", "step=000006"]
    for rank in (0, 1):
        trained = _read(out, "train", rank)
        assert trained["aws_env"] == []  # credentials only through storage_options
        assert trained["saved"] == ["step=000002", "step=000004", "step=000006"]
        assert trained["listed"] == names
        assert trained["fsdp_step"] == 3 and trained["fsdp_pickle_calls"] == []
    assert _read(out, "train", 0)["fsdp_diff"] == []  # sharded save + restore: model and Adam state bit-exact
    assert {"shards.rank0.safetensors", "shards.rank1.safetensors"} <= set(_read(out, "train", 0)["fsdp_files"])

    storage = RemoteStorage(root, storage_options=options)
    assert storage.committed() == names  # step 2 deleted by rank 0's retention
    files = _only_committed(storage)
    assert {"rng.rank0.safetensors", "rng.rank1.safetensors", "model.safetensors"} <= files["step=000006"]
    manifest = savegame.verify(storage.ref("step=000006"))
    assert manifest.metadata == {"run": "s3-ddp"} and manifest.progress["step"] == 6

    fsdp = RemoteStorage(fsdp_root, storage_options=options)
    assert _only_committed(fsdp).keys() == {"ws2"}
    uploads = fsdp.fs.call_s3("list_multipart_uploads", Bucket=bucket[len("s3://") :])
    assert not uploads.get("Uploads")
    full = sgd.load_full_state_dict(f"{fsdp_root}/ws2", storage_options=options)  # one process, by URL
    ref = savegame.load(out / "fsdp-ref")
    assert diff(full["model"], ref["model"]) == [] and diff(full["optimizer"], ref["optimizer"]) == []

    torchrun("_s3_worker.py", "--mode", "resume", *args, drop_env=("AWS_",))
    for rank in (0, 1):
        trained, resumed = _read(out, "train", rank), _read(out, "resume", rank)
        assert resumed["restored"] == "step=000006" and resumed["pickle_calls"] == []
        assert resumed["params"] == trained["params"], f"rank {rank}: parameters differ after resuming"
        assert resumed["draws"] == trained["draws"], f"rank {rank}: random streams differ after resuming"
    assert _read(out, "train", 0)["draws"] != _read(out, "train", 1)["draws"]
    assert storage.committed() == names and _only_committed(storage).keys() == set(names)


def test_participant_multipart_upload_and_abort_on_s3(s3: tuple[dict[str, Any], str]) -> None:
    options, bucket = s3
    storage = RemoteStorage(f"{bucket}/parts", storage_options=options, part_size=5 << 20)
    owner = storage.begin("ckpt")
    joined = storage.join("ckpt", owner.token)
    done = joined.open("shards.rank1.safetensors")
    done.write(bytes(6 << 20))  # one 5 MiB part straight from this buffer, the rest buffered
    done.close()
    folder = storage._key("ckpt", owner.token)
    assert storage._info(f"{folder}/shards.rank1.safetensors")["size"] == 6 << 20
    pending = joined.open("rng.rank1.safetensors")
    pending.write(bytes(6 << 20))  # a multipart upload left unfinished
    joined.abort()
    assert set(storage._list(storage._key("ckpt"))) == {f"{folder}/{STAGING_MARKER}"}  # the owner's marker only
    uploads = storage.fs.call_s3("list_multipart_uploads", Bucket=bucket[len("s3://") :], Prefix="parts/")
    assert not uploads.get("Uploads")
    owner.abort()
    assert storage._list(storage._key("ckpt")) == {}
