"""Element types: safetensors dtype codes, their sizes, and the NumPy types that match them.

A tensor file stores each array under a safetensors dtype code (``F32``, ``BF16``, ...). Types that
safetensors has no code for but that are plain fixed-size numbers (``complex128``, ``complex32``,
``datetime64``, ...) are stored as a *view*: the same bytes under a code safetensors knows (``F64``
with a trailing dimension of 2 for ``complex128``, ``U8`` bytes otherwise), and the skeleton records
the logical type so the exact type comes back. Every name here is a fixed table entry: a file can
never make us construct an arbitrary NumPy dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from savegame.errors import InvalidManifestError, InvalidTensorFileError

# safetensors code -> bytes per element. The codes are the ones safetensors' own readers accept.
ITEMSIZE: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

# Codes with a native NumPy type (the rest need ml_dtypes, see _extension_types).
_NUMPY_NATIVE: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "C64": "complex64",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
}

# Codes whose NumPy type comes from ml_dtypes (installed with jax and tensorflow).
_ML_DTYPES: dict[str, str] = {
    "BF16": "bfloat16",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
}


@dataclass(frozen=True)
class ViewType:
    """A logical NumPy type stored under another code: ``code`` elements, ``trailing`` of them each."""

    code: str
    trailing: int  # extra trailing dimension (1 = none)


# Logical NumPy types without a safetensors code, stored as views. Only these names are accepted.
NUMPY_VIEW_TYPES: dict[str, ViewType] = {
    "complex128": ViewType("F64", 2),
    **{f"datetime64[{u}]": ViewType("I64", 1) for u in ("Y", "M", "W", "D", "h", "m", "s", "ms", "us", "ns")},
    **{f"timedelta64[{u}]": ViewType("I64", 1) for u in ("Y", "M", "W", "D", "h", "m", "s", "ms", "us", "ns")},
}


def numpy_dtype(code: str) -> np.dtype[np.generic]:
    """The NumPy dtype for a safetensors code (little-endian). Raises for unknown codes."""
    name = _NUMPY_NATIVE.get(code)
    if name is not None:
        return np.dtype(name).newbyteorder("<")
    ext = _ML_DTYPES.get(code)
    if ext is not None:
        try:
            import ml_dtypes
        except ImportError:
            raise InvalidTensorFileError(
                f"dtype {code} needs the ml_dtypes package to be read as NumPy (pip install ml_dtypes), "
                "or load with torch installed"
            ) from None
        result: np.dtype[np.generic] = np.dtype(getattr(ml_dtypes, ext))
        return result
    raise InvalidTensorFileError(f"unknown dtype code {code!r}")


def numpy_code(dtype: np.dtype[np.generic]) -> tuple[str, str | None]:
    """``(code, logical)`` for a NumPy dtype: the stored code, and the logical name if it is a view.

    Raises ``KeyError`` if the type cannot be stored (object, strings, structured, longdouble...).
    """
    base = dtype.newbyteorder("=") if dtype.byteorder in "<>" else dtype
    for code, name in _NUMPY_NATIVE.items():
        if base == np.dtype(name):
            return code, None
    for code, name in _ML_DTYPES.items():
        if str(base) == name:
            return code, None
    logical = str(base)
    view = NUMPY_VIEW_TYPES.get(logical)
    if view is not None:
        return view.code, logical
    raise KeyError(str(dtype))


# Logical torch types stored as views (see savegame.adapters.torch), with their element sizes: what a
# reader checks without importing torch.
TORCH_VIEW_ITEMSIZE: dict[str, int] = {"complex128": 16, "complex32": 4, "float8_e8m0fnu": 1}


def logical_itemsize(name: object, *, tensor: bool) -> int | None:
    """Element size of a logical view-type name of a ``tensor`` (or NumPy) node; None if unknown."""
    if not isinstance(name, str):
        return None
    if tensor:
        return TORCH_VIEW_ITEMSIZE.get(name)
    return np.dtype(name).itemsize if name in NUMPY_VIEW_TYPES else None


def logical_numpy_dtype(name: str) -> np.dtype[np.generic]:
    """The NumPy dtype for a logical view-type name from a skeleton (fixed whitelist)."""
    if name not in NUMPY_VIEW_TYPES:
        raise InvalidManifestError(f"unknown logical dtype {name[:40]!r}")
    return np.dtype(name)
