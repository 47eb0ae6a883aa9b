"""No pickle, ever: the source never loads pickle-style, and a pickle dressed as a checkpoint is never run."""

from __future__ import annotations

import ast
import io
import os
import pathlib
import pickle
import re
import struct
import tokenize
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import savegame
from savegame.errors import CheckpointError

SRC = Path(savegame.__file__).resolve().parent
BANNED_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}

# Text patterns, matched against the code with comments and string literals blanked out.
PATTERNS = {
    "import pickle": re.compile(r"\bimport\s+(?:\w+\s*,\s*)*(?:_?pickle|cPickle)\b"),
    "from pickle": re.compile(r"\bfrom\s+(?:_?pickle|cPickle)\b"),
    "cloudpickle": re.compile(r"\bcloudpickle\b"),
    "dill": re.compile(r"\bdill\b"),
    "marshal": re.compile(r"\bmarshal\b"),
    "torch.load(": re.compile(r"\btorch\s*\.\s*load\s*\("),
    "allow_pickle=True": re.compile(r"\ballow_pickle\s*=\s*(?!False\b)"),
    "eval(": re.compile(r"(?<![\w.])eval\s*\("),
    "exec(": re.compile(r"(?<![\w.])exec\s*\("),
    "pickle.load": re.compile(r"\bpickle\s*\.\s*(?:loads?|Unpickler)\b"),
}


def _code_only(source: str) -> str:
    """``source`` with comments and string literals (docstrings included) replaced by spaces."""
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    chars = list(source)
    blank = {tokenize.STRING, tokenize.COMMENT, getattr(tokenize, "FSTRING_MIDDLE", -1)}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in blank:
            begin = starts[tok.start[0] - 1] + tok.start[1]
            end = starts[tok.end[0] - 1] + tok.end[1]
            for i in range(begin, end):
                if chars[i] != "\n":
                    chars[i] = " "
    return "".join(chars)


def _ast_offences(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in BANNED_MODULES:
                    found.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in BANNED_MODULES:
                found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call):
            func = node.func
            name = ast.unparse(func)
            if isinstance(func, ast.Name) and func.id in ("eval", "exec", "__import__"):
                found.append((node.lineno, f"{func.id}(...)"))
            if name in ("torch.load", "pickle.load", "pickle.loads", "pickle.Unpickler", "np.load", "numpy.load"):
                allow = [k for k in node.keywords if k.arg == "allow_pickle"]
                if name == "torch.load" and _weights_only(node):
                    continue  # torch's restricted unpickler: tensors and plain containers only
                if not name.endswith("np.load") and name != "numpy.load":
                    found.append((node.lineno, f"{name}(...)"))
                elif any(not (isinstance(k.value, ast.Constant) and k.value.value is False) for k in allow):
                    found.append((node.lineno, f"{name}(..., allow_pickle=...)"))
    return found


def _weights_only(call: ast.Call) -> bool:
    """``torch.load(..., weights_only=True)`` with the literal True (a variable could be False)."""
    return any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
               for k in call.keywords)  # fmt: skip


def _weights_only_lines(tree: ast.AST) -> set[int]:
    """Lines of ``torch.load(..., weights_only=True)`` calls, which the text pattern must not flag."""
    return {node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
            and ast.unparse(node.func) == "torch.load" and _weights_only(node)}  # fmt: skip


def scan(root: Path) -> list[str]:
    """Every pickle-style loading construct in the .py files under ``root``, as ``file:line: what``."""
    offenders = []
    for file in sorted(root.rglob("*.py")):
        source = file.read_text(encoding="utf-8")
        rel = file.relative_to(root)
        tree = ast.parse(source, filename=str(file))
        for lineno, what in _ast_offences(tree):
            offenders.append(f"{rel}:{lineno}: {what}")
        safe = _weights_only_lines(tree)
        code = _code_only(source)
        for what, pattern in PATTERNS.items():
            for m in pattern.finditer(code):
                line = code.count(chr(10), 0, m.start()) + 1
                if not (what == "torch.load(" and line in safe):
                    offenders.append(f"{rel}:{line}: {what}")
    return sorted(set(offenders))


def test_source_has_no_pickle_style_loading() -> None:
    files = list(SRC.rglob("*.py"))
    assert len(files) > 10 and (SRC / "api.py") in files and (SRC / "storage" / "local" / "write.py") in files
    offenders = scan(SRC)
    assert not offenders, "pickle-style loading in src/savegame:\n" + "\n".join(offenders)


def test_scanner_finds_what_it_looks_for(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text(
        "import os, pickle\n"
        "from dill import loads\n"
        "import cloudpickle as cp\n"
        "import marshal\n"
        "import numpy as np\n"
        "import torch\n"
        "x = torch.load('m.pt')\n"
        "y = np.load('a.npy', allow_pickle=True)\n"
        "z = eval('1+1')\n"
        "exec('pass')\n"
        "w = pickle.loads(b'')\n"
        "v = torch.load('m.pt', weights_only=False)\n"
        "u = torch.load('m.pt', weights_only=flag)\n"
    )
    (tmp_path / "good.py").write_text(
        '"""Unlike torch.load(...), we never import pickle; eval( and exec( in prose are fine."""\n'
        "import ast\n"
        "import numpy as np\n"
        "# torch.load( in a comment\n"
        "model = None\n"
        "def f(model, text):\n"
        "    model.eval()\n"
        "    return ast.literal_eval(text), np.load('a.npy'), np.load('b.npy', allow_pickle=False)\n"
        "t = torch.load('m.pt', map_location='cpu', weights_only=True)\n"
        "s = 'import pickle; torch.load(x)'\n"
    )
    found = scan(tmp_path)
    assert all(line.startswith("bad.py") for line in found), found
    assert {"bad.py:12: torch.load(...)", "bad.py:13: torch.load(...)"} <= set(found), found
    for what in ["import pickle", "from dill", "cloudpickle", "marshal", "torch.load(", "allow_pickle", "eval(",
                 "exec(", "pickle.loads"]:
        assert any(what in line for line in found), (what, found)


# ---------------------------------------------------------------------------------------------------
# Runtime: a real pickle dressed as a checkpoint file is rejected and never unpickled


class Canary:
    """Unpickling this creates the file at ``path``: the proof that a pickle was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _payloads(canary: Path) -> dict[str, bytes]:
    state = {"weight": Canary(str(canary)), "bias": [1.0, 2.0]}
    buf = io.BytesIO()
    torch.save(state, buf)
    raw = pickle.dumps(state, protocol=4)
    return {
        "pickle protocol 0": pickle.dumps(state, protocol=0),
        "pickle protocol 2": pickle.dumps(state, protocol=2),
        "pickle protocol 4": raw,
        "pickle protocol 5": pickle.dumps(state, protocol=5),
        "torch.save zip": buf.getvalue(),
        # a pickle behind a plausible length prefix, so the header length is within the file
        "length-prefixed pickle": struct.pack("<Q", len(raw)) + raw,
        "pickle padded to the old size": raw,  # padded below
    }


def test_payload_is_live(tmp_path: Path) -> None:
    """Sanity: these payloads really do run code when unpickled."""
    canary = tmp_path / "proof"
    for case, payload in _payloads(canary).items():
        if case.startswith("pickle"):
            pickle.loads(payload.ljust(len(payload) + 10, b"."))
            assert canary.exists(), case
            canary.unlink()
    torch.load(io.BytesIO(_payloads(canary)["torch.save zip"]), weights_only=False)
    assert canary.exists()


def _fresh_checkpoint(path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 6)).sum().backward()
    opt.step()
    savegame.save(path, {"model": model, "optimizer": opt, "epoch": 1})


@pytest.mark.parametrize("resign_files", [False, True], ids=["manifest untouched", "manifest re-signed"])
def test_pickle_dressed_as_tensor_file_is_never_executed(
    tmp_path: Path, resign_files: bool, resign: Callable[..., Any]
) -> None:
    canary = tmp_path / "canary"
    path = tmp_path / "ckpt"
    for case, payload in _payloads(canary).items():
        _fresh_checkpoint(path)
        file = path / "model.safetensors"
        if case == "pickle padded to the old size":
            size = file.stat().st_size
            assert len(payload) < size
            payload += b"." * (size - len(payload))
        file.write_bytes(payload)
        if resign_files:
            resign(path)  # the hash and size now match the pickle: only the header check stands in the way
        model = torch.nn.Linear(6, 3)
        target = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)}
        for fn in (
            lambda: savegame.verify(path),
            lambda: savegame.load(path),
            lambda: savegame.load(path, verify=False),
            lambda: savegame.load(path, target),  # noqa: B023
        ):
            with pytest.raises(CheckpointError) as info:
                fn()
            assert str(file) in str(info.value), (case, str(info.value))
            assert not canary.exists(), case
        savegame.load(path, {"optimizer": target["optimizer"]}, strict=False)  # other items still load
        assert not canary.exists()
        for p in path.iterdir():
            p.unlink()
        path.rmdir()


def test_pickle_dressed_as_manifest_is_never_executed(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    path = tmp_path / "ckpt"
    for payload in _payloads(canary).values():
        _fresh_checkpoint(path)
        (path / "manifest.json").write_bytes(payload)
        for fn in (savegame.verify, savegame.load, savegame.read_manifest):
            with pytest.raises(CheckpointError, match=r"manifest\.json"):
                fn(path)
        assert not canary.exists()
        for p in path.iterdir():
            p.unlink()
        path.rmdir()


def test_round_trip_never_calls_an_unpickler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("savegame called a pickle-style loader")

    for module, names in ((pickle, ("load", "loads", "Unpickler")), (torch, ("load",)), (np, ("load",))):
        for name in names:
            monkeypatch.setattr(module, name, forbidden)
    monkeypatch.setattr(os, "system", forbidden)
    _fresh_checkpoint(tmp_path / "ckpt")
    savegame.verify(tmp_path / "ckpt")
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    report = savegame.load(tmp_path / "ckpt", {"model": model, "optimizer": opt})
    assert report.state == {"epoch": 1}
    assert opt.state_dict()["state"][0]["momentum_buffer"].shape == (3, 6)
    assert isinstance(savegame.load(tmp_path / "ckpt")["model"]["weight"], torch.Tensor)
