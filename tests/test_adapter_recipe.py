"""docs/architecture.md's two "Adding a framework adapter" recipes, followed to the letter.

1. A class of your own joins through the :class:`savegame.Stateful` protocol: ``state_dict()`` returning
   its state as nested data (dicts, lists, numbers, strings, NumPy arrays, tensors) and
   ``load_state_dict(state)`` putting it back in place, optionally with a ``strict`` keyword whose result
   (``missing_keys`` / ``unexpected_keys``) goes into the :class:`savegame.LoadReport`.
2. An object that is not Stateful gets an adapter of the registry (:mod:`savegame.adapters.registry`):
   ``handles``, ``kind``, ``capture``, ``restore`` (``zero_copy`` and ``model_weights`` from
   ``BaseAdapter``, or its own), put in front of the table with ``register``. An adapter whose
   framework has arrays of its own also answers ``encode_hook`` (step 3 of that recipe): the tree codec
   then stores those arrays wherever they stand in a state.

Each toy is round-tripped through ``savegame.save`` / ``savegame.load(path, target)``, background saves
and a Checkpointer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

import savegame
from savegame.adapters.registry import BaseAdapter, adapter_for, register, type_mismatch, unregister
from savegame.adapters.report import LoadReport
from savegame.errors import StateMismatchError


class _Keys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


class RunningStats:
    """The toy "framework object" of the recipe: running mean/variance of a feature vector (Welford)."""

    def __init__(self, dim: int) -> None:
        self.count = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.m2 = np.zeros(dim, dtype=np.float64)
        self.label = "features"

    def update(self, batch: np.ndarray) -> None:
        for row in batch:
            self.count += 1
            delta = row - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (row - self.mean)

    # Step 1 of the recipe: state_dict() -> nested data (arrays stay arrays: stored in the tensor file)
    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2, "label": self.label}

    # Step 2: load_state_dict(state, strict=...) restores in place and reports what did not match
    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> _Keys:
        expected = {"count", "mean", "m2", "label"}
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if strict and (missing or unexpected):
            raise ValueError(f"missing {missing}, unexpected {unexpected}")
        if "mean" in state and np.shape(state["mean"]) != self.mean.shape:
            raise ValueError(f"mean has shape {np.shape(state['mean'])}, expected {self.mean.shape}")
        self.count = int(state.get("count", self.count))
        if "mean" in state:
            self.mean[...] = state["mean"]  # in place: whoever holds self.mean sees the restored values
        if "m2" in state:
            self.m2[...] = state["m2"]
        self.label = str(state.get("label", self.label))
        return _Keys(missing, unexpected)


def _trained(seed: int = 0) -> RunningStats:
    stats = RunningStats(4)
    stats.update(np.random.default_rng(seed).normal(size=(17, 4)))
    return stats


def _same(a: RunningStats, b: RunningStats) -> None:
    assert (a.count, a.label) == (b.count, b.label)
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.m2, b.m2)


def test_the_toy_object_is_stateful_and_recorded_as_such(tmp_path: Path) -> None:
    stats = _trained()
    assert isinstance(stats, savegame.Stateful)
    savegame.save(tmp_path / "ckpt", {"stats": stats, "epoch": 3})
    manifest = savegame.read_manifest(tmp_path / "ckpt")
    assert manifest.items["stats"].kind == f"stateful:{__name__}.RunningStats"
    assert manifest.items["stats"].file is not None  # its arrays went into a tensor file
    assert manifest.items["epoch"].kind == "data"


@pytest.mark.parametrize("background", [False, True])
def test_save_then_load_into_a_fresh_object_round_trips(tmp_path: Path, background: bool) -> None:
    stats = _trained()
    result = savegame.save(tmp_path / "ckpt", {"stats": stats, "epoch": 3}, background=background)
    if background:
        result.result()
    fresh = RunningStats(4)
    mean_buffer = fresh.mean
    target: dict[str, Any] = {"stats": fresh, "epoch": 0}
    report = savegame.load(tmp_path / "ckpt", target)
    assert report.clean and "stats" in report.loaded
    _same(fresh, stats)
    assert fresh.mean is mean_buffer  # restored in place
    assert target["epoch"] == 3


def test_load_without_a_target_gives_the_state_dict(tmp_path: Path) -> None:
    stats = _trained()
    savegame.save(tmp_path / "ckpt", {"stats": stats})
    loaded = savegame.load(tmp_path / "ckpt")["stats"]
    assert set(loaded) == {"count", "mean", "m2", "label"}
    assert loaded["count"] == stats.count and loaded["label"] == "features"
    np.testing.assert_array_equal(np.asarray(loaded["mean"]), stats.mean)


def test_a_checkpointer_saves_and_resumes_it(tmp_path: Path) -> None:
    stats = _trained()
    with savegame.Checkpointer(tmp_path / "run", keep_last=2) as ckpt:
        for epoch in (1, 2, 3):
            stats.update(np.full((1, 4), float(epoch)))
            ckpt.save({"stats": stats}, epoch=epoch)
    fresh = RunningStats(4)
    with savegame.Checkpointer(tmp_path / "run", keep_last=2) as ckpt:
        restored = ckpt.restore({"stats": fresh})
    assert restored is not None and restored.epoch == 3
    _same(fresh, stats)


def test_strict_keyword_and_report_are_honoured(tmp_path: Path) -> None:
    """``load_state_dict``'s ``strict`` is passed through; a non-strict result lands in the report, a
    failure becomes :class:`StateMismatchError` naming the item."""
    stats = _trained()
    savegame.save(tmp_path / "ckpt", {"stats": {"count": 2, "mean": stats.mean, "m2": stats.m2, "x": 1}})
    fresh = RunningStats(4)
    with pytest.raises(StateMismatchError, match=r"stats: load_state_dict failed: missing \['label'\]"):
        savegame.load(tmp_path / "ckpt", {"stats": fresh})
    report = savegame.load(tmp_path / "ckpt", {"stats": fresh}, strict=False)
    assert report.missing_keys == ["stats.label"] and report.unexpected_keys == ["stats.x"]
    assert fresh.count == 2
    np.testing.assert_array_equal(fresh.mean, stats.mean)


def test_a_shape_mismatch_leaves_plain_values_untouched(tmp_path: Path) -> None:
    savegame.save(tmp_path / "ckpt", {"stats": _trained(), "epoch": 3})
    target: dict[str, Any] = {"stats": RunningStats(5), "epoch": 0}
    with pytest.raises(StateMismatchError, match="stats: load_state_dict failed: mean has shape"):
        savegame.load(tmp_path / "ckpt", target)
    assert target["epoch"] == 0


class Histogram:
    """The second recipe's toy "framework object": it has no ``state_dict``, so only an adapter can save it."""

    def __init__(self, bins: int) -> None:
        self.counts = np.zeros(bins, dtype=np.int64)
        self.total = 0

    def add(self, values: np.ndarray) -> None:
        np.add.at(self.counts, np.clip(values, 0, len(self.counts) - 1), 1)
        self.total += len(values)


class HistogramAdapter(BaseAdapter):
    """The recipe's adapter: exactly the four methods, ``model_weights`` overridden to show the hook."""

    def handles(self, obj: object) -> bool:
        return isinstance(obj, Histogram)

    def kind(self, obj: object) -> str:
        return "toy.Histogram"

    def capture(self, obj: object, where: str) -> object:
        assert isinstance(obj, Histogram)
        return {"counts": obj.counts, "total": obj.total}

    def restore(self, target: object, state: object, *, strict: bool, where: str, report: LoadReport) -> None:
        assert isinstance(target, Histogram)
        if not isinstance(state, Mapping) or set(state) != {"counts", "total"}:
            type_mismatch(target, state, where=where, strict=strict, report=report)
            return
        target.counts[...] = state["counts"]  # in place
        target.total = int(state["total"])
        report.loaded.append(where)

    def model_weights(self, obj: object) -> bool:
        return True


@pytest.fixture
def histogram_adapter() -> Any:
    adapter = HistogramAdapter()
    register(adapter)
    yield adapter
    unregister(adapter)


def _histogram() -> Histogram:
    hist = Histogram(8)
    hist.add(np.random.default_rng(1).integers(0, 8, size=50))
    return hist


def test_without_an_adapter_the_object_is_refused(tmp_path: Path) -> None:
    """The guarantee the adapter lifts: an object nobody handles is not silently dropped or pickled."""
    assert adapter_for(_histogram()) is None
    with pytest.raises(savegame.UnsupportedTypeError, match="stats"):
        savegame.save(tmp_path / "ckpt", {"stats": _histogram()})
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("background", [False, True])
def test_a_registered_adapter_round_trips_its_object(tmp_path: Path, histogram_adapter: Any, background: bool) -> None:
    hist = _histogram()
    result = savegame.save(tmp_path / "ckpt", {"hist": hist, "epoch": 2}, background=background)
    if background:
        result.result()
    assert savegame.read_manifest(tmp_path / "ckpt").items["hist"].kind == "toy.Histogram"
    fresh = Histogram(8)
    buffer = fresh.counts
    report = savegame.load(tmp_path / "ckpt", {"hist": fresh, "epoch": 0})
    assert report.clean and "hist" in report.loaded
    assert fresh.counts is buffer and fresh.total == hist.total
    np.testing.assert_array_equal(fresh.counts, hist.counts)


def test_a_registered_adapter_is_asked_by_the_checkpointer(tmp_path: Path, histogram_adapter: Any) -> None:
    """``model_weights`` decides what a ``weights_only`` Checkpointer keeps; restore goes through ``restore``."""
    hist = _histogram()
    with savegame.Checkpointer(tmp_path / "run", weights_only=True) as ckpt:
        saved = ckpt.save({"hist": hist, "notes": {"lr": 0.1}}, epoch=1)
    assert set(savegame.read_manifest(saved.path).items) == {"hist"}
    fresh = Histogram(8)
    with savegame.Checkpointer(tmp_path / "run") as ckpt:
        restored = ckpt.restore({"hist": fresh})
    assert restored is not None and restored.epoch == 1
    np.testing.assert_array_equal(fresh.counts, hist.counts)


def test_a_registered_adapter_reports_a_wrong_state_by_the_strict_rules(tmp_path: Path, histogram_adapter: Any) -> None:
    savegame.save(tmp_path / "ckpt", {"hist": {"counts": np.zeros(8, dtype=np.int64)}})
    with pytest.raises(StateMismatchError, match="hist: the checkpoint holds dict, the target is Histogram"):
        savegame.load(tmp_path / "ckpt", {"hist": Histogram(8)})
    report = savegame.load(tmp_path / "ckpt", {"hist": Histogram(8)}, strict=False)
    assert report.mismatched_types == [("hist", "dict", "Histogram")]


class ToyArray:
    """Step 3's toy: an array type of a framework that is neither NumPy nor torch (think of a jax array)."""

    def __init__(self, values: np.ndarray) -> None:
        self._buffer = np.array(values, dtype=np.float32)

    def numpy(self) -> np.ndarray:
        return self._buffer

    def fill_from(self, values: np.ndarray) -> None:
        self._buffer[...] = values


def encode_toy_array(obj: object, path: tuple[Any, ...], enc: Any) -> dict[str, Any] | None:
    """The recipe's encode hook: a ToyArray is stored as the NumPy array it holds (so it loads as one)."""
    if not isinstance(obj, ToyArray):
        return None
    node: dict[str, Any] = enc.encode(obj.numpy(), path)
    return node


class ToyArrayAdapter(BaseAdapter):
    """Stores ToyArrays through its encode hook (``capture`` returns None: the codec stores the object)."""

    def handles(self, obj: object) -> bool:
        return isinstance(obj, ToyArray)

    def kind(self, obj: object) -> str:
        return "toy.Array"

    def capture(self, obj: object, where: str) -> None:
        return None

    def restore(self, target: object, state: object, *, strict: bool, where: str, report: LoadReport) -> None:
        assert isinstance(target, ToyArray)
        if not isinstance(state, np.ndarray) or state.shape != target.numpy().shape:
            type_mismatch(target, state, where=where, strict=strict, report=report)
            return
        target.fill_from(state)
        report.loaded.append(where)

    def encode_hook(self) -> Any:
        return encode_toy_array


@pytest.fixture
def toy_array_adapter() -> Any:
    adapter = ToyArrayAdapter()
    register(adapter)
    yield adapter
    unregister(adapter)


def test_without_its_encode_hook_a_foreign_array_is_refused(tmp_path: Path) -> None:
    with pytest.raises(savegame.UnsupportedTypeError, match="deep"):
        savegame.save(tmp_path / "ckpt", {"opt": {"deep": ToyArray(np.arange(3))}})
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("background", [False, True])
def test_a_registered_encode_hook_stores_foreign_arrays_anywhere(
    tmp_path: Path, toy_array_adapter: Any, background: bool
) -> None:
    """The hook answers for the array as a whole item and nested deep in plain data."""
    whole, nested = ToyArray(np.arange(6).reshape(2, 3)), ToyArray(np.linspace(0, 1, 4))
    result = savegame.save(tmp_path / "ckpt", {"w": whole, "opt": {"m": [nested]}}, background=background)
    if background:
        result.result()
    manifest = savegame.read_manifest(tmp_path / "ckpt")
    assert manifest.items["w"].kind == "toy.Array"
    savegame.verify(tmp_path / "ckpt")
    plain = savegame.load(tmp_path / "ckpt")
    np.testing.assert_array_equal(plain["w"], whole.numpy())
    np.testing.assert_array_equal(plain["opt"]["m"][0], nested.numpy())
    fresh = ToyArray(np.zeros((2, 3)))
    report = savegame.load(tmp_path / "ckpt", {"w": fresh, "opt": None})
    assert "w" in report.loaded
    np.testing.assert_array_equal(fresh.numpy(), whole.numpy())


# The page this recipe lives in also states the layer order; it must be the order the import-graph
# test enforces (a module moved in LAYERS, or a row edited in the page, fails here).

_DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"
_ROW = re.compile(r"^\| (\d+) \| `([a-z_]+)` \| ([^|]+) \|", re.MULTILINE)


def _doc_layers() -> list[tuple[str, set[str]]]:
    rows = [(int(n), layer, cell) for n, layer, cell in _ROW.findall(_DOC.read_text(encoding="utf-8"))]
    assert [n for n, _, _ in rows] == list(range(1, len(rows) + 1)), "the layer table's rows are numbered 1, 2, ..."
    return [
        (layer, {m if m == "savegame" else f"savegame.{m}" for m in re.findall(r"`([a-z_.]+)`", cell)})
        for _, layer, cell in rows
    ]


def test_the_architecture_page_shows_the_layers_the_import_graph_test_enforces() -> None:
    from test_import_graph import LAYER_ORDER, LAYERS

    doc = _doc_layers()
    assert [layer for layer, _ in doc] == list(LAYER_ORDER)
    for layer, modules in doc:
        assert modules == {m for m, owner in LAYERS.items() if owner == layer}, f"layer {layer!r}"
    assert "tests/test_import_graph.py" in _DOC.read_text(encoding="utf-8")
