"""Background snapshots of many small tensors: copied in batches (adapters/torch.py ``_SmallCopies``).

The batched copy must store exactly what the per-tensor copy did (every dtype, 0-d, empty,
non-contiguous, tied tensors) and must never be torn: changing the live tensors right after ``save``
returns cannot reach the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import savegame
from savegame.adapters import torch as torch_adapter
from savegame.engine.writer import encode_state

DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
]  # fmt: skip


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)


def _small_state() -> dict[str, object]:
    """Small tensors of every dtype and kind, interleaved with a large one (which takes the other path)."""
    state: dict[str, object] = {}
    for i, dtype in enumerate(DTYPES):
        base = _tensor(dtype, (6, 5), i)
        state[f"{dtype}.plain"] = base
        state[f"{dtype}.scalar"] = _tensor(dtype, (), 100 + i)
        state[f"{dtype}.empty"] = _tensor(dtype, (0, 3), 200 + i)
        state[f"{dtype}.transposed"] = base.t()  # non-contiguous view of a tensor also stored
        state[f"{dtype}.strided"] = base[::2, 1::2]
        state[f"{dtype}.tied"] = base  # the same tensor twice: one entry, an alias
    state["large"] = torch.randn(40_000)  # > SMALL_TENSOR_BYTES
    state["conj"] = torch.randn(4, dtype=torch.complex64).conj()  # lazy conjugate bit
    for i in range(500):
        state[f"many.{i}"] = torch.full((i % 7,), float(i))
    return state


def _assert_same(got: dict[str, object], want: dict[str, object]) -> None:
    assert got.keys() == want.keys()
    for k, w in want.items():
        g = got[k]
        assert isinstance(g, torch.Tensor) and isinstance(w, torch.Tensor), k
        assert g.dtype == w.dtype and g.shape == w.shape, k
        assert torch.equal(g.resolve_conj(), w.resolve_conj()), k


@pytest.mark.parametrize("background", [True, False])
def test_many_small_tensors_round_trip_exactly(tmp_path: Path, background: bool) -> None:
    state = _small_state()
    want = {k: v.clone() for k, v in state.items()}  # type: ignore[union-attr]
    result = savegame.save(tmp_path / "ck", {"t": state}, background=background)
    if background:
        result.result()
    _assert_same(savegame.load(tmp_path / "ck")["t"], want)


def test_a_module_and_optimizer_of_tiny_tensors_round_trip(tmp_path: Path) -> None:
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(50)])
    model[1].weight = model[0].weight  # tied
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    want_m = {k: v.clone() for k, v in model.state_dict().items()}
    want_o = {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state_dict()["state"].items()}
    savegame.save(tmp_path / "ck", {"model": model, "optimizer": opt}, background=True).result()
    fresh = nn.Sequential(*[nn.Linear(3, 3) for _ in range(50)])
    fresh[1].weight = fresh[0].weight
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    savegame.load(tmp_path / "ck", {"model": fresh, "optimizer": fresh_opt})
    _assert_same(dict(fresh.state_dict()), want_m)  # type: ignore[arg-type]
    got_o = fresh_opt.state_dict()["state"]
    for p, s in want_o.items():
        _assert_same(got_o[p], s)
    assert fresh[1].weight is fresh[0].weight


def test_the_snapshot_is_not_torn_by_changes_right_after_save_returns(tmp_path: Path) -> None:
    state = _small_state()
    want = {k: v.clone() for k, v in state.items()}  # type: ignore[union-attr]
    handle = savegame.save(tmp_path / "ck", {"t": state}, background=True)
    with torch.no_grad():
        for v in state.values():
            assert isinstance(v, torch.Tensor)
            if v.numel() and v.dtype != torch.bool:
                v.add_(1)
            elif v.numel():
                v.logical_not_()
    handle.result()
    _assert_same(savegame.load(tmp_path / "ck")["t"], want)


def test_small_tensors_are_copied_in_batches_that_respect_the_size_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_adapter, "_SMALL_BATCH_BYTES", 1000)  # many flushes, several per dtype
    state = {f"x{i}": torch.arange(i % 50, dtype=torch.float32) + i for i in range(300)}
    items = encode_state({"t": state}, copy=True)
    records = {r.data.name: r for r in items[0].records}
    assert records.keys() == state.keys()
    owners = {id(r.keepalive) for k, r in records.items() if state[k].numel()}
    assert 1 < len(owners) < len(records)  # batched: several tensors share one copy, bounded in size
    for key, r in records.items():
        assert bytes(r.data.data) == state[key].numpy().tobytes()
        if state[key].numel():
            assert r.keepalive is not state[key]  # a copy, not the live memory


def test_the_encoder_is_freed_without_the_cycle_collector() -> None:
    """The batch refers back to its encoder; ``finish`` breaks that cycle (else every snapshot's walk
    state, one tuple per tensor, would wait for the collector)."""
    import gc
    import weakref

    from savegame.engine.writer import make_encoder

    enc = make_encoder(copy=True)
    enc.encode({"a": torch.ones(3), "b": torch.zeros(2, 2)}, ("t",))
    enc.finish()
    assert len(enc.records) == 2
    ref = weakref.ref(enc)
    was = gc.isenabled()
    gc.disable()
    try:
        del enc
        assert ref() is None
    finally:
        if was:
            gc.enable()
