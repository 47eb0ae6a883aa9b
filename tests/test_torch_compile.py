"""Issue 15 item 11: ``torch.compile``. A compiled model is saved under its plain names (the checkpoint is
the same compiled or not), and loading accepts ``_orig_mod.`` keys into a plain model and plain keys into
a compiled one, also combined with DDP's ``module.`` prefix; the optimizer of a compiled model works.

No forward pass is needed: an ``OptimizedModule`` wraps ``_orig_mod`` and its state dict is that module's
with an ``_orig_mod.`` prefix (compilation happens at the first call, never here)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import savegame
from savegame.errors import StateMismatchError
from savegame.run.checkpointer import Checkpointer


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def values(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


def same(model: nn.Module, expected: list[torch.Tensor]) -> bool:
    got = list(model.state_dict().values())
    return len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


def test_a_compiled_model_is_saved_under_the_plain_names(tmp_path: Path) -> None:
    plain = make_model(0)
    compiled = torch.compile(make_model(0))
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    savegame.save(tmp_path / "compiled", {"model": compiled})
    savegame.save(tmp_path / "plain", {"model": plain})
    from_compiled = savegame.load(tmp_path / "compiled")["model"]
    assert list(from_compiled) == list(plain.state_dict())  # no _orig_mod. anywhere
    assert all(torch.equal(from_compiled[k], v) for k, v in plain.state_dict().items())
    assert savegame.read_manifest(tmp_path / "compiled").items["model"].skeleton == \
        savegame.read_manifest(tmp_path / "plain").items["model"].skeleton  # fmt: skip


def test_compiled_and_plain_load_into_each_other(tmp_path: Path) -> None:
    source = torch.compile(make_model(1))
    savegame.save(tmp_path / "from-compiled", {"model": source})
    plain = make_model(2)
    assert savegame.load(tmp_path / "from-compiled", {"model": plain}).clean
    assert same(plain, values(source))

    savegame.save(tmp_path / "from-plain", {"model": make_model(3)})
    compiled = torch.compile(make_model(4))
    assert savegame.load(tmp_path / "from-plain", {"model": compiled}).clean
    assert same(compiled, values(make_model(3)))


def test_orig_mod_keys_in_a_checkpoint_load_into_plain_and_compiled_models(tmp_path: Path) -> None:
    """A checkpoint holding a compiled model's raw state dict (``_orig_mod.`` keys), e.g. written from
    ``compiled.state_dict()``, loads into the plain model and into a compiled one."""
    source = torch.compile(make_model(5))
    savegame.save(tmp_path / "raw", {"model": dict(source.state_dict())})
    assert all(k.startswith("_orig_mod.") for k in savegame.load(tmp_path / "raw")["model"])
    plain = make_model(6)
    assert savegame.load(tmp_path / "raw", {"model": plain}).clean and same(plain, values(source))
    compiled = torch.compile(make_model(7))
    assert savegame.load(tmp_path / "raw", {"model": compiled}).clean and same(compiled, values(source))


def test_a_compiled_submodule_and_ddp_style_prefixes_combine(tmp_path: Path) -> None:
    """``module.`` (DDP) outside or inside ``_orig_mod.``, and a compiled submodule of a plain model."""
    wrapped = nn.Module()
    wrapped.module = torch.compile(make_model(8))  # keys module._orig_mod.*
    outer = torch.compile(nn.Module())
    outer._orig_mod.module = make_model(9)  # keys _orig_mod.module.*
    holder = nn.Module()
    holder.enc = torch.compile(make_model(10))  # keys enc._orig_mod.*
    for name, model, seed in (("inner", wrapped, 8), ("outer", outer, 9)):
        savegame.save(tmp_path / name, {"model": model})
        plain = make_model(0)
        assert savegame.load(tmp_path / name, {"model": plain}).clean, name
        assert same(plain, values(make_model(seed))), name
        savegame.save(tmp_path / f"{name}-plain", {"model": make_model(11)})
        assert savegame.load(tmp_path / f"{name}-plain", {"model": model}).clean, name
        assert same(model, values(make_model(11))), name
    savegame.save(tmp_path / "holder", {"model": holder})
    assert list(savegame.load(tmp_path / "holder")["model"]) == [f"enc.{k}" for k in make_model(0).state_dict()]
    other = nn.Module()
    other.enc = make_model(12)
    assert savegame.load(tmp_path / "holder", {"model": other}).clean and same(other.enc, values(make_model(10)))


def test_a_real_mismatch_is_still_reported_under_the_target_names(tmp_path: Path) -> None:
    savegame.save(tmp_path / "c", {"model": make_model(0)})
    compiled = torch.compile(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)))
    with pytest.raises(StateMismatchError, match=r"_orig_mod\.3\.weight \(checkpoint \[2, 8\] vs model \[3, 8\]\)"):
        savegame.load(tmp_path / "c", {"model": compiled})


def steps(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    """``n`` optimizer steps with fixed gradients (no forward pass through a compiled model)."""
    for i in range(n):
        for j, p in enumerate(model.parameters()):
            p.grad = torch.full_like(p, 0.1 * (i + 1) + 0.01 * j)
        opt.step()


def test_the_optimizer_of_a_compiled_model_round_trips_both_ways(tmp_path: Path) -> None:
    compiled = torch.compile(make_model(13))
    opt = torch.optim.AdamW(compiled.parameters(), lr=1e-2)
    steps(compiled, opt, 3)
    with Checkpointer(tmp_path / "run") as ckpt:
        ckpt.save({"model": compiled, "optimizer": opt}, epoch=1)
    plain = make_model(14)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    restored = Checkpointer(tmp_path / "run").restore({"model": plain, "optimizer": plain_opt})
    assert restored is not None and same(plain, values(compiled))
    assert plain_opt.state_dict()["state"][0]["step"] == torch.tensor(3.0)
    steps(compiled, opt, 2)
    steps(plain, plain_opt, 2)
    assert same(plain, values(compiled))  # the training continues identically

    again = torch.compile(make_model(15))
    again_opt = torch.optim.AdamW(again.parameters(), lr=1e-2)
    savegame.save(tmp_path / "plain", {"model": plain, "optimizer": plain_opt})
    assert savegame.load(tmp_path / "plain", {"model": again, "optimizer": again_opt}).clean
    steps(again, again_opt, 1)
    steps(plain, plain_opt, 1)
    assert same(again, values(plain))


@pytest.fixture
def process_group() -> Iterator[None]:
    """A one-process gloo group, so a real DistributedDataParallel can be built."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_real_ddp_of_a_compiled_model_and_compiled_ddp(tmp_path: Path, process_group: None) -> None:
    ddp_of_compiled = nn.parallel.DistributedDataParallel(torch.compile(make_model(16)))
    compiled_ddp = torch.compile(nn.parallel.DistributedDataParallel(make_model(17)))
    assert next(iter(ddp_of_compiled.state_dict())).startswith("module._orig_mod.")
    assert next(iter(compiled_ddp.state_dict())).startswith("_orig_mod.module.")
    savegame.save(tmp_path / "a", {"model": ddp_of_compiled})
    savegame.save(tmp_path / "b", {"model": compiled_ddp})
    plain = make_model(0)
    assert savegame.load(tmp_path / "a", {"model": plain}).clean and same(plain, values(make_model(16)))
    assert savegame.load(tmp_path / "b", {"model": plain}).clean and same(plain, values(make_model(17)))
    assert savegame.load(tmp_path / "a", {"model": compiled_ddp}).clean
    assert same(compiled_ddp, values(make_model(16)))
    assert savegame.load(tmp_path / "b", {"model": ddp_of_compiled}).clean
    assert same(ddp_of_compiled, values(make_model(17)))
