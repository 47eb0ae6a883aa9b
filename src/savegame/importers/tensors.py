"""Plain ``.safetensors`` files -> ``{name: tensor}``, read with the ``safetensors`` library (no code).

Used for a lone ``.safetensors`` file (the item ``model``) and for the weights of Hugging Face model
directories. Tensors come back as torch tensors when torch is installed (every dtype, ``bfloat16``
included), as NumPy arrays otherwise. The header is bounded by the library (100 MB) and checked
against the file's size; a truncated or malformed file raises :class:`DamagedSourceError`.
"""

from __future__ import annotations

import os
from typing import Any

from savegame.errors import DamagedSourceError
from savegame.importers.needs import need
from savegame.importers.plain import Plain
from savegame.importers.report import Found

__all__ = ["read_safetensors", "read_safetensors_file"]


def read_safetensors(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """``(tensors, header metadata)`` of the safetensors file ``path``."""
    from safetensors import safe_open

    from savegame.adapters import torch_available

    framework = "pt" if torch_available() else "np"
    try:
        with safe_open(path, framework=framework) as f:  # type: ignore[no-untyped-call]
            metadata = dict(f.metadata() or {})
            if framework == "np":
                _check_numpy_dtypes(f, path)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        raise _damaged(path, exc) from None
    except Exception as exc:  # safetensors_rust.SafetensorError derives from Exception only
        if type(exc).__name__ != "SafetensorError":
            raise
        raise _damaged(path, exc) from None
    return tensors, metadata


_TORCH_ONLY_DTYPES = frozenset({"BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})


def _check_numpy_dtypes(f: Any, path: str) -> None:
    """Without torch, tensors are read as NumPy arrays: refuse dtypes NumPy has no type for, naming the extra."""
    for name in f.keys():
        dtype = f.get_slice(name).get_dtype()
        if dtype in _TORCH_ONLY_DTYPES:
            need("torch", f"reading the {dtype} tensor {name!r} of {path}")


def _damaged(path: str, exc: BaseException) -> DamagedSourceError:
    size = os.path.getsize(path) if os.path.exists(path) else 0
    return DamagedSourceError(
        f"{path}: not a readable safetensors file ({size:,} bytes; {type(exc).__name__}: "
        f"{' '.join(str(exc).split())[:300]}); it is truncated or damaged: copy it again"
    )


def read_safetensors_file(path: str) -> Found:
    """A lone ``.safetensors`` file as the item ``model``; its header metadata goes to the metadata."""
    tensors, metadata = read_safetensors(path)
    found = Found(format="safetensors")
    plain = Plain(path)
    keep, stored = plain.value(tensors, "model")
    if keep:
        found.items["model"] = stored
        found.sources["model"] = os.path.basename(path)
    if metadata:
        found.metadata["safetensors_metadata"] = metadata
    found.converted += plain.converted
    found.skipped += plain.skipped
    return found
