"""Hugging Face model directories (``save_pretrained``) -> the items ``model`` and ``config``.

A directory with ``config.json`` and its weights: ``model.safetensors`` (read with the safetensors
library), ``pytorch_model.bin`` (a torch pickle, read as every torch file is: disassembled first, then
``torch.load(weights_only=True)``), or their sharded forms with an ``*.index.json`` naming the shards.
``config.json`` is parsed as JSON and stored as the item ``config``: nothing in it is run (an
``auto_map`` pointing at remote code is noted, never followed). Restore with
``model = AutoModelForCausalLM.from_config(PretrainedConfig(**config))``-style code and
``savegame.load(dest, {"model": model})``; weights that the model ties (``lm_head.weight`` to the input
embeddings) are not in the files, so a strict load reports them missing: pass ``strict=False`` and see
``report.missing_keys`` (tied weights share memory with a loaded one, so they are restored too).
Other files (tokenizer, generation config, README) are not part of the model's state: they are listed as
skipped.
"""

from __future__ import annotations

import json
import os
from typing import Any

from savegame.errors import DamagedSourceError, UnknownSourceFormatError
from savegame.importers.pickled import load_weights_only
from savegame.importers.plain import Plain
from savegame.importers.report import Found
from savegame.importers.tensors import read_safetensors

__all__ = ["MAX_JSON_BYTES", "WEIGHTS", "read_hf_dir", "read_json"]

MAX_JSON_BYTES = 64 << 20
"""Largest ``config.json`` / index file read (64 MiB)."""

WEIGHTS = ("model.safetensors", "pytorch_model.bin")
"""Weight files, in order of preference (each may be sharded: ``NAME.index.json``)."""

_MAX_SHARDS = 100_000


def read_json(path: str) -> Any:
    """A JSON file of at most :data:`MAX_JSON_BYTES`, or :class:`DamagedSourceError`."""
    with open(path, "rb") as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise DamagedSourceError(f"{path}: larger than {MAX_JSON_BYTES:,} bytes")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise DamagedSourceError(f"{path}: not valid JSON ({exc}); the file is truncated or damaged") from None


def _weight_files(directory: str) -> tuple[str, list[str]]:
    """``(kind, files)``: the weight files of the directory, in load order."""
    for name in WEIGHTS:
        if os.path.isfile(os.path.join(directory, name)):
            return name, [name]
        index = os.path.join(directory, name + ".index.json")
        if os.path.isfile(index):
            weight_map = read_json(index).get("weight_map") if isinstance(read_json(index), dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise DamagedSourceError(f"{index}: no 'weight_map' of tensor names to shard files")
            shards = sorted(set(weight_map.values()))
            if len(shards) > _MAX_SHARDS or any(os.path.basename(s) != s or s.startswith(".") for s in shards):
                raise DamagedSourceError(f"{index}: shard names must be plain file names in the directory")
            missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
            if missing:
                raise DamagedSourceError(f"{index}: shard files missing from the directory: {missing[:5]}")
            return name, shards
    raise UnknownSourceFormatError(
        f"{directory}: a Hugging Face model directory needs its weights next to config.json: "
        f"{' or '.join(WEIGHTS)} (or a sharded NAME.index.json); none is there"
    )


def read_hf_dir(directory: str) -> Found:
    """Read a ``save_pretrained`` directory (see the module docstring)."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise UnknownSourceFormatError(
            f"{directory}: a directory is imported as a Hugging Face model directory, which needs config.json "
            "(and model.safetensors or pytorch_model.bin); none here. For a run directory of .pth files, "
            "pass a name template (--template 'model_{epoch:02d}_{val_acc:.3f}.pth')"
        )
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise DamagedSourceError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    kind, files = _weight_files(directory)
    found = Found(format="huggingface")
    tensors: dict[str, Any] = {}
    for name in files:
        path = os.path.join(directory, name)
        part = read_safetensors(path)[0] if kind.endswith(".safetensors") else load_weights_only(path)
        if not isinstance(part, dict):
            raise DamagedSourceError(f"{path}: expected a dict of tensors, got {type(part).__name__}")
        clash = sorted(set(part) & set(tensors))
        if clash:
            raise DamagedSourceError(f"{path}: tensors {clash[:5]} are in two shards")
        tensors.update(part)
    plain = Plain(directory)
    for item, value, source in (("model", tensors, ", ".join(files)), ("config", config, "config.json")):
        keep, stored = plain.value(value, item)
        if keep:
            found.items[item] = stored
            found.sources[item] = source
    found.metadata.update({k: config[k] for k in ("architectures", "model_type", "transformers_version")
                           if k in config})  # fmt: skip
    if "auto_map" in config:
        found.converted.append("config.json has auto_map (remote code): stored as data, never run")
    used = {"config.json", *files, kind + ".index.json"}
    found.skipped += [f"{n}: not part of the model's state" for n in sorted(os.listdir(directory)) if n not in used]
    found.converted += plain.converted
    found.skipped += plain.skipped
    return found
