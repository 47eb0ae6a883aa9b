"""Keras 3 ``.weights.h5`` and ``.keras`` files -> savegame items, without deserializing anything.

A ``.keras`` file is a zip of ``config.json`` (the architecture, which may hold Python lambdas),
``metadata.json`` and ``model.weights.h5``. The archive is checked first (member count, sizes,
compression ratios: a zip bomb is refused before anything is inflated), the JSON parts are parsed as
JSON and stored as data (``keras_config``, ``keras_metadata``), and the config is **never** turned
back into objects, so no lambda in it runs.

The weights are read in one of two ways:

* without a model (the default): with ``h5py``, every dataset of the file as a NumPy array keyed by
  its path in the file (``layers/dense/vars/0``, ``optimizer/vars/3``), in the items ``model`` and
  ``optimizer``. That layout follows the model's layer structure (as the file does), not the
  variable paths a live model has.
* with ``keras_model=`` (a built model of the same architecture; ``--keras-model MODULE:FUNCTION`` on
  the command line): Keras's own ``model.load_weights`` puts the weights into that model (it reads the
  weights file only, never the config), and the item ``keras`` is its
  :class:`savegame.adapters.keras.KerasState` (weights, plus the optimizer when the model is
  compiled), which restores into a fresh model with ``savegame.load(dest, {"keras": KerasState(model)})``
  and works with ``savegame.keras`` and ``savegame export --to model.weights.h5``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from savegame.errors import DamagedSourceError
from savegame.importers.archive import MAX_RATIO, check_archive, open_archive, read_member
from savegame.importers.needs import need
from savegame.importers.plain import Plain
from savegame.importers.report import Found

__all__ = ["MAX_DATASETS", "MAX_KERAS_BYTES", "read_keras"]

MAX_KERAS_BYTES = 1 << 40
"""Largest a ``.keras`` archive may unpack to (1 TiB)."""

MAX_DATASETS = 1_000_000
"""Most datasets read from one weights file."""

_MAX_JSON = 64 << 20


def read_keras(path: str, *, keras_model: Any = None) -> Found:
    """Read a ``.weights.h5`` or ``.keras`` file (see the module docstring)."""
    is_archive = path.lower().endswith(".keras")
    found = Found(format="keras" if is_archive else "keras-weights")
    with tempfile.TemporaryDirectory(prefix=".savegame-import-") as scratch:
        weights = path
        if is_archive:
            weights = _unpack(path, scratch, found)
        names = _datasets(weights, path)
        if keras_model is not None:
            _into_model(weights, path, keras_model, found)
        else:
            _raw(weights, names, path, found)
    return found


def _unpack(path: str, scratch: str, found: Found) -> str:
    """Check the archive, store its JSON parts, extract ``model.weights.h5`` (bounded) into ``scratch``."""
    archive = open_archive(path)
    with archive:
        check_archive(archive, path, max_total=MAX_KERAS_BYTES)
        names = set(archive.namelist())
        if "model.weights.h5" not in names:
            raise DamagedSourceError(
                f"{path}: a .keras archive without model.weights.h5 (members: {sorted(names)[:8]})"
            )
        for member, item in (("config.json", "keras_config"), ("metadata.json", "keras_metadata")):
            if member in names:
                text = read_member(archive, member, path, limit=_MAX_JSON).decode("utf-8", "replace")
                try:
                    found.items[item] = json.loads(text)
                except (ValueError, RecursionError) as exc:
                    raise DamagedSourceError(f"{path}: {member} is not valid JSON ({exc})") from None
                found.sources[item] = member
        found.converted.append("config.json stored as data (item 'keras_config'); never deserialized, so no "
                               "lambda or custom class in it is run")  # fmt: skip
        target = os.path.join(scratch, "model.weights.h5")
        info = archive.getinfo("model.weights.h5")
        try:
            with archive.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (OSError, EOFError, ValueError) as exc:
            raise DamagedSourceError(f"{path}: model.weights.h5 cannot be read ({exc}): the file is damaged") from None
        if os.path.getsize(target) != info.file_size:
            raise DamagedSourceError(f"{path}: model.weights.h5 is not the size the archive says")
        skipped = sorted(names - {"config.json", "metadata.json", "model.weights.h5"})
        found.skipped += [f"{n}: not read (assets are not part of the training state)" for n in skipped]
    return target


def _datasets(weights: str, source: str) -> list[str]:
    """The dataset paths of the weights file, refused (:class:`DamagedSourceError`) when there are more than
    :data:`MAX_DATASETS` or they unpack to more than :data:`MAX_RATIO` times the file's size (compressed
    HDF5 chunks can promise far more data than the file holds)."""
    h5py = need("h5py", "reading Keras weights files")

    names: list[str] = []
    try:
        with h5py.File(weights, "r") as f:
            f.visit(lambda n: _visit(n, f, names))
            total = sum(int(f[n].size) * f[n].dtype.itemsize for n in names)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DamagedSourceError(
            f"{source}: not a readable HDF5 weights file ({exc}); it is truncated or damaged"
        ) from None
    limit = MAX_RATIO * os.path.getsize(weights) + (1 << 20)
    if total > limit:
        raise DamagedSourceError(f"{source}: its datasets unpack to {total:,} bytes, more than {MAX_RATIO} times "
                                 "the file's size: refused (compressed HDF5 data that large is a bomb)")  # fmt: skip
    return names


def _raw(weights: str, names: list[str], source: str, found: Found) -> None:
    """Every dataset of the weights file, by path, into the items ``model`` and ``optimizer``; one that
    cannot be stored exactly (strings, records) is left out and named in ``found.skipped``."""
    h5py = need("h5py", "reading Keras weights files")

    arrays: dict[str, dict[str, np.ndarray]] = {"model": {}, "optimizer": {}}
    plain = Plain(source)
    try:
        with h5py.File(weights, "r") as f:
            for name in names:
                dataset = f[name]
                item = "optimizer" if name.startswith("optimizer/") else "model"  # the optimizer group's datasets
                key = name.split("/", 1)[1] if item == "optimizer" else name
                keep, value = plain.value(np.array(dataset[()], copy=True), name)
                if keep:
                    arrays[item][key] = value
    except (OSError, ValueError, KeyError) as exc:
        raise DamagedSourceError(
            f"{source}: not a readable HDF5 weights file ({exc}); it is truncated or damaged"
        ) from None
    for item, values in arrays.items():
        if values:
            found.items[item] = values
            found.sources[item] = f"{os.path.basename(source)} (h5 paths)"
    found.skipped += plain.skipped
    found.converted += plain.converted
    found.converted.append(
        "weights keyed by their path in the file (layers/NAME/vars/N); pass keras_model= (--keras-model) to "
        "store them by variable path as a KerasState instead"
    )


def _visit(name: str, f: Any, names: list[str]) -> None:
    h5py = need("h5py", "reading Keras weights files")

    if isinstance(f[name], h5py.Dataset):
        if len(names) >= MAX_DATASETS:
            raise DamagedSourceError(f"more than {MAX_DATASETS:,} datasets in the weights file")
        names.append(name)


def _into_model(weights: str, source: str, model: Any, found: Found) -> None:
    """Load the checked weights file into ``model`` with Keras (``model.load_weights`` reads the weights
    file only) and keep its :class:`KerasState`; the optimizer too when the file has its variables."""
    h5py = need("h5py", "reading Keras weights files")

    from savegame.adapters.keras import KerasState

    try:
        with h5py.File(weights, "r") as f:
            has_optimizer = "optimizer" in f
    except OSError as exc:
        raise DamagedSourceError(f"{source}: not a readable HDF5 weights file ({exc})") from None
    optimizer = getattr(model, "optimizer", None)
    with_optimizer = has_optimizer and optimizer is not None
    if optimizer is not None and with_optimizer and not optimizer.built:  # its slots must exist for Keras to fill them
        optimizer.build(model.trainable_variables)
    try:
        model.load_weights(weights)
    except (ValueError, OSError, KeyError) as exc:
        raise DamagedSourceError(f"{source}: the weights do not load into the given model ({exc})") from None
    found.items["keras"] = KerasState(model, include_optimizer=with_optimizer, include_rng=False).state_dict()
    found.sources["keras"] = f"{os.path.basename(source)} via model.load_weights"
    found.converted.append(
        f"weights loaded into the given model {getattr(model, 'name', '')!r} and stored as its KerasState "
        f"(by variable path{', with the optimizer' if with_optimizer else ''})"
    )
    if has_optimizer and not with_optimizer:
        found.skipped.append("optimizer variables: the given model is not compiled (compile it to keep them)")
