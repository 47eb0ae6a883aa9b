"""Issue 15 item 9: ``restore(state)`` and ``load(path, target)`` update the plain entries of the state in
place, the way ``torch.distributed.checkpoint.load`` does: dicts and lists filled in place, other values
replaced in the dict or list holding them; missing keys and type mismatches follow the strict rules."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import savegame
from savegame.errors import StateMismatchError
from savegame.run.checkpointer import Checkpointer, ResumeWarning


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def trained(steps: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A real model and Adam optimizer after ``steps`` training steps."""
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt


def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(1)
    model = make_model()
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def same_model(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_checkpointer_restore_updates_the_plain_entries_of_state(tmp_path: Path) -> None:
    model, opt = trained(11)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save({"model": model, "optimizer": opt, "meta": {"step": 11, "lr": 0.01}, "epoch": 3,
                   "history": [0.9, 0.5, 0.25], "pair": (1, 2), "best": 0.25}, epoch=3, step=11)  # fmt: skip
    new_model, new_opt = fresh()
    meta: dict[str, Any] = {"step": 0}
    history: list[float] = []
    state = {"model": new_model, "optimizer": new_opt, "meta": meta, "epoch": 0, "history": history,
             "pair": None, "best": None}  # fmt: skip
    restored = Checkpointer(tmp_path).restore(state)
    assert restored is not None and restored.step == 11
    assert same_model(new_model, model)
    assert new_opt.state_dict()["state"][0]["step"] == torch.tensor(11.0)
    # the plain entries say what the checkpoint says, and the containers are the same objects
    assert state["epoch"] == 3 and state["best"] == 0.25 and state["pair"] == (1, 2)
    assert state["meta"] is meta and meta == {"step": 11, "lr": 0.01}
    assert state["history"] is history and history == [0.9, 0.5, 0.25]
    assert state["model"] is new_model and state["optimizer"] is new_opt
    # restored.data keeps giving the plain values
    assert dict(restored.data) == {"meta": meta, "epoch": 3, "history": history, "pair": (1, 2), "best": 0.25}


def test_load_into_a_target_fills_dicts_and_lists_in_place_and_replaces_the_rest(tmp_path: Path) -> None:
    model, opt = trained(3)
    saved = {
        "model": model, "optimizer": opt, "epoch": 7,
        "meta": {"step": 21, "inner": {"seen": [1, 2, 3], "lr": 0.5}, "tag": "run-b"},
        "same_length": [10, {"a": 1}, (2, 3)], "longer": [1, 2, 3, 4], "arr": np.arange(3.0),
        "npscalar": np.float32(1.5), "weights": {"w": torch.full((2,), 3.0)},
    }  # fmt: skip
    savegame.save(tmp_path / "c", saved)
    new_model, new_opt = fresh()
    inner: dict[str, Any] = {"seen": [0], "lr": 0.0}
    meta: dict[str, Any] = {"step": 0, "inner": inner, "tag": None}
    element: dict[str, Any] = {"a": 0}
    same_length: list[Any] = [0, element, None]
    longer = [1]
    arr = np.zeros(3)
    w = torch.zeros(2)
    target = {"model": new_model, "optimizer": new_opt, "epoch": 0, "meta": meta, "same_length": same_length,
              "longer": longer, "arr": arr, "npscalar": None, "weights": {"w": w}}  # fmt: skip
    report = savegame.load(tmp_path / "c", target)
    assert report.clean
    assert same_model(new_model, model) and target["epoch"] == 7
    assert target["meta"] is meta and meta["inner"] is inner
    assert meta == {"step": 21, "inner": {"seen": [1, 2, 3], "lr": 0.5}, "tag": "run-b"}
    assert target["same_length"] is same_length and same_length[1] is element
    assert same_length == [10, {"a": 1}, (2, 3)]
    assert target["longer"] is longer and longer == [1, 2, 3, 4]  # a plain list of another length: replaced contents
    assert target["arr"] is arr and np.array_equal(arr, np.arange(3.0))  # arrays and tensors: copied into
    assert target["weights"]["w"] is w and torch.equal(w, torch.full((2,), 3.0))
    assert target["npscalar"] == np.float32(1.5)
    # the plain items are also in report.state (items holding live objects are not)
    assert set(report.state) == {"epoch", "meta", "same_length", "longer", "npscalar"}
    assert report.state["epoch"] == 7


def test_keys_only_in_the_target_are_left_and_strictly_refused_before_anything_plain_changes(tmp_path: Path) -> None:
    model, _ = trained(2)
    savegame.save(tmp_path / "c", {"model": model, "meta": {"step": 5}, "epoch": 2})
    target = {"model": make_model(), "meta": {"step": 0, "added_later": 9}, "epoch": 0}
    with pytest.raises(StateMismatchError, match=r"meta\.added_later") as raised:
        savegame.load(tmp_path / "c", target)
    assert raised.value.report is not None and raised.value.report.missing_keys == ["meta.added_later"]
    assert target["meta"] == {"step": 0, "added_later": 9} and target["epoch"] == 0  # nothing plain replaced

    report = savegame.load(tmp_path / "c", target, strict=False)
    assert report.missing_keys == ["meta.added_later"]
    assert target["meta"] == {"step": 5, "added_later": 9} and target["epoch"] == 2


def test_extra_keys_of_a_plain_dict_are_added_but_reported_next_to_live_objects(tmp_path: Path) -> None:
    savegame.save(tmp_path / "c", {"meta": {"step": 5, "lr": 0.1}, "nets": {"a": make_model(), "b": make_model()}})
    meta: dict[str, Any] = {}
    report = savegame.load(tmp_path / "c", {"meta": meta, "nets": {"a": make_model(), "b": make_model()}})
    assert report.clean and meta == {"step": 5, "lr": 0.1}  # plain data takes the checkpoint's content
    with pytest.raises(StateMismatchError, match=r"nets\.b"):
        savegame.load(tmp_path / "c", {"meta": {}, "nets": {"a": make_model()}})
    report = savegame.load(tmp_path / "c", {"meta": {}, "nets": {"a": make_model()}}, strict=False)
    assert report.unexpected_keys == ["nets.b"]


def test_a_list_of_live_objects_of_another_length_is_a_mismatch(tmp_path: Path) -> None:
    first = make_model()
    savegame.save(tmp_path / "c", {"nets": [first], "epoch": 4})
    target: dict[str, Any] = {"nets": [make_model(), make_model()], "epoch": 0}
    with pytest.raises(StateMismatchError, match="nets"):
        savegame.load(tmp_path / "c", target)
    assert target["epoch"] == 0 and len(target["nets"]) == 2
    report = savegame.load(tmp_path / "c", target, strict=False)
    assert report.mismatched_keys == [("nets", (1,), (2,))]
    assert target["epoch"] == 4 and len(target["nets"]) == 2 and not same_model(target["nets"][0], first)


@pytest.mark.parametrize(
    ("saved", "live", "names"),
    [
        (5, {"step": 0}, ("int", "dict")),
        ({"a": 1}, [1, 2], ("dict", "list")),
        (3, torch.zeros(2), ("int", "Tensor")),
        ([1.0, 2.0], np.zeros(2), ("list", "ndarray")),
        (7, make_model(), ("int", "Sequential")),
    ],
)
def test_type_mismatch_follows_the_strict_rules(
    tmp_path: Path, saved: object, live: object, names: tuple[str, str]
) -> None:
    savegame.save(tmp_path / "c", {"meta": saved, "epoch": 1})
    target = {"meta": live, "epoch": 0}
    with pytest.raises(StateMismatchError, match=rf"meta: the checkpoint holds {names[0]}, the target is {names[1]}"):
        savegame.load(tmp_path / "c", target)
    assert target["meta"] is live and target["epoch"] == 0
    report = savegame.load(tmp_path / "c", target, strict=False)
    assert report.mismatched_types == [("meta", *names)] and not report.clean
    assert target["meta"] is live and target["epoch"] == 1


def test_a_read_only_target_mapping_keeps_its_values_and_reports_them(tmp_path: Path) -> None:
    model, _ = trained(1)
    savegame.save(tmp_path / "c", {"model": model, "epoch": 6, "meta": {"step": 6}})
    meta = {"step": 0}
    new_model = make_model()
    report = savegame.load(tmp_path / "c", MappingProxyType({"model": new_model, "epoch": 0, "meta": meta}))
    assert same_model(new_model, model) and meta == {"step": 6}
    assert report.state["epoch"] == 6


def test_checkpointer_strict_restore_refuses_a_plain_item_the_checkpoint_lacks(tmp_path: Path) -> None:
    model, opt = trained(2)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save({"model": model, "optimizer": opt, "epoch": 2}, epoch=2)
    new_model, new_opt = fresh()
    state: dict[str, Any] = {"model": new_model, "optimizer": new_opt, "epoch": 0, "best_acc": 0.0}
    with pytest.raises(StateMismatchError, match="best_acc"):
        Checkpointer(tmp_path).restore(state)
    assert state["epoch"] == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = Checkpointer(tmp_path).restore(state, strict=False)
    assert restored is not None and any(issubclass(w.category, ResumeWarning) for w in caught)
    assert state["epoch"] == 2 and state["best_acc"] == 0.0 and same_model(new_model, model)


def test_a_none_item_is_a_placeholder_filled_if_saved(tmp_path: Path) -> None:
    """``{"meta": None}`` asks for the saved value if there is one: it is filled when saved, and stays None
    without an error (even strict) when the checkpoint has no such item; a non-None absent item still raises."""
    model = torch.nn.Linear(2, 2)
    with Checkpointer(tmp_path / "a") as ck:
        ck.save({"model": model, "meta": {"step": 7}}, epoch=1)
    with Checkpointer(tmp_path / "b") as ck:
        ck.save({"model": model}, epoch=1)
    with_meta: dict[str, Any] = {"model": torch.nn.Linear(2, 2), "meta": None}
    restored = Checkpointer(tmp_path / "a").restore(with_meta)
    assert restored is not None and with_meta["meta"] == {"step": 7} and restored.data["meta"] == {"step": 7}
    without: dict[str, Any] = {"model": torch.nn.Linear(2, 2), "meta": None}
    assert Checkpointer(tmp_path / "b").restore(without) is not None
    assert without["meta"] is None and torch.equal(without["model"].weight, model.weight)
    with pytest.raises(StateMismatchError, match="meta"):
        Checkpointer(tmp_path / "b").restore({"model": torch.nn.Linear(2, 2), "meta": {}})


def _pair(hidden: int, *, groups: int = 1, seed: int = 0) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """A model, a second model of width ``hidden`` and an AdamW over both (after one step: state to restore)."""
    torch.manual_seed(seed)
    first, second = nn.Linear(4, 4), nn.Linear(4, hidden)
    params: Any = [*first.parameters(), *second.parameters()]
    if groups == 2:
        params = [{"params": list(first.parameters())}, {"params": list(second.parameters())}]
    opt = torch.optim.AdamW(params, lr=0.1)
    for p in [*first.parameters(), *second.parameters()]:
        p.grad = torch.ones_like(p)
    opt.step()
    return first, second, opt


@pytest.mark.parametrize("case", ["later model's shapes", "optimizer's parameter groups", "later model's keys"])
def test_a_strict_mismatch_in_a_later_item_leaves_the_earlier_ones_unchanged(tmp_path: Path, case: str) -> None:
    """The first item is restored first: a later model that does not fit, or an optimizer over other
    parameter groups, used to raise only after the first model had been overwritten."""
    first, second, opt = _pair(3)
    savegame.save(tmp_path / "ckpt", {"model": first, "ema": second, "optimizer": opt})
    if case == "later model's shapes":
        other_first, other_second, other_opt = _pair(5, seed=1)
    elif case == "optimizer's parameter groups":
        other_first, other_second, other_opt = _pair(3, groups=2, seed=1)
    else:
        other_first, _, other_opt = _pair(3, seed=1)
        other_second = nn.Sequential(nn.Linear(4, 3))  # keys 0.weight, 0.bias instead of weight, bias
    before = {k: v.clone() for k, v in other_first.state_dict().items()}
    opt_before = [t.clone() for s in other_opt.state.values() for t in s.values()]
    with pytest.raises(StateMismatchError, match=r"shape|parameter groups|missing"):
        savegame.load(tmp_path / "ckpt", {"model": other_first, "ema": other_second, "optimizer": other_opt})
    assert all(torch.equal(other_first.state_dict()[k], v) for k, v in before.items())
    assert all(torch.equal(a, b) for a, b in zip([t for s in other_opt.state.values() for t in s.values()],
                                                   opt_before))  # fmt: skip
    savegame.load(tmp_path / "ckpt", {"model": other_first}, strict=False)  # what matches still loads
    assert torch.equal(other_first.weight, first.weight)


@pytest.mark.parametrize("kind", ["expanded", "inference", "meta", "read-only array"])
def test_a_target_that_cannot_take_its_value_in_place_changes_nothing(tmp_path: Path, kind: str) -> None:
    """The second tensor of an item cannot be written in place: torch's (or NumPy's) bare error escaped
    after the first had been overwritten, and a meta tensor was reported loaded with nothing in it. Every
    tensor and array of the target is checked before anything is restored."""
    savegame.save(tmp_path / "c", {"s": {"a": torch.arange(5.0), "b": torch.arange(5.0)},
                                   "n": {"a": np.arange(3.0), "b": np.arange(3.0)}})  # fmt: skip
    bad: Any = {
        "expanded": lambda: torch.zeros(1).expand(5),
        "inference": lambda: torch.inference_mode()(lambda: torch.zeros(5))(),
        "meta": lambda: torch.zeros(5, device="meta"),
        "read-only array": lambda: np.frombuffer(bytes(24)),
    }[kind]()
    item = "n" if kind == "read-only array" else "s"
    first = np.zeros(3) if item == "n" else torch.zeros(5)
    with pytest.raises(StateMismatchError, match=rf"{item}\.b: the target (tensor|array)"):
        savegame.load(tmp_path / "c", {item: {"a": first, "b": bad}}, strict=False)
    assert not first.any()


def test_a_strict_load_that_fails_leaves_every_tensor_as_it_was(tmp_path: Path) -> None:
    """A shape mismatch in a later tensor (or item) raised, but the tensors before it were already
    overwritten: a half-restored state. Tensors and arrays are copied only once the whole state matched."""
    savegame.save(tmp_path / "c", {"s": {"a": torch.ones(3), "b": torch.ones(3), "n": np.ones(2)}, "x": torch.ones(2)})
    target = {"s": {"a": torch.zeros(3), "b": torch.zeros(4), "n": np.zeros(2)}, "x": torch.zeros(2)}
    with pytest.raises(StateMismatchError, match=r"s\.b"):
        savegame.load(tmp_path / "c", target)
    assert not target["s"]["a"].any() and not target["s"]["n"].any() and not target["x"].any()
    target["s"]["b"] = torch.zeros(3)
    report = savegame.load(tmp_path / "c", target)
    assert sorted(report.loaded) == ["s.a", "s.b", "s.n", "x"] and bool(target["s"]["a"].all())


@pytest.mark.parametrize(
    ("saved", "live"),
    [(torch.tensor([0.4, -300.5]), torch.zeros(2, dtype=torch.int8)),
     (torch.tensor([0.0, 2.7]), torch.zeros(2, dtype=torch.bool)),
     (torch.tensor([1 + 1j, 2j]), torch.zeros(2)), (np.array([0.4, 2.7]), np.zeros(2, dtype=np.int64))],
)  # fmt: skip
def test_values_a_target_dtype_cannot_hold_are_refused(tmp_path: Path, saved: Any, live: Any) -> None:
    """A strict load into an int8 (bool, real) target truncated and wrapped the saved floats (-300.5 became
    -44) and reported nothing; NumPy's same_kind cast raised a bare UFuncTypeError. Narrowing the kind is a
    StateMismatchError (strict) or a reported mismatch that leaves the target alone; widening loads."""
    savegame.save(tmp_path / "c", {"t": {"x": saved}})
    before = live.copy() if isinstance(live, np.ndarray) else live.clone()
    with pytest.raises(StateMismatchError, match=r"t\.x: the checkpoint holds .* values and the target is"):
        savegame.load(tmp_path / "c", {"t": {"x": live}})
    report = savegame.load(tmp_path / "c", {"t": {"x": live}}, strict=False)
    assert report.mismatched_types and report.mismatched_types[0][0] == "t.x"
    assert (live == before).all()


def test_a_wider_dtype_target_loads(tmp_path: Path) -> None:
    savegame.save(tmp_path / "c", {"t": {"i": torch.arange(3), "h": torch.tensor([0.5, 1.5]), "n": np.arange(3)}})
    target = {"t": {"i": torch.zeros(3), "h": torch.zeros(2, dtype=torch.float16), "n": np.zeros(3)}}
    savegame.load(tmp_path / "c", target)
    assert target["t"]["i"].tolist() == [0.0, 1.0, 2.0] and target["t"]["h"].tolist() == [0.5, 1.5]
    assert target["t"]["n"].tolist() == [0.0, 1.0, 2.0]


def test_an_optimizer_of_another_kind_or_shape_is_refused_and_left_alone(tmp_path: Path) -> None:
    """AdamW's state loaded into an SGD without a word (its groups got AdamW's settings and the first
    step() raised a bare KeyError 'momentum'), and Adam state of another shape was attached to the
    parameters (the next step() failed). Strict: StateMismatchError before anything changes; strict=False:
    the optimizer is left as it is and reported, the model still loads."""
    model = nn.Linear(4, 2)
    adamw = torch.optim.AdamW(model.parameters())
    model(torch.ones(3, 4)).sum().backward()
    adamw.step()
    savegame.save(tmp_path / "c", {"model": model, "optimizer": adamw})
    fresh = nn.Linear(4, 2)
    sgd = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in fresh.parameters()]
    with pytest.raises(StateMismatchError, match=r"optimizer: the checkpoint's optimizer is of another kind.*SGD"):
        savegame.load(tmp_path / "c", {"model": fresh, "optimizer": sgd})
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.parameters()))
    assert sgd.param_groups[0]["momentum"] == 0.9 and "betas" not in sgd.param_groups[0]
    report = savegame.load(tmp_path / "c", {"model": fresh, "optimizer": sgd}, strict=False)
    assert [t[0] for t in report.mismatched_types] == ["optimizer"] and "betas" not in sgd.param_groups[0]
    assert torch.equal(fresh.weight, model.weight)

    wider = nn.Linear(4, 3)
    adam = torch.optim.AdamW(wider.parameters())
    shapes = r"'exp_avg' of parameter 0 has shape \[2, 4\], the parameter \[3, 4\]"
    with pytest.raises(StateMismatchError, match=shapes):
        savegame.load(tmp_path / "c", {"optimizer": adam})
    assert not adam.state
