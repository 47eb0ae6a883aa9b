"""Background snapshots of modules from their live tensors (adapters/torch_modules.py ``encode_module``).

A snapshot of a plain module skips ``state_dict()`` (one ``detach()`` per tensor) and reads the
parameters and persistent buffers directly. It must store exactly what encoding ``state_dict()``
stores (same skeleton, same keys, same bytes), and it must fall back to ``state_dict()`` whenever that
could do anything else: state-dict hooks, an overridden ``state_dict`` / ``_save_to_state_dict`` /
``get_extra_state`` anywhere in the tree.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import savegame
from savegame.adapters import torch as torch_adapter
from savegame.adapters import torch_modules
from savegame.engine.writer import encode_state


class Mixed(nn.Module):
    """Parameters and buffers of many dtypes and kinds, tied and shared, small and large."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.bn = nn.BatchNorm1d(3)  # running stats and an int64 counter
        self.shared = nn.Linear(2, 2)
        self.again = self.shared  # the same submodule twice: state_dict lists it under both names
        self.tied = nn.Linear(5, 3)
        self.tied.weight = self.lin.weight
        self.big = nn.Parameter(torch.randn(40_000))  # > SMALL_TENSOR_BYTES: the per-tensor path
        self.bf16 = nn.Parameter(torch.randn(4, 4).to(torch.bfloat16))
        self.frozen = nn.Parameter(torch.randn(3), requires_grad=False)
        self.cplx = nn.Parameter(torch.randn(3, dtype=torch.complex64))
        self.register_buffer("mask", torch.rand(7) > 0.5)
        self.register_buffer("ints", torch.arange(6, dtype=torch.int16).reshape(2, 3).t())  # strided
        self.register_buffer("scalar", torch.tensor(3.5, dtype=torch.float64))
        self.register_buffer("empty", torch.zeros(0, 4))
        self.register_buffer("none", None)
        self.register_buffer("scratch", torch.ones(3), persistent=False)  # not in state_dict
        self.register_parameter("opt_out", None)
        self.blocks = nn.ModuleList([nn.Linear(3, 3) for _ in range(3)] + [None])  # type: ignore[list-item]


def _encode(module: nn.Module) -> tuple[Any, dict[str, tuple[str, tuple[int, ...], bytes]]]:
    (item,) = encode_state({"m": module}, copy=True)
    return item.skeleton, {r.data.name: (r.data.code, r.data.shape, bytes(r.data.data)) for r in item.records}


def _encode_state_dict(module: nn.Module) -> tuple[Any, dict[str, tuple[str, tuple[int, ...], bytes]]]:
    """What the snapshot of ``module`` must equal: the encoding of its ``state_dict()`` as a plain dict."""
    (item,) = encode_state({"m": dict(module.state_dict())}, copy=True)
    return item.skeleton, {r.data.name: (r.data.code, r.data.shape, bytes(r.data.data)) for r in item.records}


def test_a_plain_module_is_read_from_its_live_tensors() -> None:
    m = Mixed()
    live = torch_modules.live_state(m)
    assert live is not None
    assert list(live) == list(m.state_dict())  # same keys, same order
    assert all(live[k] is v for k, v in m.state_dict(keep_vars=True).items())  # the live tensors, no detach


def test_the_snapshot_stores_what_state_dict_stores() -> None:
    m = Mixed()
    assert _encode(m) == _encode_state_dict(m)


def test_a_compiled_style_name_is_stored_without_orig_mod() -> None:
    outer = nn.Module()
    outer._orig_mod = nn.Linear(2, 2)  # what torch.compile's wrapper holds
    skeleton, records = _encode(outer)
    assert set(skeleton) == {"weight", "bias"}
    assert set(records) == {"weight", "bias"}


def test_every_small_dtype_round_trips(tmp_path: Path) -> None:
    m = nn.Module()
    dtypes = [d for d in torch_adapter._BATCHABLE]
    for i, dtype in enumerate(dtypes):
        m.register_buffer(f"b{i}", torch.randint(0, 2, (3, 2), dtype=torch.uint8).view(torch.uint8).to(dtype)
                          if dtype.itemsize == 1 else torch.randint(0, 50, (3, 2)).to(dtype))  # fmt: skip
    assert _encode(m) == _encode_state_dict(m)
    savegame.save(tmp_path / "c", {"m": m}, background=True).result()
    got = savegame.load(tmp_path / "c")["m"]
    for k, v in m.state_dict().items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        assert got[k].view(torch.uint8).equal(v.contiguous().view(torch.uint8)), k


def test_the_snapshot_is_not_torn_by_changes_after_save_returns(tmp_path: Path) -> None:
    m = Mixed()
    want = {k: v.clone() for k, v in m.state_dict().items()}
    handle = savegame.save(tmp_path / "c", {"m": m}, background=True)
    with torch.no_grad():
        for t in m.state_dict(keep_vars=True).values():
            if t.is_floating_point() or t.is_complex():
                t.add_(1)
            else:
                t.zero_()
    handle.result()
    got = savegame.load(tmp_path / "c")["m"]
    assert got.keys() == want.keys()
    for k, w in want.items():
        assert type(got[k]) is torch.Tensor and not got[k].requires_grad, k  # stored detached, as state_dict
        assert got[k].equal(w), k


# --- fallbacks: whenever state_dict() could do more than detach ---------------------------------------


def _post_hook(module: nn.Module, state: dict[str, Any], prefix: str, local: Any) -> None:
    state[prefix + "weight"] = state[prefix + "weight"] * 0 + 7


class CustomStateDict(nn.Linear):
    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        out = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        out[prefix + "extra"] = torch.tensor([1.0, 2.0])
        return out


class CustomSave(nn.Linear):
    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = destination[prefix + "weight"] + 1


class ExtraState(nn.Linear):
    def get_extra_state(self) -> Any:
        return torch.tensor([42.0])

    def set_extra_state(self, state: Any) -> None:
        pass


def _with_post_hook() -> nn.Module:
    m = nn.Sequential(nn.Linear(2, 2))
    m[0]._register_state_dict_hook(_post_hook)
    return m


def _with_public_post_hook() -> nn.Module:
    m = nn.Sequential(nn.Linear(2, 2))
    if not hasattr(m[0], "register_state_dict_post_hook"):
        pytest.skip("this torch has no public state_dict post hooks")
    m[0].register_state_dict_post_hook(lambda mod, sd, prefix, local: sd.__setitem__(prefix + "added", torch.ones(2)))
    return m


def _with_pre_hook(calls: list[str] | None = None) -> nn.Module:
    m = nn.Sequential(nn.Linear(2, 2))
    seen = [] if calls is None else calls
    m[0].register_state_dict_pre_hook(lambda module, prefix, keep_vars: seen.append(prefix))
    return m


FALLBACKS = {
    "post hook": _with_post_hook,
    "public post hook": _with_public_post_hook,
    "pre hook": _with_pre_hook,  # (its call is checked below: it does not change the state)
    "custom state_dict": lambda: nn.Sequential(nn.ReLU(), CustomStateDict(2, 2)),
    "custom _save_to_state_dict": lambda: nn.Sequential(CustomSave(2, 2)),
    "extra state": lambda: nn.Sequential(ExtraState(2, 2)),
}


@pytest.mark.parametrize("make", FALLBACKS.values(), ids=list(FALLBACKS))
def test_modules_whose_state_dict_does_more_are_not_read_live(make: Any) -> None:
    assert torch_modules.live_state(make()) is None


@pytest.mark.parametrize("make", FALLBACKS.values(), ids=list(FALLBACKS))
def test_modules_whose_state_dict_does_more_save_what_it_gives(make: Any, tmp_path: Path) -> None:
    m = make()
    want = OrderedDict((k, v.clone()) for k, v in m.state_dict().items())
    savegame.save(tmp_path / "c", {"m": m}, background=True).result()
    got = savegame.load(tmp_path / "c")["m"]
    assert list(got) == list(want)
    for k, w in want.items():
        assert got[k].equal(w), k


def test_a_registered_adapter_in_front_still_decides(tmp_path: Path) -> None:
    """An adapter registered for a module class is asked first; the fast path is the torch adapter's."""
    from savegame.adapters.registry import BaseAdapter, register, unregister

    class Only(nn.Linear):
        pass

    class OnlyAdapter(BaseAdapter):
        def handles(self, obj: object) -> bool:
            return isinstance(obj, Only)

        def kind(self, obj: object) -> str:
            return "only"

        def capture(self, obj: object, where: str) -> object:
            return {"w": torch.zeros(2)}

        def restore(self, target: object, state: object, *, strict: bool, where: str, report: Any) -> None:
            pass

    adapter = OnlyAdapter()
    register(adapter)
    try:
        savegame.save(tmp_path / "c", {"m": Only(2, 2)}, background=True).result()
    finally:
        unregister(adapter)
    assert list(savegame.load(tmp_path / "c")["m"]) == ["w"]


def test_a_state_dict_pre_hook_runs_on_a_background_save(tmp_path: Path) -> None:
    calls: list[str] = []
    m = _with_pre_hook(calls)
    savegame.save(tmp_path / "c", {"m": m}, background=True).result()
    assert calls == ["0."]


def test_a_tensor_of_the_module_elsewhere_in_the_item_stays_tied() -> None:
    """Aliases are found across the live walk and the codec's own tensor path (same view identity)."""
    m = Mixed()
    (fast,) = encode_state({"x": {"m": m, "w": m.lin.weight, "t": m.ints}}, copy=True)
    (plain,) = encode_state({"x": {"m": dict(m.state_dict()), "w": m.lin.weight, "t": m.ints}}, copy=True)
    assert fast.skeleton == plain.skeleton
    assert fast.skeleton["w"]["key"] == fast.skeleton["m"]["lin.weight"]["key"]
    assert fast.skeleton["t"]["key"] == fast.skeleton["m"]["ints"]["key"]
    assert sorted(r.data.name for r in fast.records) == sorted(r.data.name for r in plain.records)


def test_records_built_on_the_writer_thread_are_the_records_built_at_once() -> None:
    """A snapshot's small-tensor records are built when first read (the writer thread), not in the
    save call; they are exactly those an encoder that builds them at once gives."""
    from savegame.engine.writer import make_encoder

    m = Mixed()
    (item,) = encode_state({"m": m}, copy=True)
    assert item._pending  # nothing built yet
    enc = make_encoder(copy=True)
    enc.encode(m, ("m",))
    enc.finish()
    assert not enc.deferred
    want = {r.data.name: (r.data.code, r.data.shape, bytes(r.data.data)) for r in enc.records}
    assert {r.data.name: (r.data.code, r.data.shape, bytes(r.data.data)) for r in item.records} == want
    assert not item._pending and item.nbytes == sum(len(v[2]) for v in want.values())


def test_full_batches_are_copied_during_the_walk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Batches reaching their bound mid-walk (here a few tensors each), with shapes interleaved and
    repeated, store what state_dict() stores and are not torn by later changes."""
    monkeypatch.setattr(torch_adapter, "_SMALL_BATCH_BYTES", 64)
    m = nn.Module()
    for i in range(60):
        shape = [(3,), (2, 2), (5,)][i % 3] if i < 30 else (4,)
        m.register_parameter(f"p{i}", nn.Parameter(torch.randn(*shape)))
    m.tied = m.p3
    assert _encode(m) == _encode_state_dict(m)
    want = {k: v.clone() for k, v in m.state_dict().items()}
    handle = savegame.save(tmp_path / "c", {"m": m}, background=True)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(-1)
    handle.result()
    got = savegame.load(tmp_path / "c")["m"]
    assert got.keys() == want.keys() and all(got[k].equal(w) for k, w in want.items())


# --- the walk's fast paths: names taken as they are, identities noted, copies on the snapshot worker ---------


def _blob(n: int = 40) -> nn.Module:
    """Many small parameters, no two sharing memory (the walk notes their identities without a lookup)."""
    torch.manual_seed(3)
    m = nn.Module()
    m.params = nn.ParameterList([nn.Parameter(torch.randn(*[(8,), (2, 3), (5,)][i % 3])) for i in range(n)])
    return m


def test_a_tensor_of_an_untied_module_later_in_the_item_is_an_alias() -> None:
    """The identities the walk only noted are found by a later lookup of the same item (both orders)."""
    m = _blob()
    for order in (("m", "w"), ("w", "m")):
        value = {k: m if k == "m" else m.params[4] for k in order}
        (fast,) = encode_state({"x": value}, copy=True)
        (plain,) = encode_state({"x": {k: dict(m.state_dict()) if k == "m" else m.params[4] for k in order}}, copy=True)
        assert fast.skeleton == plain.skeleton
        assert fast.skeleton["w"]["key"] == fast.skeleton["m"]["params.4"]["key"]
        assert len(fast.records) == len(plain.records) == 40


def test_two_modules_of_one_item_sharing_a_submodule_store_it_once() -> None:
    """The second module's walk sees the first one's noted identities (its shared tensors are aliases)."""
    first = _blob(9)
    second = nn.Sequential(nn.Linear(2, 2), first.params)  # first's parameters again, under other names
    (fast,) = encode_state({"x": {"a": first, "b": second}}, copy=True)
    (plain,) = encode_state({"x": {"a": dict(first.state_dict()), "b": dict(second.state_dict())}}, copy=True)
    assert fast.skeleton == plain.skeleton
    assert fast.skeleton["b"]["1.3"]["key"] == fast.skeleton["a"]["params.3"]["key"] == "a.params.3"
    assert len(fast.records) == len(plain.records) == 9 + 2


def test_views_at_one_address_are_aliases_only_when_identical() -> None:
    """A small tensor whose first element repeats an earlier one's address is looked up: an identical
    view is stored once, a different view of the same start (shorter, strided) is stored as itself."""
    m = _blob(6)
    base = torch.arange(12.0)
    m.register_buffer("a", base)
    m.register_buffer("head", base[:4])  # same address, other shape
    m.register_buffer("again", base.view(12))  # the same view: an alias of "a"
    m.register_buffer("every_other", base[::2])  # same address, strided
    m.register_buffer("after", torch.ones(3))  # after the walk turned to lookups
    skeleton, records = _encode(m)
    assert (skeleton, records) == _encode_state_dict(m)
    assert skeleton["again"]["key"] == skeleton["a"]["key"]
    assert len({skeleton[k]["key"] for k in ("a", "head", "every_other", "after")}) == 4


def test_names_already_taken_in_the_item_get_the_codec_suffixes() -> None:
    """When a module's names are not free (an earlier key of the item, the format's reserved name), each
    goes through reserve_name in order and gets the suffix the codec's own path gives it."""
    m = _blob(4)
    taken = torch.zeros(2)
    (fast,) = encode_state({"x": {"m.params.1": taken, "m": m}}, copy=True)
    (plain,) = encode_state({"x": {"m.params.1": taken, "m": dict(m.state_dict())}}, copy=True)
    assert fast.skeleton == plain.skeleton
    assert fast.skeleton["m"]["params.1"]["key"] == "m.params.1#2"
    reserved = nn.Module()
    reserved.register_parameter("__metadata__", nn.Parameter(torch.ones(2)))
    reserved.register_buffer("b", torch.zeros(3))
    skeleton, records = _encode(reserved)
    assert (skeleton, records) == _encode_state_dict(reserved)
    assert skeleton["__metadata__"]["key"] == "__metadata__#2"


def _changed_after_return(m: nn.Module) -> None:
    """Every way of changing a parameter behind the snapshot's back: in place, through ``.data``, through a
    NumPy view, and by swapping its memory (``.data =``: the old memory may then be freed and reused)."""
    params = list(m.parameters())
    with torch.no_grad():
        for i, p in enumerate(params):
            kind = i % 4
            if kind == 0:
                p.mul_(-2).add_(1)
            elif kind == 1:
                p.data.fill_(7.0)
            elif kind == 2:
                p.detach().numpy()[...] = -5.0
            else:
                p.data = torch.full_like(p, 9.0)


@pytest.mark.parametrize("snapshot", ["eager", "lazy"])
def test_copies_on_the_snapshot_worker_are_done_before_save_returns(
    snapshot: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The batched copies of small tensors run on the snapshot worker, here late (each one waits first): a
    save that returned before they finished would store the changes made right after it returned. Lazy
    snapshots copy small tensors eagerly too (their ``.data`` and NumPy writes are invisible to version
    counters)."""
    import time

    real = torch_adapter._stack

    def late(tensors: list[torch.Tensor], out: torch.Tensor) -> None:
        time.sleep(0.05)
        real(tensors, out)

    monkeypatch.setattr(torch_adapter, "_stack", late)
    monkeypatch.setattr(torch_adapter, "_SMALL_BATCH_BYTES", 200)  # several batches, interleaved shapes
    m = _blob()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    want = {k: v.clone() for k, v in m.state_dict().items()}
    handle = savegame.save(tmp_path / "c", {"m": m, "opt": opt}, background=True, snapshot=snapshot)
    _changed_after_return(m)
    handle.result()
    got = savegame.load(tmp_path / "c")["m"]
    assert list(got) == list(want)
    for k, w in want.items():
        assert got[k].equal(w), k


def test_a_background_save_inside_inference_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tensors made and saved under ``torch.inference_mode`` (an evaluation loop): the snapshot worker, a
    thread outside inference mode, writes into buffers wrapped as normal tensors (torch refuses an
    in-place write to an inference tensor there), small batches and large tensors alike."""
    monkeypatch.setattr(torch_adapter, "_SMALL_BATCH_BYTES", 200)  # full batches go to the worker
    with torch.inference_mode():
        m = nn.Module()
        for i in range(30):
            m.register_buffer(f"b{i}", torch.randn(8))
        m.register_buffer("big", torch.randn(100_000))  # over the small limit: CopyQueue.add's path
        want = {k: v.clone() for k, v in m.state_dict().items()}
        handle = savegame.save(tmp_path / "c", {"m": m}, background=True)
        for v in m.state_dict().values():
            v.add_(1)
        handle.result()
    got = savegame.load(tmp_path / "c")["m"]
    assert list(got) == list(want) and all(got[k].equal(w) for k, w in want.items())
