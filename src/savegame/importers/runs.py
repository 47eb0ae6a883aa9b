"""A run directory of checkpoint files (``model_{epoch:02d}_{val_acc:.3f}.pth``) -> one savegame run root.

Every file of the directory whose name matches ``template`` is read like a single torch file and saved
through a :class:`savegame.Checkpointer` (in epoch order, under the file's name without its suffix),
with the epoch, step and metrics the template recovers from the name, so that ``savegame ls``, ``best``
and ``Checkpointer.restore`` work on the result. The first metric field of the template is the one the
run monitors (``mode`` ``auto``: accuracies up, losses down). Files that do not match are listed as
skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import string
import tempfile
from dataclasses import dataclass

from savegame.errors import ConfigError, UnknownSourceFormatError
from savegame.importers.plain import array_stats
from savegame.importers.report import ImportReport, ItemSummary
from savegame.importers.torchfiles import read_torch
from savegame.storage.local import DEFAULT_OPS

__all__ = ["FileTemplate", "import_run_directory"]

_INT_FIELDS = ("epoch", "step")
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf)"
_MAX_FILES = 100_000


@dataclass(frozen=True)
class FileTemplate:
    """A file name template in ``str.format`` syntax, turned into a pattern that recovers its fields."""

    text: str
    pattern: re.Pattern[str]
    metrics: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> FileTemplate:
        """Check ``text`` (fields must be plain names; at least one) and build its pattern."""
        regex, fields, metrics = "", [], []
        try:
            parts = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise ConfigError(f"template {text!r}: {exc}") from None
        for literal, field, _spec, _conversion in parts:
            regex += re.escape(literal)
            if field is None:
                continue
            if not field.isidentifier() or field in fields:
                raise ConfigError(f"template {text!r}: field {field!r} must be a plain name, used once")
            fields.append(field)
            regex += rf"(?P<{field}>\d+)" if field in _INT_FIELDS else rf"(?P<{field}>{_NUMBER})"
            if field not in _INT_FIELDS:
                metrics.append(field)
        if not fields:
            raise ConfigError(f"template {text!r}: no field ({{epoch:02d}}, {{val_acc:.3f}}...) to recover")
        return cls(text, re.compile(regex), tuple(metrics))

    def match(self, name: str) -> dict[str, float | int] | None:
        """The fields of file name ``name``, or None when it does not match."""
        m = self.pattern.fullmatch(name)
        if m is None:
            return None
        return {k: int(v) if k in _INT_FIELDS else float(v) for k, v in m.groupdict().items()}


def import_run_directory(src: str, dest: str, *, template: str, mode: str = "auto") -> ImportReport:
    """Import every file of ``src`` matching ``template`` into the run root ``dest`` (module docstring).

    The root is written in a hidden folder next to ``dest`` and renamed to ``dest`` once every file is
    in: a file that cannot be imported (a pickle that needs code, a truncated file) leaves nothing."""
    if mode not in ("auto", "min", "max"):
        raise ConfigError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    parsed = FileTemplate.parse(template)
    names = sorted(os.listdir(src))[: _MAX_FILES + 1]
    if len(names) > _MAX_FILES:
        raise ConfigError(f"{src}: more than {_MAX_FILES:,} files")
    matched = [(fields, n) for n in names
               if (fields := parsed.match(n)) is not None and os.path.isfile(os.path.join(src, n))]  # fmt: skip
    if not matched:
        raise UnknownSourceFormatError(f"{src}: no file name matches the template {template!r} (files: {names[:5]})")
    matched.sort(key=lambda fn: (int(fn[0].get("epoch", 0)), int(fn[0].get("step", 0)), fn[1]))
    skipped = [f"{n}: does not match the template" for n in names if n not in {m for _, m in matched}]
    monitor = parsed.metrics[0] if parsed.metrics else None
    items: dict[str, ItemSummary] = {}
    converted: list[str] = []
    written: list[str] = []
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)[:100]}.importing-", dir=parent)
    root = os.path.join(staging, "root")
    try:
        best = _write_root(root, src, matched, monitor=monitor, mode=mode, written=written, items=items,
                           converted=converted, skipped=skipped)  # fmt: skip
        if os.path.lexists(dest):
            raise ConfigError(f"{dest} appeared while importing; the import is not published there")
        os.rename(root, dest)  # the whole run root appears at once, or not at all
        DEFAULT_OPS.fsync_dir(parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress = {"files": len(written), "monitor": monitor, "best": best}
    return ImportReport(source=os.path.abspath(src), dest=os.path.abspath(dest), format="run-directory",
                        items=tuple(items.values()), checkpoints=tuple(written), progress=progress,
                        converted=tuple(converted), skipped=tuple(skipped))  # fmt: skip


def _write_root(
    root: str, src: str, matched: list[tuple[dict[str, float | int], str]], *, monitor: str | None, mode: str,
    written: list[str], items: dict[str, ItemSummary], converted: list[str], skipped: list[str],
) -> str | None:  # fmt: skip
    """Save each matched file of ``src`` into the new run root ``root``; return the best's name."""
    from savegame.run.checkpointer import Checkpointer

    ckpt = Checkpointer(root, monitor=monitor, mode=mode if monitor else "auto", rng=False,  # type: ignore[arg-type]
                        restart="off",
                        metadata={"imported_from": os.path.abspath(src)})  # fmt: skip
    try:
        for fields, name in matched:
            found = read_torch(os.path.join(src, name))
            recorded = found.progress.get("metrics")
            metrics = {**(recorded if isinstance(recorded, dict) else {}),
                       **{k: v for k, v in fields.items() if k not in _INT_FIELDS}}  # fmt: skip
            epoch = fields.get("epoch", found.progress.get("epoch"))
            step = fields.get("step", found.progress.get("step"))
            result = ckpt.save(found.items, name=_stem(name), epoch=int(epoch) if epoch is not None else None,
                               step=int(step) if step is not None else None, metrics=metrics)  # fmt: skip
            written.append(result.name)
            converted += [f"{name}: {line}" for line in found.converted]
            skipped += [f"{name}: {line}" for line in found.skipped]
            for item, value in found.items.items():
                count, size = array_stats(value)
                old = items.get(item)
                items[item] = ItemSummary(item, f"each of {len(written)} files",
                                          count + (old.tensors if old else 0), size + (old.bytes if old else 0))
        best = ckpt.best
    finally:
        ckpt.close()
    return best.name if best is not None else None



def _stem(name: str) -> str:
    base = os.path.splitext(name)[0]
    return base if base and not base.startswith(".") else name
