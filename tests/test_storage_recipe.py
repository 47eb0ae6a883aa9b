"""docs/architecture.md's "Adding a storage backend" recipe, followed to the letter: a toy storage that
keeps checkpoints in a dict, written with the writer, read, verified and mirrored through the public API."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import savegame
from savegame.engine.mirror import Mirror
from savegame.engine.writer import save_now
from savegame.errors import CheckpointNotFoundError, CommitError, HashMismatchError
from savegame.storage import LocalStorage
from savegame.storage.base import CheckpointReader, CheckpointRef, FileSink, Storage, Transaction


class DictSink(FileSink):
    def __init__(self, files: dict[str, bytearray], file: str) -> None:
        self.data = files.setdefault(file, bytearray())

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.data += data
        return len(data)

    def close(self) -> None:
        return None  # a dict is as durable as it gets


@dataclass
class DictTransaction(Transaction):
    storage: DictStorage
    name: str
    overwrite: bool
    files: dict[str, bytearray] = field(default_factory=dict)

    def open(self, file: str) -> FileSink:
        return DictSink(self.files, file)

    def commit(self, manifest: bytes) -> str:
        if self.name in self.storage.checkpoints and not self.overwrite:
            raise CommitError(17, f"{self.storage.url(self.name)} exists")
        self.storage.checkpoints[self.name] = ({f: bytes(b) for f, b in self.files.items()}, manifest)  # atomic
        return self.storage.url(self.name)

    def abort(self) -> None:
        self.files.clear()


class DictReader(CheckpointReader):
    def __init__(self, storage: DictStorage, name: str) -> None:
        self.where = storage.url(name)
        self.files, self.manifest = storage.checkpoints[name]

    def manifest_bytes(self) -> bytes:
        return self.manifest

    def file_where(self, file: str) -> str:
        return f"{self.where}/{file}"

    def file_size(self, file: str) -> int:
        if file not in self.files:
            raise FileNotFoundError(self.file_where(file))
        return len(self.files[file])

    def read_file(self, file: str, size: int) -> bytes:
        return self.files[file]


class DictStorage(Storage):
    def __init__(self) -> None:
        self.root = "dict://toy"
        self.checkpoints: dict[str, tuple[dict[str, bytes], bytes]] = {}
        self.quarantined: dict[str, tuple[dict[str, bytes], bytes]] = {}

    def begin(self, name: str, *, overwrite: bool = False) -> Transaction:
        return DictTransaction(self, name, overwrite)

    def committed(self) -> list[str]:
        return sorted(self.checkpoints)

    def delete(self, name: str) -> None:
        del self.checkpoints[name]

    def quarantine(self, name: str) -> str:
        self.quarantined[f".quarantine-{name}"] = self.checkpoints.pop(name)
        return f".quarantine-{name}"

    def cleanup(self) -> list[str]:
        return []  # a transaction never leaves anything behind here

    def path(self, name: str) -> str:
        return self.url(name)

    def url(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exists(self, name: str) -> bool:
        return name in self.checkpoints

    def reader(self, name: str) -> CheckpointReader:
        if name not in self.checkpoints:
            raise CheckpointNotFoundError(f"{self.url(name)}: no such checkpoint")
        return DictReader(self, name)

    def ref(self, name: str) -> CheckpointRef:
        return CheckpointRef(self, name)


STATE = {"model": {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4)}, "epoch": 3}


def test_a_dict_storage_built_by_the_recipe_saves_loads_and_verifies() -> None:
    storage = DictStorage()
    save_now(storage, "c", STATE, metadata={"run": "toy"}, progress=None, overwrite=False)
    assert storage.committed() == ["c"]
    assert savegame.read_manifest(storage.ref("c")).metadata == {"run": "toy"}
    assert savegame.verify(storage.ref("c")).items.keys() == {"model", "epoch"}
    loaded = savegame.load(storage.ref("c"))
    assert loaded["epoch"] == 3 and np.array_equal(loaded["model"]["w"], STATE["model"]["w"])
    files, manifest = storage.checkpoints["c"]
    file = next(iter(files))
    damaged = bytearray(files[file])
    damaged[-1] ^= 1
    storage.checkpoints["c"] = ({**files, file: bytes(damaged)}, manifest)
    with pytest.raises(HashMismatchError, match=f"dict://toy/c/{file}"):
        savegame.verify(storage.ref("c"))
    with pytest.raises(HashMismatchError):
        savegame.load(storage.ref("c"))


def test_a_dict_storage_built_by_the_recipe_is_a_mirror_target(tmp_path: Path) -> None:
    savegame.save(tmp_path / "local" / "c", STATE)
    storage = DictStorage()
    report = Mirror(tmp_path / "local", "dict://toy", remote=storage).sync()
    assert report.uploaded == ["c"] and storage.committed() == ["c"]
    assert savegame.verify(storage.ref("c")).total_bytes == savegame.read_manifest(tmp_path / "local" / "c").total_bytes
    path = Mirror(tmp_path / "fresh", "dict://toy", remote=storage).restore_newest()  # downloads, via iter_file
    assert path == str(LocalStorage(tmp_path / "fresh").path("c"))
    assert savegame.load(path)["epoch"] == 3


def test_the_optional_members_have_the_documented_defaults() -> None:
    storage = DictStorage()
    txn = storage.begin("c")
    assert txn.token is None
    txn.finish()
    storage.check_target("c", overwrite=False)
    with pytest.raises(savegame.ConfigError, match="DictStorage cannot be shared by several processes"):
        storage.join("c", "anything")
    save_now(storage, "c", STATE, metadata=None, progress=None, overwrite=False)
    reader = storage.reader("c")
    files = storage.checkpoints["c"][0]
    file = next(iter(files))
    assert b"".join(bytes(p) for p in reader.iter_file(file, reader.file_size(file))) == files[file]
    reader.close()
