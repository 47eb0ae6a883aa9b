"""PyTorch state: every dtype, tied weights, every built-in optimizer, schedulers, scaler, RNG, strictness."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

import savegame
from savegame.errors import StateMismatchError, UnsupportedTypeError

ALL_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128, torch.complex32,
    torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu,
]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (every bit pattern, including nan payloads, must survive)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,), (4, 3)], ids=str)
def test_every_dtype_and_shape_round_trips_bit_exactly(
    tmp_path: Path, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    t = random_tensor(dtype, shape)
    savegame.save(tmp_path / "c", {"x": {"t": t}})
    back = savegame.load(tmp_path / "c")["x"]["t"]
    assert isinstance(back, torch.Tensor)
    assert bits_equal(back, t)


def test_non_contiguous_views_and_parameters(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "t": base.t(),
        "slice": base[:, ::2],
        "p": nn.Parameter(torch.ones(3)),
        "frozen": nn.Parameter(torch.zeros(2), requires_grad=False),
    }
    savegame.save(tmp_path / "c", {"x": state})
    back = savegame.load(tmp_path / "c")["x"]
    assert torch.equal(back["t"], base.t()) and torch.equal(back["slice"], base[:, ::2])
    assert type(back["p"]) is nn.Parameter and back["p"].requires_grad
    assert type(back["frozen"]) is nn.Parameter and not back["frozen"].requires_grad


def test_torch_scalars_dtypes_sizes_devices(tmp_path: Path) -> None:
    state = {"dt": torch.bfloat16, "size": torch.Size([2, 3]), "dev": torch.device("cpu")}
    savegame.save(tmp_path / "c", {"x": state})
    assert savegame.load(tmp_path / "c")["x"] == state


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight


def test_tied_weights_are_stored_once_and_come_back_tied(tmp_path: Path) -> None:
    model = Tied()
    savegame.save(tmp_path / "c", {"model": model})
    manifest = savegame.read_manifest(tmp_path / "c")
    assert manifest.files["model.safetensors"].bytes < 50 * 16 * 4 + 1024  # one copy, not two
    state = savegame.load(tmp_path / "c")["model"]
    assert state["embed.weight"] is state["head.weight"]
    fresh = Tied()
    savegame.load(tmp_path / "c", {"model": fresh})
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.embed.weight, model.embed.weight)


def test_tensor_files_open_with_plain_safetensors(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    savegame.save(tmp_path / "c", {"model": model})
    with safe_open(str(tmp_path / "c" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert keys == set(model.state_dict())
        for k, v in model.state_dict().items():
            assert torch.equal(f.get_tensor(k), v)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.BatchNorm1d(16), nn.Linear(16, 3))


OPTIMIZERS: dict[str, Any] = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "Adamax": lambda p: torch.optim.Adamax(p, lr=1e-2),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "RAdam": lambda p: torch.optim.RAdam(p, lr=1e-2),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "Adadelta": lambda p: torch.optim.Adadelta(p),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, centered=True),
    "Rprop": lambda p: torch.optim.Rprop(p, lr=1e-2),
    "ASGD": lambda p: torch.optim.ASGD(p, lr=1e-2),
    "LBFGS": lambda p: torch.optim.LBFGS(p, lr=0.1, history_size=3, max_iter=3),
    "SparseAdam-free Adafactor": lambda p: torch.optim.Adafactor(p, lr=1e-2),
}


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, n: int, start: int) -> None:
    g = torch.Generator().manual_seed(1234 + start)
    for _ in range(n):
        x = torch.randn(8, 6, generator=g)
        y = torch.randint(0, 3, (8,), generator=g)

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_resumes_bit_identically(tmp_path: Path, name: str) -> None:
    make_opt = OPTIMIZERS[name]
    # Reference: k + 1 steps without saving.
    ref = make_model()
    ref_opt = make_opt(ref.parameters())
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    train_steps(ref, ref_opt, ref_sched, 3, 0)
    train_steps(ref, ref_opt, ref_sched, 1, 3)

    # Run: k steps, save, load into fresh objects, one more step.
    run = make_model()
    run_opt = make_opt(run.parameters())
    run_sched = torch.optim.lr_scheduler.StepLR(run_opt, step_size=2, gamma=0.5)
    train_steps(run, run_opt, run_sched, 3, 0)
    savegame.save(tmp_path / "c", {"model": run, "optimizer": run_opt, "scheduler": run_sched, "epoch": 3})

    fresh = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.BatchNorm1d(16), nn.Linear(16, 3))
    fresh_opt = make_opt(fresh.parameters())
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=2, gamma=0.5)
    report = savegame.load(tmp_path / "c", {"model": fresh, "optimizer": fresh_opt, "scheduler": fresh_sched})
    assert report.state == {"epoch": 3}
    assert report.clean
    train_steps(fresh, fresh_opt, fresh_sched, 1, 3)
    for (k, a), b in zip(ref.state_dict().items(), fresh.state_dict().values()):
        assert bits_equal(a, b), k
    assert fresh_sched.state_dict() == ref_sched.state_dict()


def test_schedulers_and_grad_scaler_round_trip(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheds = {
        "onecycle": torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=100),
        "plateau": torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1),
        "cosine": torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=3),
    }
    for _ in range(5):
        opt.step()
        scheds["onecycle"].step()
        scheds["cosine"].step()
        scheds["plateau"].step(1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))  # what the first scaler.scale() does
    state = {"scheds": scheds, "scaler": scaler}
    savegame.save(tmp_path / "c", state)

    opt2 = torch.optim.SGD(make_model().parameters(), lr=0.1)
    scheds2 = {
        "onecycle": torch.optim.lr_scheduler.OneCycleLR(opt2, max_lr=0.5, total_steps=100),
        "plateau": torch.optim.lr_scheduler.ReduceLROnPlateau(opt2, patience=1),
        "cosine": torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt2, T_0=3),
    }
    scaler2 = torch.amp.GradScaler("cpu", init_scale=1.0)
    savegame.load(tmp_path / "c", {"scheds": scheds2, "scaler": scaler2})
    for k in scheds:
        assert scheds2[k].state_dict() == scheds[k].state_dict(), k
    assert scaler2.get_scale() == scaler.get_scale() == 1024.0
    assert scaler2.state_dict() == scaler.state_dict()


def test_rng_state_reproduces_the_same_draws(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    [random.random(), np.random.rand(), torch.rand(1)]  # advance a little
    gen = np.random.default_rng(7)
    tgen = torch.Generator().manual_seed(9)
    pyrng = random.Random(5)
    savegame.save(tmp_path / "c", {"rng": savegame.RNGState(), "gens": {"np": gen, "torch": tgen, "py": pyrng}})
    expected = (random.random(), np.random.rand(), torch.rand(3), gen.random(), torch.rand(2, generator=tgen),
                pyrng.random(), np.random.normal())
    random.seed(100)
    np.random.seed(100)
    torch.manual_seed(100)
    gen2 = np.random.default_rng(0)
    tgen2 = torch.Generator().manual_seed(0)
    pyrng2 = random.Random(0)
    savegame.load(tmp_path / "c", {"rng": savegame.RNGState(), "gens": {"np": gen2, "torch": tgen2, "py": pyrng2}})
    got = (random.random(), np.random.rand(), torch.rand(3), gen2.random(), torch.rand(2, generator=tgen2),
           pyrng2.random(), np.random.normal())
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    assert got[3] == expected[3] and torch.equal(got[4], expected[4]) and got[5] == expected[5]
    assert got[6] == expected[6]


def test_strict_load_reports_and_changes_nothing(tmp_path: Path) -> None:
    src = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    savegame.save(tmp_path / "c", {"model": src})
    other = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Linear(3, 1))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(StateMismatchError) as info:
        savegame.load(tmp_path / "c", {"model": other})
    msg = str(info.value)
    assert "3.weight" in msg and "2.weight" in msg and "[2, 8]" in msg
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k])  # nothing was loaded
    report = savegame.load(tmp_path / "c", {"model": other}, strict=False)
    assert report.missing_keys == ["model.3.weight", "model.3.bias"]
    assert [k for k, _, _ in report.mismatched_keys] == ["model.2.weight", "model.2.bias"]
    assert torch.equal(other[0].weight, src[0].weight)  # the matching layer was loaded


class _Versioned(nn.Module):
    """A module whose _load_from_state_dict rewrites the state (like BatchNorm's version upgrade)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        state_dict[prefix + "w"] = state_dict[prefix + "w"] * 2
        super()._load_from_state_dict(state_dict, prefix, *args)


def test_module_restore_copies_directly_only_when_load_state_dict_would_do_nothing_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plain module trees are restored by copying into each parameter (torch's load_state_dict re-filters
    the state dict for every submodule); anything that customises loading still goes through it."""
    calls: list[str] = []
    original = nn.Module.load_state_dict

    def counting(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        calls.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "load_state_dict", counting)
    src = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), _Versioned())
    src[0].weight.data.normal_()
    src[1].running_mean.add_(3.0)
    src[2].w.data.fill_(1.5)
    savegame.save(tmp_path / "c", {"plain": src[0], "bn": src[1], "custom": src[2]})

    plain = nn.Linear(4, 8).double()  # a copy_ converts dtypes, as load_state_dict does
    savegame.load(tmp_path / "c", {"plain": plain})
    assert calls == []
    assert torch.equal(plain.weight, src[0].weight.double()) and plain.weight.dtype == torch.float64
    assert plain.weight.requires_grad and isinstance(plain.weight, nn.Parameter)

    bn = nn.BatchNorm1d(8)
    savegame.load(tmp_path / "c", {"bn": bn})  # overrides _load_from_state_dict: torch's path
    assert calls == ["BatchNorm1d"] and torch.equal(bn.running_mean, src[1].running_mean)

    custom = _Versioned()
    savegame.load(tmp_path / "c", {"custom": custom})
    assert calls[-1] == "_Versioned" and torch.equal(custom.w, torch.full((3,), 3.0))  # its rewrite ran

    hooked = nn.Linear(4, 8)
    seen: list[str] = []
    hooked.register_load_state_dict_post_hook(lambda module, keys: seen.append("post"))
    savegame.load(tmp_path / "c", {"plain": hooked})
    assert seen == ["post"] and torch.equal(hooked.weight, src[0].weight)

    lazy = nn.LazyLinear(8)  # initialised by a load-state-dict pre-hook
    savegame.load(tmp_path / "c", {"plain": lazy}, strict=False)
    assert torch.equal(lazy.weight, src[0].weight)


def test_missing_item_in_checkpoint_is_strict(tmp_path: Path) -> None:
    model = make_model()
    savegame.save(tmp_path / "c", {"model": model})
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(StateMismatchError, match="optimizer"):
        savegame.load(tmp_path / "c", {"model": model, "optimizer": opt})
    report = savegame.load(tmp_path / "c", {"model": model, "optimizer": opt}, strict=False)
    assert report.missing_keys == ["optimizer"]


def test_ddp_prefix_loads_both_ways(tmp_path: Path) -> None:
    plain = make_model()
    wrapped = nn.Module()
    wrapped.module = make_model()  # what DistributedDataParallel's state_dict keys look like
    for p in wrapped.parameters():
        p.data.add_(1.0)
    savegame.save(tmp_path / "ddp", {"model": wrapped})
    savegame.load(tmp_path / "ddp", {"model": plain})
    assert torch.equal(plain[0].weight, wrapped.module[0].weight)
    savegame.save(tmp_path / "plain", {"model": make_model()})
    savegame.load(tmp_path / "plain", {"model": wrapped})
    assert torch.equal(wrapped.module[0].weight, make_model()[0].weight)


def test_map_location(tmp_path: Path) -> None:
    savegame.save(tmp_path / "c", {"x": {"t": torch.ones(2)}})
    assert savegame.load(tmp_path / "c", map_location="cpu")["x"]["t"].device.type == "cpu"
    seen = []

    def fn(t: torch.Tensor, saved: str) -> torch.Tensor:
        seen.append(saved)
        return t.double()

    assert savegame.load(tmp_path / "c", map_location=fn)["x"]["t"].dtype == torch.float64
    assert seen == ["cpu"]
    assert savegame.load(tmp_path / "c", map_location={"cpu": "cpu"})["x"]["t"].device.type == "cpu"


@pytest.mark.parametrize("where", ["gpu", "cuda:99", {"cpu": "cuda:99"}, 5.5])
def test_a_map_location_this_machine_lacks_is_a_config_error_and_changes_nothing(tmp_path: Path, where: Any) -> None:
    """An unknown device string, a GPU this machine does not have (a CPU-only torch: no CUDA at all): a
    ConfigError naming map_location (once torch's AssertionError or RuntimeError), the live model untouched."""
    if torch.cuda.device_count() > 99:
        pytest.skip("this machine has a cuda:99")
    model = nn.Linear(3, 2)
    savegame.save(tmp_path / "c", {"model": model})
    with torch.no_grad():
        model.weight.add_(1.0)
    before = copy.deepcopy(model.state_dict())
    for target in (None, {"model": model}):
        with pytest.raises(savegame.ConfigError, match="map_location"):
            savegame.load(tmp_path / "c", target, map_location=where)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def _boom(t: torch.Tensor, saved: str) -> torch.Tensor:
    raise ValueError("boom")


@pytest.mark.parametrize(
    ("where", "message"),
    [
        (lambda t, saved: None, r"m\.w: the map_location callable returned NoneType"),
        (lambda t, saved: "x", r"m\.w: the map_location callable returned str"),
        (lambda t, saved: t[:1], r"m\.w: the map_location callable returned a tensor of shape \[1\]"),
        (lambda t, saved: t.to("meta"), r"returned a tensor of shape \[3\] on meta"),
        (_boom, r"m\.w: the map_location callable failed .*ValueError: boom"),
        (lambda t: t, r"m\.w: the map_location callable failed .*TypeError"),
        ("meta", r"m\.w: map_location='meta' places it on the 'meta' device, which holds no data"),
    ],
)  # fmt: skip
def test_a_map_location_that_cannot_place_a_tensor_is_a_config_error(tmp_path: Path, where: Any, message: str) -> None:
    """A callable returning None, a string or a tensor of another shape was accepted (a state of Nones);
    one that raised escaped bare, naming no tensor; ``"meta"`` gave tensors without data (into a live
    model: torch's bare NotImplementedError). Each is a ConfigError naming the tensor; the model is kept."""
    savegame.save(tmp_path / "c", {"m": {"w": torch.ones(3)}})
    live = {"m": {"w": torch.zeros(3)}}
    for target in (None, live):
        with pytest.raises(savegame.ConfigError, match=message):
            savegame.load(tmp_path / "c", target, map_location=where)
    assert torch.equal(live["m"]["w"], torch.zeros(3))


def test_loaded_tensors_are_writable_and_independent_of_the_file(tmp_path: Path) -> None:
    savegame.save(tmp_path / "c", {"x": {"t": torch.zeros(4)}})
    t = savegame.load(tmp_path / "c")["x"]["t"]
    t += 1
    assert torch.equal(savegame.load(tmp_path / "c")["x"]["t"], torch.zeros(4))
    savegame.verify(tmp_path / "c")


def test_user_stateful_objects(tmp_path: Path) -> None:
    class Counter:
        def __init__(self) -> None:
            self.n = 0
            self.hist = torch.zeros(3)

        def state_dict(self) -> dict[str, Any]:
            return {"n": self.n, "hist": self.hist}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.n = state["n"]
            self.hist = state["hist"].clone()

    c = Counter()
    c.n, c.hist = 5, torch.tensor([1.0, 2.0, 3.0])
    assert isinstance(c, savegame.Stateful)
    savegame.save(tmp_path / "c", {"counter": c})
    c2 = Counter()
    savegame.load(tmp_path / "c", {"counter": c2})
    assert c2.n == 5 and torch.equal(c2.hist, c.hist)


def test_unsupported_tensors_are_refused_with_path(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedTypeError, match=r"^x\.q: cannot store dtype torch\.quint8"):
        savegame.save(tmp_path / "c", {"x": {"q": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8)}})
    with pytest.raises(UnsupportedTypeError, match="sparse"):
        savegame.save(tmp_path / "c", {"x": torch.eye(3).to_sparse()})
    with pytest.raises(UnsupportedTypeError, match="meta"):
        savegame.save(tmp_path / "c", {"x": torch.empty(3, device="meta")})
    assert not (tmp_path / "c").exists()


def test_seed_000_usage_works(tmp_path: Path) -> None:
    """The hand-written dict of seed 000, saved and loaded the same way, without pickle."""
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters())
    checkpoint = {
        "epoch": 4,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "loss": 0.25,
    }
    savegame.save(tmp_path / "model_checkpoint", checkpoint)
    checkpoint = savegame.load(tmp_path / "model_checkpoint")
    model.load_state_dict(checkpoint["model_state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
    assert checkpoint["epoch"] == 4 and checkpoint["loss"] == 0.25


class _Fresh:
    """A Stateful whose ``state_dict()`` makes a new non-contiguous array on every call (freed once copied)."""

    def __init__(self, value: int, kind: str) -> None:
        self.value = value
        self.kind = kind
        self.got: Any = None

    def state_dict(self) -> dict[str, Any]:
        if self.kind == "numpy":
            return {"x": np.full((64, 64), float(self.value), np.float32).T}
        size = 64 if self.kind == "torch" else 8  # 8x8: the batched small-tensor copy of a snapshot
        return {"x": torch.full((size, size), float(self.value)).t()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.got = state["x"]


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("kind", ["torch", "small", "numpy"])
def test_arrays_made_on_the_fly_are_never_taken_for_aliases(tmp_path: Path, kind: str, background: bool) -> None:
    """An alias is found by address: an array a state_dict() made and that was freed once copied left its
    address to the next one of the same shape, which was stored as the first one's bytes (values 0, 1, 1,
    1...; verify passed). The encoder keeps what it recorded alive until the walk is over."""
    objects = [_Fresh(i, kind) for i in range(20)]
    result = savegame.save(tmp_path / "c", {"s": objects}, background=background)
    if background:
        result.result()
    loaded = savegame.load(tmp_path / "c")["s"]
    assert [float(entry["x"][0, 0]) for entry in loaded] == [float(i) for i in range(20)]
    back = [_Fresh(-1, kind) for _ in range(20)]
    savegame.load(tmp_path / "c", {"s": back})
    assert [float(b.got[0, 0]) for b in back] == [float(i) for i in range(20)]


def test_a_parameter_and_its_detached_view_keep_their_own_types(tmp_path: Path) -> None:
    """One memory reached as a Parameter and as ``p.detach()`` is stored once; it came back as one object,
    with the type and requires_grad of whichever came first."""
    w = nn.Parameter(torch.arange(4.0))
    x = torch.randn(3, requires_grad=True)
    savegame.save(tmp_path / "c", {"s": {"snap": w.detach(), "w": w, "pair": [x, x.detach()]}})
    loaded = savegame.load(tmp_path / "c")["s"]
    assert type(loaded["w"]) is nn.Parameter and loaded["w"].requires_grad
    assert type(loaded["snap"]) is torch.Tensor and not loaded["snap"].requires_grad
    assert [t.requires_grad for t in loaded["pair"]] == [True, False]
    assert loaded["snap"].data_ptr() == loaded["w"].data_ptr()  # still one memory
    assert torch.equal(loaded["w"].detach(), torch.arange(4.0))


def test_lazy_conjugate_and_negative_views_are_stored_as_their_values(tmp_path: Path) -> None:
    """``x.conj()`` and ``x.conj().imag`` have x's address, shape and strides: taken for aliases, they loaded
    as x (unconjugated) and as x.imag; a negative view of a real tensor could not be saved at all."""
    x = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    state = {"x": x, "conj": x.conj(), "imag": x.imag, "conj_imag": x.conj().imag}
    savegame.save(tmp_path / "c", {"s": state})
    loaded = savegame.load(tmp_path / "c")["s"]
    for name, value in state.items():
        assert torch.equal(loaded[name], value.resolve_conj().resolve_neg()), name
