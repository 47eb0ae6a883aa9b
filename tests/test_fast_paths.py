"""The performance paths keep the guarantees: the manifest a save returns is the one a reader parses; the
fast manifest serializer is byte-identical to ``json.dumps(indent=1)``; hashes computed on worker threads
still catch corruption (and a forked child gets its own workers); early fsyncs are complete at commit."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import savegame
from savegame.errors import HashMismatchError
from savegame.format import manifest as M


def _state() -> dict[str, Any]:
    model = torch.nn.Sequential(torch.nn.Linear(600, 700), torch.nn.Linear(700, 10))  # ~1.7 MB: hashed on a worker
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 600)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt, "extra": {"big": np.arange(600_000, dtype=np.float64), "n": 3}}


def test_returned_manifest_equals_the_parsed_one(tmp_path: Path) -> None:
    returned = savegame.save(tmp_path / "c", _state(), metadata={"lr": 0.1, "tags": ["a", "é"]}, progress={"epoch": 2})
    parsed = savegame.read_manifest(tmp_path / "c")
    assert returned == parsed
    assert returned.raw_metadata == parsed.raw_metadata and returned.raw_progress == parsed.raw_progress


def _random_tree(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth > 6 or r < 0.5:
        return rng.choice([None, True, False, 0, -7, 2**80, 1.5, -0.0, 1e300, 5e-324, "", 'q"\\\n\té中😀\x00', 3.25])
    if r < 0.75:
        return [_random_tree(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if r < 0.85:
        return tuple(_random_tree(rng, depth + 1) for _ in range(rng.randint(0, 3)))
    keys = [rng.choice(["a", "$", "ké", "", "z z"]) + str(i) for i in range(rng.randint(0, 4))]
    return {k: _random_tree(rng, depth + 1) for k in keys}


def test_fast_serializer_is_byte_identical_to_json_dumps() -> None:
    rng = random.Random(5)
    for _ in range(2000):
        obj = {"x": _random_tree(rng)}
        assert M._serialize(obj) == json.dumps(obj, indent=1, ensure_ascii=True, allow_nan=False).encode() + b"\n"
    deep: Any = 1
    for _ in range(400):
        deep = [deep]
    assert M._serialize({"d": deep}) == json.dumps({"d": deep}, indent=1).encode() + b"\n"
    for odd in ({1: 2}, {"a": [{None: 1, 2.5: "x"}]}):  # non-string keys: left to json.dumps
        assert M._serialize(odd) == json.dumps(odd, indent=1).encode() + b"\n"
    with pytest.raises(ValueError):
        M._serialize({"a": float("nan")})


def test_a_torch_manifest_takes_the_fast_serializer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.__version__ is a str subclass (TorchVersion): once it sent every torch save's manifest to the
    json module's pure-Python indenting encoder (half of a small model's save time)."""

    class Tag(str):
        pass

    odd = {"v": Tag("2.13.0+cpu"), "w": [Tag("x\u00e9\n")]}
    assert M._serialize(odd) == json.dumps(odd, indent=1, ensure_ascii=True).encode() + b"\n"

    real_dumps = json.dumps

    def no_fallback(*args: Any, **kwargs: Any) -> str:
        assert "indent" not in kwargs, "the manifest went to the json module's indenting encoder"
        return real_dumps(*args, **kwargs)  # the tensor files' compact headers

    monkeypatch.setattr(M.json, "dumps", no_fallback)
    M._serialize(odd)
    model = torch.nn.Linear(3, 2)
    savegame.save(tmp_path / "c", {"model": model, "optimizer": torch.optim.AdamW(model.parameters())})
    monkeypatch.undo()
    assert savegame.read_manifest(tmp_path / "c").versions["torch"] == str(torch.__version__)


@pytest.mark.parametrize("where", ["data", "header"])
@pytest.mark.parametrize("target", [False, True])
def test_worker_thread_hash_catches_a_flipped_byte(tmp_path: Path, where: str, target: bool) -> None:
    state = _state()
    savegame.save(tmp_path / "c", state)
    file = tmp_path / "c" / "model.safetensors"
    assert file.stat().st_size >= 1 << 20
    data = bytearray(file.read_bytes())
    pos = 20 if where == "header" else len(data) - 1000
    data[pos] ^= 0x40
    file.write_bytes(bytes(data))
    before = [p.detach().clone() for p in state["model"].parameters()]
    with pytest.raises(HashMismatchError):
        savegame.load(tmp_path / "c", {"model": state["model"]} if target else None)
    assert all(torch.equal(a, b) for a, b in zip(before, state["model"].parameters()))  # nothing restored


def test_round_trip_through_the_fast_paths(tmp_path: Path) -> None:
    state = _state()
    savegame.save(tmp_path / "c", state)
    loaded = savegame.load(tmp_path / "c")
    for k, v in state["model"].state_dict().items():
        assert torch.equal(loaded["model"][k], v)
    assert np.array_equal(loaded["extra"]["big"], state["extra"]["big"])
    fresh = torch.nn.Sequential(torch.nn.Linear(600, 700), torch.nn.Linear(700, 10))
    savegame.load(tmp_path / "c", {"model": fresh})
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), state["model"].parameters()))
    pending = savegame.save(tmp_path / "d", state, background=True)
    assert pending.result() == savegame.read_manifest(tmp_path / "d")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_saves_and_loads_work_in_a_forked_child(tmp_path: Path) -> None:
    state = {"x": np.ones(3 << 20, dtype=np.uint8), "y": {"z": np.arange(10)}}
    savegame.save(tmp_path / "parent", state)  # starts the hash and fsync workers in this process
    savegame.load(tmp_path / "parent")
    pid = os.fork()
    if pid == 0:  # the child must not queue work to the parent's threads, which it does not have
        code = 1
        try:
            savegame.save(tmp_path / "child", state)
            savegame.load(tmp_path / "child")
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    savegame.verify(tmp_path / "child")


def _mapped_ranges(file: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps ``file`` (from /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].strip() == str(file):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.parametrize("width", [32, 512])
def test_optimizer_state_loads_as_private_aligned_views_of_the_file(tmp_path: Path, width: int) -> None:
    """An optimizer keeps the tensors ``load_state_dict`` gets: they are views of the copy-on-write file
    mapping (no copy) where 64-byte aligned, like a fresh allocation; training then changes them without
    changing the file, and the resumed run is bit-identical to the uninterrupted one. A small file (up to
    256 KiB: width 32) is read into one private aligned buffer instead, and the moments are views of it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 64), torch.randint(0, 3, (16,))

    def step(m: torch.nn.Module, o: torch.optim.Optimizer) -> None:
        o.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()

    step(model, opt)
    savegame.save(tmp_path / "c", {"model": model, "optimizer": opt})
    file_hash_before = savegame.read_manifest(tmp_path / "c").files["optimizer.safetensors"].hash

    fresh = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, 3))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.01)
    savegame.load(tmp_path / "c", {"model": fresh, "optimizer": fresh_opt})
    state = [s for s in fresh_opt.state.values()]
    moments = [s[k] for s in state for k in ("exp_avg", "exp_avg_sq")]
    assert moments and all(t.data_ptr() % 64 == 0 for t in moments)
    file = tmp_path / "c" / "optimizer.safetensors"
    shared = [t for t in moments if t.nbytes % 64 == 0]  # the last bias (12 bytes) is a copy
    assert len(shared) == len(moments) - 2
    if width == 32:  # one buffer holding the file: the moments lie within a span of the file's size
        assert file.stat().st_size <= 256 << 10
        start = min(t.data_ptr() for t in shared)
        assert max(t.data_ptr() + t.nbytes for t in shared) - start <= file.stat().st_size
    elif Path("/proc/self/maps").exists():  # Linux: the moments live in the file mapping itself (no copy)
        assert file.stat().st_size > 256 << 10
        ranges = _mapped_ranges(file.resolve())
        assert ranges
        in_file = [any(a <= t.data_ptr() < b for a, b in ranges) for t in moments]
        assert in_file == [t.nbytes % 64 == 0 for t in moments]
    for _ in range(3):
        step(model, opt)
        step(fresh, fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    for a, b in zip(opt.state.values(), fresh_opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    savegame.verify(tmp_path / "c")  # training wrote to the views, never to the file
    assert savegame.read_manifest(tmp_path / "c").files["optimizer.safetensors"].hash == file_hash_before
    again = savegame.load(tmp_path / "c")
    assert not torch.equal(again["optimizer"]["state"][0]["exp_avg"], fresh_opt.state_dict()["state"][0]["exp_avg"])


def test_optimizer_views_are_not_restored_from_a_damaged_file(tmp_path: Path) -> None:
    state = _state()
    savegame.save(tmp_path / "c", state)
    file = tmp_path / "c" / "optimizer.safetensors"
    data = bytearray(file.read_bytes())
    data[-5] ^= 0x01
    file.write_bytes(bytes(data))
    opt = state["optimizer"]
    before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    with pytest.raises(HashMismatchError):
        savegame.load(tmp_path / "c", {"model": state["model"], "optimizer": opt})
    for p, s in opt.state.items():
        assert all(torch.equal(v, before[id(p)][k]) for k, v in s.items())
