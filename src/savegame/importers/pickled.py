"""Files written by ``torch.save`` (``.pt``, ``.pth``, ``.bin``, Lightning's ``.ckpt``), read without
running their code.

A pickle is a program: it may name any importable function (``os.system``, ``pathlib.Path.touch``) and
call it while it is read. So a file is first *disassembled* with :mod:`pickletools` (which decodes
opcodes and never imports or calls anything): every ``GLOBAL`` / ``STACK_GLOBAL`` / ``INST`` / ``OBJ``
name it would import is collected, and a file naming anything outside torch's weights-only allowlist
(tensors, storages, ``OrderedDict``, dtypes...) is refused with :class:`UnsafePickleError` naming it.
Only then is it read, and only with ``torch.load(weights_only=True)``, torch's restricted unpickler
that builds tensors and plain containers and nothing else (the second wall, should the scan miss one).

Both of torch's layouts are handled: the zip archive (``archive/data.pkl`` + one member per storage;
the tensors are memory-mapped, not read into memory) and the legacy layout (a few pickles followed by
raw storage bytes). TorchScript archives hold code and are refused.
"""

from __future__ import annotations

import io
import os
import pickletools
import zipfile
from typing import Any

from savegame.errors import DamagedSourceError, UnsafePickleError
from savegame.importers.archive import check_archive, open_archive, read_member
from savegame.importers.needs import need

__all__ = ["MAX_PICKLE_BYTES", "globals_in", "load_weights_only", "refuse_unsafe"]

MAX_PICKLE_BYTES = 1 << 30
"""Largest pickle (the structure of the state, not its tensor data) that is disassembled: 1 GiB."""

MAX_TOTAL_BYTES = 1 << 44
"""Largest total a torch zip may unpack to (16 TiB): its members are stored, not compressed."""

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_LEGACY_PICKLES = 5  # magic number, protocol, sys info, the object, the storage keys


def globals_in(data: bytes, where: str) -> tuple[set[str], int]:
    """The ``module.name`` of every global the pickle at the start of ``data`` would import, and the
    length of that pickle. Decodes opcodes only: nothing is imported or called.

    ``STACK_GLOBAL`` takes its two names from the stack; they are followed through the memo (``BINGET``
    of a string pushed earlier). A name that is not a literal string cannot be checked, and is reported
    as ``<computed>`` (so the file is refused)."""
    found: set[str] = set()
    stack: list[str | None] = []  # the strings pushed most recently (None: a value that is not a string)
    memo: dict[int, str | None] = {}
    end = 0
    stream = io.BytesIO(data)
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            name = opcode.name
            end = stream.tell()
            if name in _STRING_OPS:
                text = arg.decode("latin-1") if isinstance(arg, bytes) else arg
                stack.append(text if isinstance(text, str) else None)
            elif name in _GET_OPS:
                stack.append(memo.get(arg) if isinstance(arg, int) else None)
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else None
            elif name in _PUT_OPS and isinstance(arg, int):
                memo[arg] = stack[-1] if stack else None
            elif name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                found.add(f"{_PY2_MODULES.get(module, module)}.{attr}")
                stack.append(None)
            elif name == "STACK_GLOBAL":
                pair = stack[-2:] if len(stack) >= 2 else [None, None]
                found.add(f"{pair[0]}.{pair[1]}" if pair[0] is not None and pair[1] is not None else "<computed>")
                stack.append(None)
            elif name in ("EXT1", "EXT2", "EXT4"):
                found.add(f"<copyreg extension {arg}>")
            elif name in ("FRAME", "PROTO", "STOP"):
                pass
            else:
                stack.append(None)
                del stack[:-4]
            if name == "STOP":
                break
    except (ValueError, EOFError, UnicodeDecodeError, OverflowError) as exc:
        raise DamagedSourceError(
            f"{where}: the pickle is truncated or malformed ({exc}); copy the file again"
        ) from None
    return found, end


def _allowed() -> set[str]:
    """What ``torch.load(weights_only=True)`` builds: torch's default allowlist and the user's additions."""
    torch = need("torch", "reading torch files (.pt, .pth, .bin, .ckpt)")

    allowed = set()
    try:
        from torch import _weights_only_unpickler as restricted

        allowed |= set(restricted._get_allowed_globals())
    except (ImportError, AttributeError):  # pragma: no cover - a torch without it: its load still refuses
        pass
    for entry in torch.serialization.get_safe_globals():
        obj = entry[0] if isinstance(entry, tuple) else entry
        allowed.add(entry[1] if isinstance(entry, tuple) else f"{obj.__module__}.{obj.__qualname__}")
    return allowed


def _pickles(path: str) -> tuple[list[bytes], bool]:
    """The pickles of a torch file to check, and whether it is a zip archive."""
    if zipfile.is_zipfile(path):
        archive = open_archive(path)
        with archive:
            check_archive(archive, path, max_total=MAX_TOTAL_BYTES)
            names = archive.namelist()
            if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
                raise UnsafePickleError(
                    f"{path}: a TorchScript archive (it holds code, not only tensors); load it with "
                    "torch.jit.load in your own code and convert model.state_dict()", ("<torchscript>",)
                )
            data = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
            if len(data) != 1:
                raise DamagedSourceError(f"{path}: a zip archive without torch's data.pkl (members: {names[:5]}...)")
            return [read_member(archive, data[0], path, limit=MAX_PICKLE_BYTES)], True
    with open(path, "rb") as f:
        head = f.read(min(os.path.getsize(path), MAX_PICKLE_BYTES))
    if head.startswith(b"PK\x03\x04"):
        raise DamagedSourceError(
            f"{path}: a zip archive (torch's file format) whose end is missing: the file is truncated; copy it again"
        )
    out = []
    rest = head
    for i in range(_LEGACY_PICKLES):
        if not rest or (rest[:1] != b"\x80" and i > 0):
            break
        found_end = _pickle_length(rest, path, first=i == 0)
        if found_end is None:
            break
        out.append(rest[:found_end])
        rest = rest[found_end:]
    return out, False


def _pickle_length(data: bytes, path: str, *, first: bool) -> int | None:
    try:
        return globals_in(data, path)[1]
    except DamagedSourceError:
        if first:
            raise
        return None  # raw storage bytes after the last pickle


def refuse_unsafe(path: str) -> bool:
    """Disassemble the pickles of ``path`` and raise :class:`UnsafePickleError` if any names a global
    outside the weights-only allowlist; return whether it is a zip archive."""
    pickles, is_zip = _pickles(path)
    if not pickles:
        raise DamagedSourceError(f"{path}: not a torch file (no pickle at its start); is it another format?")
    wanted: set[str] = set()
    for data in pickles:
        wanted |= globals_in(data, path)[0]
    unsafe = sorted(wanted - _allowed())
    if unsafe:
        shown = ", ".join(unsafe[:10]) + (f" and {len(unsafe) - 10} more" if len(unsafe) > 10 else "")
        raise UnsafePickleError(
            f"{path}: unpickling it needs code: it wants {shown}, which are not tensors or plain containers; "
            "the file was not loaded and nothing in it was run. If you trust it, load it in a program that "
            "has those classes (torch.load(path, weights_only=False) runs the file's code) and save the plain "
            "state instead: torch.save({'model_state_dict': model.state_dict(), ...}) for this command, or "
            "savegame.save(...) directly",
            tuple(unsafe),
        )
    return is_zip


def load_weights_only(path: str) -> Any:
    """The object in torch file ``path``, checked by :func:`refuse_unsafe` and then read with
    ``torch.load(weights_only=True)`` on the CPU (memory-mapped for the zip layout)."""
    torch = need("torch", "reading torch files (.pt, .pth, .bin, .ckpt)")

    if not os.path.isfile(path):
        raise DamagedSourceError(f"{path}: not a file")
    is_zip = refuse_unsafe(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as exc:  # torch's restricted unpickler, zip reader, or truncated storage data
        if type(exc).__name__ == "UnpicklingError":
            raise UnsafePickleError(
                f"{path}: torch's weights-only loader refused it: {' '.join(str(exc).split())[:500]}"
            ) from None
        raise DamagedSourceError(
            f"{path}: cannot be read as a torch file ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); "
            "it is truncated or damaged: copy it again"
        ) from None
