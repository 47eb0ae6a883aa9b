"""``savegame diff A B``: what changed between two checkpoints.

Compared: the items; inside each item the keys (state paths) added and removed; tensors whose shape or
dtype changed; tensors whose values changed, with the largest absolute difference ``max|b - a|`` and the
relative difference ``max|b - a| / max|a|``; plain values; progress (epoch, step) and metrics; metadata.
Library versions and commit times are shown but do not count as differences. Exit status 0 when the
checkpoints hold the same state, 1 when anything differs (like ``diff``).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np

from savegame import api
from savegame.cli.common import (
    EXIT_OK,
    EXIT_PROBLEM,
    Cell,
    Context,
    UsageError,
    display_path,
    format_metric,
    format_value,
    print_json,
    render_table,
    shown,
)
from savegame.cli.scan import resolve_checkpoint
from savegame.errors import CheckpointError
from savegame.export import ArrayLeaf, dtype_name, flatten_skeleton
from savegame.format.manifest import Manifest
from savegame.format.tensorfile import TensorFileReader
from savegame.format.tree import numpy_from_node

__all__ = ["cmd_diff", "diff_checkpoints"]

_CHUNK_ELEMENTS = 1 << 22


def _flat(node: Any, prefix: tuple[str, ...]) -> dict[str, Any]:
    return {".".join(path): value for path, value in flatten_skeleton(node, prefix)}


def _as_float(leaf: ArrayLeaf, raw: np.ndarray, code: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The array's values as float64 (complex128 for complex types), or None if NumPy cannot read them."""
    try:
        arr = np.asarray(numpy_from_node(leaf.node, raw, code, shape, ".".join(leaf.path)))
    except CheckpointError:
        if code == "BF16" and leaf.logical is None:
            bits = raw.view("<u2").astype("<u4") << 16
            return np.asarray(bits.view("<f4"), dtype=np.float64)
        return None
    if arr.dtype.kind in "mM":
        arr = arr.view(np.int64)
    if arr.dtype.kind == "c":
        return arr.reshape(-1).astype(np.complex128)
    try:
        return arr.reshape(-1).astype(np.float64)
    except (TypeError, ValueError):
        return None


def _compare(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max |b - a|, max |b - a| / max |a|), in chunks to bound memory; NaN where NaNs disagree."""
    max_abs = 0.0
    max_a = 0.0
    for start in range(0, a.size, _CHUNK_ELEMENTS):
        x = a[start : start + _CHUNK_ELEMENTS]
        y = b[start : start + _CHUNK_ELEMENTS]
        nan_x, nan_y = np.isnan(x), np.isnan(y)
        if np.any(nan_x != nan_y):
            max_abs = math.nan
        both = ~(nan_x | nan_y)
        with np.errstate(invalid="ignore", over="ignore"):
            d = np.abs(y[both] - x[both])
            finite_x = np.abs(x[both])
        if d.size:
            dm = float(np.max(d))
            max_abs = dm if math.isnan(dm) or math.isnan(max_abs) else max(max_abs, dm)
            max_a = max(max_a, float(np.max(finite_x)))
    if math.isnan(max_abs):
        return max_abs, math.nan
    rel = max_abs / max_a if max_a > 0 else (0.0 if max_abs == 0 else math.inf)
    return max_abs, rel


def _plain_diff(a: Any, b: Any, prefix: str = "") -> list[dict[str, Any]]:
    """Flat differences between two plain nested values (metadata)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in list(a) + [k for k in b if k not in a]:
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in b:
                out.append({"path": path, "a": a[key], "b": None, "change": "removed"})
            elif key not in a:
                out.append({"path": path, "a": None, "b": b[key], "change": "added"})
            else:
                out += _plain_diff(a[key], b[key], path)
        return out
    if _same_value(a, b):
        return []
    return [{"path": prefix or "<root>", "a": a, "b": b, "change": "changed"}]


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and bool(a == b)


def _reader(path: str, manifest: Manifest, item: str, verify: bool) -> TensorFileReader | None:
    return api.open_item(path, manifest, item, verify=verify)


def diff_checkpoints(path_a: str, path_b: str, *, verify: bool = True, only: str | None = None) -> dict[str, Any]:
    """The differences between checkpoints ``path_a`` and ``path_b`` (directories) as JSON-ready data."""
    ma, mb = api.read_manifest(path_a), api.read_manifest(path_b)
    items_a, items_b = list(ma.items), list(mb.items)
    if only is not None and only not in ma.items and only not in mb.items:
        known = ", ".join(sorted(set(ma.items) | set(mb.items))[:20]) or "none"
        raise UsageError(f"no item {only!r} in either checkpoint (items: {known})")
    if only is not None:
        items_a = [i for i in items_a if i == only]
        items_b = [i for i in items_b if i == only]
    result: dict[str, Any] = {
        "a": path_a,
        "b": path_b,
        "items": {"added": [i for i in items_b if i not in ma.items],
                  "removed": [i for i in items_a if i not in mb.items]},
        "added": [], "removed": [], "changed": [], "retyped": [], "values": [], "unchanged_tensors": 0,
    }  # fmt: skip
    for item in [i for i in items_a if i in mb.items]:
        ea, eb = ma.items[item], mb.items[item]
        fa, fb = (ma.files.get(ea.file) if ea.file else None), (mb.files.get(eb.file) if eb.file else None)
        flat_a, flat_b = _flat(ea.skeleton, (item,)), _flat(eb.skeleton, (item,))
        same_files = fa is not None and fb is not None and fa.hash == fb.hash and not ea.linked and not eb.linked
        if ea.skeleton == eb.skeleton and same_files:
            result["unchanged_tensors"] += sum(isinstance(v, ArrayLeaf) for v in flat_a.values())
            continue  # byte-identical tensor file and structure
        ra, rb = _reader(path_a, ma, item, verify), _reader(path_b, mb, item, verify)
        for path, va in flat_a.items():
            if path not in flat_b:
                result["removed"].append({"path": path, "kind": "tensor" if isinstance(va, ArrayLeaf) else "value"})
                continue
            vb = flat_b[path]
            if isinstance(va, ArrayLeaf) and isinstance(vb, ArrayLeaf) and ra is not None and rb is not None:
                _diff_arrays(path, va, vb, ra, rb, result)
            elif isinstance(va, ArrayLeaf) or isinstance(vb, ArrayLeaf):
                result["retyped"].append({"path": path, "a": _kind(va), "b": _kind(vb)})
            elif not _same_value(va, vb):
                result["values"].append({"path": path, "a": va, "b": vb})
        for path, vb in flat_b.items():
            if path not in flat_a:
                result["added"].append({"path": path, "kind": "tensor" if isinstance(vb, ArrayLeaf) else "value"})
    pa = ma.progress if isinstance(ma.progress, dict) else {}
    pb = mb.progress if isinstance(mb.progress, dict) else {}
    result["progress"] = [{"name": k, "a": pa.get(k), "b": pb.get(k)}
                          for k in ("epoch", "step") if not _same_value(pa.get(k), pb.get(k))]  # fmt: skip
    metrics_a = pa.get("metrics") if isinstance(pa.get("metrics"), dict) else {}
    metrics_b = pb.get("metrics") if isinstance(pb.get("metrics"), dict) else {}
    result["metrics"] = [{"name": d["path"], "a": d["a"], "b": d["b"]} for d in _plain_diff(metrics_a, metrics_b)]
    result["metadata"] = _plain_diff(ma.metadata, mb.metadata)
    result["versions"] = [{"name": k, "a": ma.versions.get(k), "b": mb.versions.get(k)}
                          for k in sorted(set(ma.versions) | set(mb.versions))
                          if ma.versions.get(k) != mb.versions.get(k)]  # fmt: skip
    result["identical"] = not any(
        result[k] for k in ("added", "removed", "changed", "retyped", "values", "progress", "metrics", "metadata")
    ) and not result["items"]["added"] and not result["items"]["removed"]
    return result


def _kind(value: Any) -> str:
    return "tensor" if isinstance(value, ArrayLeaf) else type(value).__name__


def _diff_arrays(path: str, va: ArrayLeaf, vb: ArrayLeaf, ra: TensorFileReader, rb: TensorFileReader,
                 result: dict[str, Any]) -> None:  # fmt: skip
    ia, ib = ra.tensors.get(va.key), rb.tensors.get(vb.key)
    if ia is None or ib is None:
        raise CheckpointError(f"{path}: array missing from its tensor file")
    da, db = dtype_name(ia.code, va.logical), dtype_name(ib.code, vb.logical)
    sa, sb = va.shape(ia.shape), vb.shape(ib.shape)
    if da != db or sa != sb:
        result["retyped"].append({"path": path, "a": {"dtype": da, "shape": sa}, "b": {"dtype": db, "shape": sb}})
        return
    raw_a, raw_b = ra.raw(va.key), rb.raw(vb.key)
    if np.array_equal(raw_a, raw_b):
        result["unchanged_tensors"] += 1
        return
    fa, fb = _as_float(va, raw_a, ia.code, ia.shape), _as_float(vb, raw_b, ib.code, ib.shape)
    if fa is None or fb is None:
        max_abs = rel = None
    else:
        max_abs, rel = _compare(fa, fb)  # 0.0 when only the bits differ (-0.0 vs 0.0, NaN payloads)
    count = int(np.prod(sa)) if sa else 1
    result["changed"].append({"path": path, "dtype": da, "shape": sa, "elements": count,
                              "max_abs": max_abs, "rel": rel})  # fmt: skip


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return format_metric(value)
    return format_value(value, 60)


def cmd_diff(args: argparse.Namespace, ctx: Context) -> int:
    """``savegame diff A B``."""
    path_a = resolve_checkpoint(args.a)
    path_b = resolve_checkpoint(args.b)
    result = diff_checkpoints(path_a, path_b, verify=not args.no_verify, only=args.item)
    if args.json:
        print_json(result, ctx.out)
        return EXIT_OK if result["identical"] else EXIT_PROBLEM
    st = ctx.style
    ctx.print(st.paint(f"--- a: {display_path(path_a)}", "red"))
    ctx.print(st.paint(f"+++ b: {display_path(path_b)}", "green"))
    for entry in result["progress"]:
        ctx.print(f"progress  {entry['name']}: {shown(entry['a'])} -> {shown(entry['b'])}")
    for entry in result["metrics"]:
        a, b = entry["a"], entry["b"]
        delta = ""
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            delta = f"  ({b - a:+.4g})"
        ctx.print(f"metric    {shown(entry['name'])}: {_fmt(a)} -> {_fmt(b)}{delta}")
    for entry in result["metadata"]:
        ctx.print(f"metadata  {shown(entry['path'])}: {_fmt(entry['a'])} -> {_fmt(entry['b'])}")
    for entry in result["versions"]:
        change = f"{shown(entry['name'])}: {shown(entry['a'])} -> {shown(entry['b'])}"
        ctx.print(st.paint(f"version   {change} (not a difference)", "dim"))
    for item in result["items"]["added"]:
        ctx.print(st.paint(f"+ item {shown(item)}", "green"))
    for item in result["items"]["removed"]:
        ctx.print(st.paint(f"- item {shown(item)}", "red"))
    for entry in result["removed"]:
        ctx.print(st.paint(f"- {shown(entry['path'])} ({entry['kind']})", "red"))
    for entry in result["added"]:
        ctx.print(st.paint(f"+ {shown(entry['path'])} ({entry['kind']})", "green"))
    for entry in result["retyped"]:
        a, b = entry["a"], entry["b"]
        if isinstance(a, dict) and isinstance(b, dict):
            what = f"{a['dtype']} {a['shape']} -> {b['dtype']} {b['shape']}"
        else:
            what = f"{a} -> {b}"
        ctx.print(st.paint(f"! {shown(entry['path'])}: {shown(what)}", "yellow"))
    if result["changed"]:
        rows: list[list[Cell]] = []
        for entry in result["changed"]:
            exact = entry["max_abs"] is None
            numbers = ["bytes differ", ""] if exact else [f"{entry['max_abs']:.3g}", f"{entry['rel']:.3g}"]
            rows.append([("~", lambda s: st.paint(s, "yellow")), entry["path"], entry["dtype"], str(entry["shape"]),
                         *numbers])  # fmt: skip
        ctx.print(render_table(["", "tensor", "dtype", "shape", "max abs", "rel"], rows, right=[4, 5], style=st))
    for entry in result["values"]:
        ctx.print(f"{st.paint('~', 'yellow')} {shown(entry['path'])}: {_fmt(entry['a'])} -> {_fmt(entry['b'])}")
    changed = len(result["changed"])
    summary = (f"{changed} tensor{'s' if changed != 1 else ''} changed, {result['unchanged_tensors']} unchanged, "
               f"{len(result['added'])} keys added, {len(result['removed'])} removed, "
               f"{len(result['retyped'])} shape/dtype changes, {len(result['values'])} values changed")  # fmt: skip
    ctx.print("identical state" if result["identical"] else summary)
    return EXIT_OK if result["identical"] else EXIT_PROBLEM
