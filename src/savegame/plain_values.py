"""Config-like objects <-> plain data plus a JSON record of their types, without pickle.

Training frameworks put configuration objects next to the tensors of a checkpoint: Lightning's
``hyper_parameters`` hold an ``AttributeDict``, ``argparse.Namespace`` objects, dataclasses and
``pathlib`` paths. The tree codec (:mod:`savegame.format.tree`) stores exact built-in types only, so
:func:`to_plain` replaces those objects by plain dicts / strings and returns a *record* of what each
was (a JSON-like list kept in the manifest's metadata); :func:`from_plain` rebuilds the same types.

Rebuilding never imports anything and never calls an arbitrary callable: a dataclass is rebuilt only
if its module is already imported and the name resolves to a dataclass (the rule Lightning applies to
classes named by a checkpoint), Namespaces and paths by their fixed constructors, and dict subclasses
only from the ``mappings`` the caller names. Anything else is left as it is, for the tree codec to
refuse with :class:`~savegame.errors.UnsupportedTypeError` naming its path.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from savegame.errors import InvalidManifestError, StateMismatchError
from savegame.format.tree import MAX_DEPTH

__all__ = ["from_plain", "to_plain"]

Record = dict[str, Any]
"""``{"path": [key, ...], "kind": "namespace" | "dataclass" | "mapping" | "path", "class": name}``."""

_PATH_CLASSES = {c.__name__: c for c in (pathlib.PurePath, pathlib.PurePosixPath, pathlib.PureWindowsPath,
                                         pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath)}  # fmt: skip


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def to_plain(value: Any, *, mappings: tuple[type, ...] = ()) -> tuple[Any, list[Record]]:
    """``value`` with every Namespace, dataclass instance, ``pathlib`` path and instance of one of
    ``mappings`` (dict subclasses) replaced by plain data, and the records :func:`from_plain` needs.

    The records are in post-order (inner objects first); containers are copied only where something
    inside them changed, so a state without such objects comes back as the same object."""
    records: list[Record] = []
    return _convert(value, (), records, mappings, 0), records


def _convert(value: Any, path: tuple[Any, ...], records: list[Record], mappings: tuple[type, ...], depth: int) -> Any:
    if depth > MAX_DEPTH:
        return value  # the tree codec refuses it with its own message
    t = type(value)
    if t is dict or t is OrderedDict:
        items = {k: _convert(v, (*path, k), records, mappings, depth + 1) for k, v in value.items()}
        return value if all(items[k] is value[k] for k in value) else t(items)
    if t is list or t is tuple:
        new = [_convert(v, (*path, i), records, mappings, depth + 1) for i, v in enumerate(value)]
        return value if all(a is b for a, b in zip(new, value)) else t(new)
    kind, fields = _decompose(value, mappings)
    if kind is None:
        return value
    plain = {k: _convert(v, (*path, k), records, mappings, depth + 1) for k, v in fields.items()}
    records.append({"path": list(path), "kind": kind, "class": _class_name(t) if kind != "path" else t.__name__})
    return str(value) if kind == "path" else plain


def _decompose(value: Any, mappings: tuple[type, ...]) -> tuple[str | None, dict[str, Any]]:
    """The kind of a config-like object and its fields (a path has none)."""
    t = type(value)
    if t is argparse.Namespace:
        return "namespace", dict(vars(value))
    if isinstance(value, dict) and t in mappings:
        return "mapping", dict(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return "dataclass", {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if t in _PATH_CLASSES.values():
        return "path", {}
    return None, {}


def from_plain(value: Any, records: object, *, mappings: Mapping[str, type] | None = None, where: str = "") -> Any:
    """Rebuild what :func:`to_plain` flattened, from its ``records`` (untrusted JSON from a manifest).

    ``mappings``: the dict subclasses that may be rebuilt, by the ``module:qualname`` names recorded.
    A dataclass whose module is not imported raises :class:`StateMismatchError` saying what to import."""
    if not records:
        return value
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise InvalidManifestError(f"{where}: the record of converted values must be a list of dicts")
    by_path: dict[tuple[Any, ...], Record] = {}
    for r in records:
        path = r.get("path")
        if not isinstance(path, list):
            raise InvalidManifestError(f"{where}: a converted value's path must be a list, not {path!r:.80}")
        by_path[tuple(path)] = r
    return _rebuild(value, (), by_path, dict(mappings or {}), where)


def _rebuild(value: Any, path: tuple[Any, ...], records: dict[tuple[Any, ...], Record],
             mappings: dict[str, type], where: str) -> Any:  # fmt: skip
    if not any(p[: len(path)] == path for p in records):
        return value
    t = type(value)
    if t is dict or t is OrderedDict:
        value = t((k, _rebuild(v, (*path, k), records, mappings, where)) for k, v in value.items())
    elif t is list or t is tuple:
        value = t(_rebuild(v, (*path, i), records, mappings, where) for i, v in enumerate(value))
    record = records.get(path)
    return value if record is None else _make(record, value, mappings, f"{where}.{'.'.join(map(str, path))}")


def _make(record: Record, value: Any, mappings: dict[str, type], where: str) -> Any:
    kind, name = record.get("kind"), record.get("class")
    if not isinstance(name, str):
        raise InvalidManifestError(f"{where}: a converted value needs a class name")
    if kind == "path":
        if name not in _PATH_CLASSES or not isinstance(value, str):
            raise InvalidManifestError(f"{where}: not a path: {name!r:.80}")
        return _PATH_CLASSES[name](value)
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise InvalidManifestError(f"{where}: a converted {kind} must be stored as a dict with string keys")
    if kind == "namespace":
        return argparse.Namespace(**value)
    if kind == "mapping":
        if name not in mappings:
            raise InvalidManifestError(f"{where}: unknown mapping class {name!r:.80}")
        return mappings[name](value)
    if kind == "dataclass":
        return _make_dataclass(_imported_class(name, where), value, where)
    raise InvalidManifestError(f"{where}: unknown kind of converted value {str(kind)[:40]!r}")


def _imported_class(name: str, where: str) -> type:
    """The dataclass ``module:qualname`` if its module is already imported (nothing is imported here)."""
    module_name, _, qualname = name.partition(":")
    found: Any = sys.modules.get(module_name)
    for part in qualname.split(".") if found is not None and "<" not in qualname else ["<none>"]:
        found = getattr(found, part, None)
    if not (isinstance(found, type) and dataclasses.is_dataclass(found)):
        raise StateMismatchError(
            f"{where}: the checkpoint holds a {qualname or name!r} dataclass from module {module_name!r}, which is "
            "not imported here (savegame never imports a module a checkpoint names): import it before loading"
        )
    return found


def _make_dataclass(cls: type, values: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if set(values) != set(fields):
        raise StateMismatchError(
            f"{where}: the saved {cls.__qualname__} has fields {sorted(values)}, the class here has {sorted(fields)}"
        )
    obj = cls(**{k: v for k, v in values.items() if fields[k].init})
    for k, v in values.items():
        if not fields[k].init:
            object.__setattr__(obj, k, v)
    return obj
