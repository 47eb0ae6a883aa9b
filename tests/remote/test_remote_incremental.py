"""Incremental checkpoints on object storage: the unchanged files are copied on the server (fsspec ``copy``,
S3 CopyObject), never downloaded nor uploaded again; the result is a complete checkpoint that verifies,
loads the same bytes as a full save, and survives the deletion of its base."""

from __future__ import annotations

import shutil
import uuid
from typing import Any

import pytest
import torch

import savegame
from savegame.errors import HashMismatchError
from savegame.storage.remote.write import RemoteTransaction


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))
    net[0].requires_grad_(False)
    opt = torch.optim.AdamW(net[1].parameters())
    return net, opt


def _step(net: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    net(torch.randn(2, 64)).sum().backward()
    opt.step()
    opt.zero_grad()


def _uploads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the files opened for upload (the ones written through this process)."""
    opened: list[str] = []
    real = RemoteTransaction.open

    def spy(self: RemoteTransaction, file: str) -> Any:
        opened.append(file)
        return real(self, file)

    monkeypatch.setattr(RemoteTransaction, "open", spy)
    return opened


def _check(root: str, names: list[str], net: torch.nn.Module, options: dict[str, Any] | None) -> None:
    latest = f"{root}/{names[-1]}"
    manifest = savegame.verify(latest, storage_options=options)
    assert manifest.items["model"].linked, "the frozen layer was not copied on the server"
    loaded = savegame.load(latest, storage_options=options)["model"]
    for key, value in net.state_dict().items():
        assert torch.equal(loaded[key], value), key


def _run(root: str, monkeypatch: pytest.MonkeyPatch, options: dict[str, Any] | None = None) -> list[str]:
    net, opt = _model()
    opened = _uploads(monkeypatch)
    ckpt = savegame.Checkpointer(root, incremental=True, keep_last=1, storage_options=options)
    names = []
    for epoch in range(3):
        _step(net, opt)
        names.append(ckpt.save({"model": net, "opt": opt}, epoch=epoch).name)
    ckpt.close()
    assert opened.count("model.safetensors") == 3 and not any("link" in f for f in opened)
    _check(root, names, net, options)  # the older ones were deleted by retention: the newest is complete
    return names


def test_memory_storage_copies_unchanged_files_on_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    _run(f"memory://incremental-{uuid.uuid4().hex[:8]}", monkeypatch)


def test_s3_copies_unchanged_files_on_the_server(bucket: str, s3_options: dict[str, Any],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    _run(f"{bucket}/run", monkeypatch, s3_options)


def test_a_failed_server_side_copy_uploads_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RemoteTransaction, "link", lambda self, *a, **k: False)
    root = f"memory://incremental-{uuid.uuid4().hex[:8]}"
    net, _ = _model()
    savegame.save(f"{root}/a", {"model": net})
    manifest = savegame.save(f"{root}/b", {"model": net}, base=f"{root}/a")
    assert not manifest.items["model"].linked
    savegame.verify(f"{root}/b")


def test_a_damaged_remote_base_is_caught_by_verify_of_the_new_checkpoint() -> None:
    """A remote base file is not downloaded before the copy: its recorded hash travels with it, so damage
    is found by verify/load of the new checkpoint, as for a written file."""
    import fsspec

    root = f"memory://incremental-{uuid.uuid4().hex[:8]}"
    net, _ = _model()
    savegame.save(f"{root}/a0", {"model": net})
    savegame.save(f"{root}/a", {"model": net}, base=f"{root}/a0")  # records the array hashes
    fs = fsspec.filesystem("memory")
    for path in fs.find(root.removeprefix("memory://") + "/a"):
        if path.endswith(".safetensors"):
            data = bytearray(fs.cat_file(path))
            data[-3] ^= 1
            fs.pipe_file(path, bytes(data))
    manifest = savegame.save(f"{root}/b", {"model": net}, base=f"{root}/a")
    assert manifest.items["model"].linked
    with pytest.raises(HashMismatchError):
        savegame.verify(f"{root}/b")
    with pytest.raises(HashMismatchError):
        savegame.load(f"{root}/b")


def test_a_mirror_copies_an_incremental_checkpoints_linked_files_on_the_server(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Local incremental checkpoints mirrored to object storage: a linked file (the frozen layer's) is a
    server-side copy of the one the mirror uploaded with an earlier checkpoint, not a second upload; every
    remote checkpoint verifies and loads the same bytes as the local one."""
    root = f"memory://mirror-incremental-{uuid.uuid4().hex[:8]}"
    net, opt = _model()
    opened = _uploads(monkeypatch)
    copied: list[str] = []
    real_link = RemoteTransaction.link

    def spy_link(self: RemoteTransaction, file: str, **kw: Any) -> bool:
        done = real_link(self, file, **kw)
        copied.append(file) if done else None
        return done

    monkeypatch.setattr(RemoteTransaction, "link", spy_link)
    ckpt = savegame.Checkpointer(tmp_path / "local", incremental=True, mirror=root)
    names = []
    for epoch in range(3):
        _step(net, opt)
        names.append(ckpt.save({"model": net, "opt": opt}, epoch=epoch).name)
    ckpt.close()  # waits for the uploads
    manifests = [savegame.read_manifest(tmp_path / "local" / n) for n in names]
    local_linked = [f for m in manifests for item in m.items.values() for f in item.linked]
    assert [f for m in manifests for f in m.items["model"].linked] == ["model.link1.safetensors"] * 2
    assert sorted(copied) == sorted(local_linked) and not any("link" in f for f in opened)
    for name in names:
        remote = savegame.verify(f"{root}/{name}")
        assert remote.files == savegame.read_manifest(tmp_path / "local" / name).files
    loaded = savegame.load(f"{root}/{names[-1]}")["model"]
    for key, value in net.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_a_mirror_never_copies_from_a_remote_file_that_changed_since_it_uploaded_it(tmp_path: Any) -> None:
    """The mirror remembers where it uploaded each file, to copy a later linked file from there on the
    server. Once that remote checkpoint is deleted and a new one of the same name (a model of the same
    shape: files of the same sizes) is uploaded, that place holds other bytes: a server-side copy from it
    would give the new remote checkpoint a file that fails its own hash. It is uploaded instead."""
    from savegame.engine.mirror import Mirror

    local, root = tmp_path / "local", f"memory://mirror-stale-{uuid.uuid4().hex[:8]}"
    net, _ = _model()
    mirror = Mirror(local, root)
    savegame.save(local / "a", {"model": net})
    mirror.upload("a")
    net[1].weight.data += 1.0
    savegame.save(local / "b", {"model": net}, base=local / "a")  # links a's file (the frozen layer)
    mirror.upload("b")
    shutil.rmtree(local / "a")  # pruned on both sides, then the name is used again
    mirror.remote.delete("a")
    other, _ = _model()
    other[0].weight.data += 1.0
    savegame.save(local / "a", {"model": other})
    mirror.upload("a")
    net[1].weight.data += 1.0
    savegame.save(local / "c", {"model": net}, base=local / "b")
    assert savegame.read_manifest(local / "c").items["model"].linked
    mirror.upload("c")
    savegame.verify(f"{root}/c")
    loaded = savegame.load(f"{root}/c")["model"]
    for key, value in net.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_a_remote_base_overwritten_before_the_server_side_copy_is_not_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    """The base's manifest is read before the copy, which takes the version committed at that time: when
    another process overwrote the base in between, that version holds other bytes. The copy is made only
    from a version whose manifest lists the recorded hash; here it does not, so the file is uploaded."""
    root = f"memory://incremental-race-{uuid.uuid4().hex[:8]}"
    net, _ = _model()
    savegame.save(f"{root}/a0", {"model": net})
    savegame.save(f"{root}/a", {"model": net}, base=f"{root}/a0")  # records the array hashes
    real = RemoteTransaction.link

    def overwritten_first(self: RemoteTransaction, file: str, **kwargs: Any) -> bool:
        other, _ = _model()
        other[0].weight.data += 1.0
        savegame.save(f"{root}/a", {"model": other}, overwrite=True)  # the other process's save
        return real(self, file, **kwargs)

    monkeypatch.setattr(RemoteTransaction, "link", overwritten_first)
    net[1].weight.data += 1.0
    manifest = savegame.save(f"{root}/b", {"model": net}, base=f"{root}/a")
    assert not manifest.items["model"].linked
    savegame.verify(f"{root}/b")
    loaded = savegame.load(f"{root}/b")["model"]
    for key, value in net.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_a_mirror_reads_a_source_checkpoints_remote_manifest_once_per_upload(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every linked file of an upload is checked against its source checkpoint's remote manifest, but that
    manifest is fetched once per upload and source, not once per linked file (one GET each)."""
    from savegame.engine.mirror import Mirror

    local, root = tmp_path / "local", f"memory://mirror-memo-{uuid.uuid4().hex[:8]}"
    nets = [_model()[0] for _ in range(3)]
    state = {f"m{i}": n for i, n in enumerate(nets)}
    mirror = Mirror(local, root)
    savegame.save(local / "a", state)
    mirror.upload("a")
    for net in nets:
        net[1].weight.data += 1.0
    savegame.save(local / "b", state, base=local / "a")
    manifest = savegame.read_manifest(local / "b")
    assert sum(len(i.linked) for i in manifest.items.values()) >= 3
    reads: list[str] = []
    real = Mirror._remote_manifest

    def spy(self: Mirror, name: str, *, refresh: bool = False) -> Any:
        reads.append(name)
        return real(self, name, refresh=refresh)

    monkeypatch.setattr(Mirror, "_remote_manifest", spy)
    opened = _uploads(monkeypatch)
    mirror.upload("b")
    assert reads.count("a") == 1, reads
    assert not any(f in opened for i in manifest.items.values() for f in i.linked), opened
    savegame.verify(f"{root}/b")
