"""The small-checkpoint load path (issue 19 item 2): the local reader's prefetch (data files opened once,
their reads started together), the skeleton decoder's leaf fast path, the shortcut for tensor nodes of
just a tag and a key, 0-d values shared instead of copied, and that all of them keep every check."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import savegame
from savegame.errors import HashMismatchError, InvalidManifestError, MissingFileError, TruncatedFileError
from savegame.format import tree
from savegame.format.tree import MAX_DEPTH, Decoder
from savegame.storage.local.read import PREFETCH_MAX_FILES, open_local_checkpoint


def _model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    return model, opt


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, nn.Module, torch.optim.Optimizer]:
    model, opt = _model_and_optimizer()
    savegame.save(tmp_path / "c", {"model": model, "optimizer": opt})
    return tmp_path / "c", model, opt


def _data_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.name != "manifest.json")


def test_load_into_model_restores_exact_bytes_and_leaks_no_descriptor(saved: tuple[Path, nn.Module, Any]) -> None:
    path, model, opt = saved
    fresh, fresh_opt = _model_and_optimizer()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    before = _open_fds()
    savegame.load(path, {"model": fresh, "optimizer": fresh_opt})
    plain = savegame.load(path)
    assert _open_fds() == before  # every prefetched descriptor was read and closed
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    for key, value in opt.state_dict()["state"][0].items():
        assert torch.equal(value, fresh_opt.state_dict()["state"][0][key])
        assert torch.equal(value, plain["optimizer"]["state"][0][key])


def test_prefetch_reads_the_file_it_opened_and_close_releases_it(tmp_path: Path) -> None:
    """The size checked and the bytes read come from the one file prefetch opened, even if the name is
    replaced meanwhile; close() releases prefetched files that were never read."""
    savegame.save(tmp_path / "c", {"x": np.arange(100, dtype=np.int64)})
    (name,) = [p.name for p in _data_files(tmp_path / "c")]
    original = (tmp_path / "c" / name).read_bytes()
    before = _open_fds()
    reader = open_local_checkpoint(tmp_path / "c")
    reader.prefetch([name, "not-there.safetensors"])  # a missing file is left for the later calls
    replacement = tmp_path / "other"
    replacement.write_bytes(b"y" * 7)
    os.replace(replacement, tmp_path / "c" / name)
    assert reader.file_size(name) == len(original)
    assert bytes(reader.read_file(name, len(original))) == original
    assert reader.file_size(name) == 7  # handed over once: the next look is at the path again
    with pytest.raises(FileNotFoundError):
        reader.file_size("not-there.safetensors")
    reader.prefetch([name])
    reader.close()
    assert _open_fds() == before


def test_prefetch_holds_a_bounded_number_of_files(tmp_path: Path) -> None:
    path = tmp_path / "c"
    savegame.save(path, {"x": np.arange(3)})
    for i in range(PREFETCH_MAX_FILES + 10):
        (path / f"f{i}.bin").write_bytes(b"z")
    before = len(_open_fds())
    reader = open_local_checkpoint(path)
    reader.prefetch([f"f{i}.bin" for i in range(PREFETCH_MAX_FILES + 10)])
    assert len(_open_fds()) - before == PREFETCH_MAX_FILES + 1  # and the directory
    reader.close()
    assert len(_open_fds()) == before


@pytest.mark.parametrize("which", [0, 1])
def test_a_flipped_byte_in_a_small_file_still_raises(saved: tuple[Path, nn.Module, Any], which: int) -> None:
    """Small files are hashed inline, after the prefetch; a flipped data byte raises before anything is
    restored, and only the hash sees it (with verify=False the same file loads)."""
    path, _, _ = saved
    file = _data_files(path)[which]
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x40  # in the last tensor's bytes: the header still parses
    file.write_bytes(bytes(data))
    fresh, fresh_opt = _model_and_optimizer()
    weights = [p.detach().clone() for p in fresh.parameters()]
    with pytest.raises(HashMismatchError):
        savegame.load(path, {"model": fresh, "optimizer": fresh_opt})
    with pytest.raises(HashMismatchError):
        savegame.load(path)
    assert all(torch.equal(a, b) for a, b in zip(weights, fresh.parameters()))  # untouched
    savegame.load(path, {"model": fresh, "optimizer": fresh_opt}, verify=False)


def test_missing_and_truncated_files_raise_as_before(saved: tuple[Path, nn.Module, Any]) -> None:
    path, _, _ = saved
    first, second = _data_files(path)
    first.write_bytes(first.read_bytes()[:-1])
    with pytest.raises(TruncatedFileError, match="the manifest says"):
        savegame.load(path)
    second.unlink()
    with pytest.raises(MissingFileError):
        savegame.load(path, {"optimizer": _model_and_optimizer()[1]}, strict=False)


def _nested(depth: int, leaf: object) -> object:
    node: object = [leaf]
    for _ in range(depth - 1):
        node = [node]
    return node


@pytest.mark.parametrize("container", ["list", "dict"])
def test_decoder_leaf_fast_path_keeps_the_depth_limit(container: str) -> None:
    def wrap(depth: int) -> object:
        if container == "list":
            return _nested(depth, 1)
        node: object = {"a": 1}
        for _ in range(depth - 1):
            node = {"a": node}
        return node

    Decoder(resolve=None).decode(wrap(MAX_DEPTH))  # a leaf at depth MAX_DEPTH is fine
    with pytest.raises(InvalidManifestError, match="deep"):
        Decoder(resolve=None).decode(wrap(MAX_DEPTH + 1))
    tagged: object = {"$": "dict", "k": [1], "v": [2]}  # its key and value one level deeper
    Decoder(resolve=None).decode(_nested(MAX_DEPTH - 1, tagged))
    with pytest.raises(InvalidManifestError, match="deep"):
        Decoder(resolve=None).decode(_nested(MAX_DEPTH, tagged))


def test_decoder_leaf_fast_path_counts_nodes_and_checks_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tree, "MAX_NODES", 10)
    assert Decoder(resolve=None).decode([1, 2.5, None, True, "s"]) == [1, 2.5, None, True, "s"]
    Decoder(resolve=None).decode(list(range(9)))  # 9 leaves + the list: 10 nodes
    with pytest.raises(InvalidManifestError, match="more than 10 nodes"):
        Decoder(resolve=None).decode(list(range(10)))
    with pytest.raises(InvalidManifestError, match="more than 10 nodes"):
        Decoder(resolve=None).decode({str(i): i for i in range(10)})
    tagged = {"$": "dict", "k": [1, 2, 3, 4], "v": ["a", "b", "c", "d"]}  # 1 node + 4 keys + 4 values
    assert Decoder(resolve=None).decode(tagged) == {1: "a", 2: "b", 3: "c", 4: "d"}
    Decoder(resolve=None).decode([tagged])  # 10 nodes with the list
    with pytest.raises(InvalidManifestError, match="more than 10 nodes"):
        Decoder(resolve=None).decode([[tagged]])
    with pytest.raises(InvalidManifestError, match="unhashable"):
        Decoder(resolve=None).decode({"$": "dict", "k": [[1]], "v": [2]})
    monkeypatch.setattr(tree, "MAX_NODES", 1000)
    monkeypatch.setattr(tree, "MAX_STRING", 4)
    assert Decoder(resolve=None).decode({"k": ["abcd"]}) == {"k": ["abcd"]}
    with pytest.raises(InvalidManifestError, match="string longer"):
        Decoder(resolve=None).decode(["abcde"])
    with pytest.raises(InvalidManifestError, match="string longer"):
        Decoder(resolve=None).decode({"k": "abcde"})
    with pytest.raises(InvalidManifestError, match="string longer"):
        Decoder(resolve=None).decode({"$": "dict", "k": ["abcde"], "v": [1]})
    with pytest.raises(InvalidManifestError, match="string longer"):
        Decoder(resolve=None).decode({"$": "dict", "k": [1], "v": ["abcde"]})


def test_prefetch_of_the_whole_directory_keeps_every_check(tmp_path: Path) -> None:
    """prefetch(None) opens the manifest and the directory's other files before the manifest is read:
    the manifest is read from that descriptor, a file that is not regular (a FIFO) is skipped, and
    the later checks still raise (a forged manifest, a swapped data file)."""
    path = tmp_path / "c"
    savegame.save(path, {"x": np.arange(100, dtype=np.int64)})
    os.mkfifo(path / "fifo")
    (path / ".hidden").write_bytes(b"h")
    before = _open_fds()
    reader = open_local_checkpoint(path)
    reader.prefetch(None)
    (data,) = path.glob("*.safetensors")
    assert set(reader._opened) == {"manifest.json", data.name}
    manifest = (path / "manifest.json").read_bytes()
    (path / "manifest.json").unlink()  # read from the descriptor opened by the prefetch
    assert reader.manifest_bytes() == manifest
    reader.close()
    assert _open_fds() == before
    (path / "manifest.json").write_bytes(manifest.replace(b'"format": "savegame"', b'"format": "savegamX"'))
    with pytest.raises(InvalidManifestError):
        savegame.load(path)
    (path / "manifest.json").write_bytes(manifest)
    assert savegame.load(path)["x"].tolist() == list(range(100))
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(HashMismatchError):
        savegame.load(path)


def _forge_model_node(path: Path, resign: Any, **fields: object) -> None:
    def mutate(body: dict[str, Any]) -> None:
        body["items"]["model"]["skeleton"]["0.weight"].update(fields)

    resign(path, mutate)


@pytest.mark.parametrize(
    ("fields", "match"),
    [({"device": "meta"}, "meta"), ({"param": "yes"}, "param"), ({"device": "cuda:x"}, "device"),
     ({"dtype": "nonsense"}, "logical dtype"), ({"key": 5}, "key")],
)
def test_a_tensor_node_with_more_fields_still_gets_every_check(
    saved: tuple[Path, nn.Module, Any], resign: Any, fields: dict[str, object], match: str,
) -> None:  # fmt: skip
    """Nodes of just a tag and a key take the adapter's shortcut (plain_tensor); any other field sends the
    node through every check, in a plain load and in a load into a model."""
    path, _, _ = saved
    _forge_model_node(path, resign, **fields)
    with pytest.raises(InvalidManifestError, match=match):
        savegame.load(path)
    with pytest.raises(InvalidManifestError, match=match):
        savegame.load(path, {"model": _model_and_optimizer()[0]})


def test_a_tensor_node_with_flags_is_built_with_them(saved: tuple[Path, nn.Module, Any], resign: Any) -> None:
    path, model, _ = saved
    _forge_model_node(path, resign, param=True, requires_grad=False)
    weight = savegame.load(path)["model"]["0.weight"]
    assert isinstance(weight, nn.Parameter) and not weight.requires_grad
    assert torch.equal(weight, model.state_dict()["0.weight"])
    _forge_model_node(path, resign, param=False, requires_grad=True)
    assert savegame.load(path)["model"]["0.weight"].requires_grad


def test_single_values_are_shared_unaligned_arrays_copied(saved: tuple[Path, nn.Module, Any]) -> None:
    """The 0-d ``step`` tensors of an optimizer sit back to back at the end of its file, only the first
    64-byte aligned: an "aligned" load shares them all (one value has no alignment-dependent kernel),
    exactly as saved, and a write to one never reaches the file or the others."""
    path, _, opt = saved
    (file,) = [p for p in _data_files(path) if p.name.startswith("optimizer")]
    before = file.read_bytes()
    for state in (savegame.load(path)["optimizer"], _loaded_into_optimizer(path)):
        steps = [state["state"][i]["step"] for i in sorted(state["state"])]
        assert all(s.dim() == 0 for s in steps)
        addresses = [s.data_ptr() for s in steps]
        assert addresses == [addresses[0] + 4 * i for i in range(len(steps))]  # views of one buffer
        for i, s in enumerate(steps):
            assert torch.equal(s, opt.state_dict()["state"][i]["step"])
        steps[1] += 1
        assert steps[2] == opt.state_dict()["state"][2]["step"]
    assert file.read_bytes() == before
    saved_x = {"a": torch.tensor(1.0), "b": torch.arange(7.0)}
    savegame.save(path.parent / "odd", {"x": saved_x})  # "b" (not 0-d) starts at byte 4 of the data
    loaded = savegame.load(path.parent / "odd")["x"]
    assert loaded["a"].data_ptr() % 64 == 0  # the first tensor: a view either way
    assert loaded["b"].data_ptr() != loaded["a"].data_ptr() + 4  # not a view: copied ...
    assert loaded["b"].data_ptr() % 64 == 0 and torch.equal(loaded["b"], saved_x["b"])  # ... into aligned memory


def _loaded_into_optimizer(path: Path) -> dict[str, Any]:
    model, opt = _model_and_optimizer()
    savegame.load(path, {"model": model, "optimizer": opt})
    return opt.state_dict()


def test_opening_without_a_stat_first_keeps_every_error(tmp_path: Path) -> None:
    """open_local_checkpoint opens the directory straight away (no lexists first); each way a path can
    fail to be a checkpoint still raises the same error, and a refused staging directory is closed."""
    from savegame.errors import CheckpointNotFoundError, NotACheckpointError
    from savegame.storage.base import STAGING_PREFIX

    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for missing in ("nowhere", "file/ckpt", "dangling", f"{STAGING_PREFIX}gone"):
        with pytest.raises(CheckpointNotFoundError):
            open_local_checkpoint(tmp_path / missing)
    with pytest.raises(NotACheckpointError, match="not a directory"):
        open_local_checkpoint(tmp_path / "file")
    savegame.save(tmp_path / "c", {"x": 1})
    os.rename(tmp_path / "c", tmp_path / f"{STAGING_PREFIX}c")
    before = _open_fds()
    with pytest.raises(NotACheckpointError, match="unfinished save"):
        open_local_checkpoint(tmp_path / f"{STAGING_PREFIX}c")
    assert _open_fds() == before


def test_checked_block_runs_every_check_and_reports_a_mismatch_first() -> None:
    """verifier.checked (a plain context manager now): every deferred check runs when the block ends, also
    when the block fails; a mismatch found then is what is raised, with the block's error as context."""
    from savegame.engine.verifier import checked

    ran: list[int] = []

    def mismatch() -> None:
        ran.append(0)
        raise HashMismatchError("damaged")

    with checked([lambda: ran.append(1)]):
        pass
    with pytest.raises(ValueError), checked([lambda: ran.append(2)]):
        raise ValueError("decode failed")
    with pytest.raises(HashMismatchError) as info, checked([mismatch, lambda: ran.append(3)]):
        raise ValueError("decode failed")
    assert isinstance(info.value.__context__, ValueError)
    with pytest.raises(HashMismatchError), checked([mismatch]):
        pass
    assert ran == [1, 2, 0, 3, 0]


@pytest.mark.parametrize("directory", ["/", "/a/b", "/a/b/"])
@pytest.mark.parametrize("file", ["model.safetensors", "/abs", ""])
def test_file_where_is_os_path_join(directory: str, file: str) -> None:
    from savegame.storage.local.read import LocalCheckpointReader

    assert LocalCheckpointReader(directory).file_where(file) == os.path.join(directory, file)
