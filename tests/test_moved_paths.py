"""The flat layout's import paths keep working for one release (issue 16, item 6).

Every module that moved into a layer package is still importable under its old name, as the very same
module object (so ``monkeypatch.setattr("savegame.writer.x", ...)`` and ``isinstance`` agree with the
new path), and the old name warns once with a :class:`DeprecationWarning` that names the new path.
Each check runs in a fresh interpreter: a module imported once is cached and would not warn again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from savegame._moved import MOVED

SRC = Path(__file__).resolve().parent.parent / "src"

PROBE = r"""
import importlib, json, sys, warnings
old, new = sys.argv[1], sys.argv[2]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    via_old = importlib.import_module(old)
    again = importlib.import_module(old)
parent, _, leaf = old.rpartition(".")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from_form = getattr(importlib.import_module(parent), leaf)
print(json.dumps({
    "same": via_old is importlib.import_module(new) is again is from_form,
    "name": via_old.__name__,
    "warnings": [(w.category.__name__, str(w.message)) for w in caught],
}))
"""


def _probe(old: str, new: str) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, old, new], capture_output=True, text=True, env=env, timeout=300, check=True
    )
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("savegame.checkpointer", "savegame.run.checkpointer"),  # named in docs and examples of 0.x
        ("savegame.manifest", "savegame.format.manifest"),  # sign_manifest in issue 16's repro
        ("savegame.cli_scan", "savegame.cli.scan"),
        ("savegame.dcp", "savegame.distributed.dcp"),
    ],
)
def test_an_old_path_is_the_new_module_and_warns_once(old: str, new: str) -> None:
    result = _probe(old, new)
    assert result["same"] is True and result["name"] == new
    assert result["warnings"] == [
        [
            "DeprecationWarning",
            f"{old} moved to {new}; the old import path works until the next release. Import {new} "
            "(or the public name from savegame) instead.",
        ]
    ]


def test_every_old_path_resolves_to_an_existing_module() -> None:
    """The table names real modules only (a typo there would break an old import at run time)."""
    import importlib

    for old, new in MOVED.items():
        assert importlib.util.find_spec(new) is not None, f"{old} -> {new}: no such module"
        assert importlib.util.find_spec(old) is not None, f"{old}: the finder does not answer for it"
    assert not any((SRC / (old.replace(".", "/") + ".py")).exists() for old in MOVED), "a moved module still exists"


def test_unknown_names_are_left_to_the_import_system() -> None:
    with pytest.raises(ModuleNotFoundError):
        __import__("savegame.no_such_module")


def test_the_package_itself_never_imports_an_old_path() -> None:
    """Importing savegame and its layer packages uses the new paths only: no deprecation warning."""
    code = (
        "import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
        "import savegame, savegame.cli, savegame.run.checkpointer, savegame.engine.writer, savegame.policies\n"
        "import savegame.storage.local, savegame.export, savegame.config, savegame.data\n"
        "from savegame._moved import MOVED; import sys\n"
        "print(sorted(m for m in MOVED if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
