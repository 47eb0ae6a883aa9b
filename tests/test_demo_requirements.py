"""``savegame demo`` where scikit-learn is not installed: one line saying what to install, exit 1.

The missing package is simulated for real: a ``sitecustomize`` on ``PYTHONPATH`` makes the path finder
report ``sklearn`` as not found, in the demo's process and in any process it would start, exactly as
an environment without scikit-learn behaves.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess

SRC = str(Path(__file__).resolve().parents[1] / "src")

BLOCKER = """\
from importlib.machinery import PathFinder

_find_spec = PathFinder.find_spec.__func__


def find_spec(cls, name, path=None, target=None):
    if name.split(".")[0] == "sklearn":
        return None  # not found, as where it is not installed
    return _find_spec(cls, name, path, target)


PathFinder.find_spec = classmethod(find_spec)
"""


@pytest.mark.parametrize("entry", [["-m", "savegame.cli", "demo"], ["-m", "savegame.cli.demo"]])
def test_demo_without_scikit_learn_says_what_to_install(tmp_path: Path, entry: list[str]) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(site), SRC, os.environ.get("PYTHONPATH")) if p)}
    check = subprocess.run([sys.executable, "-c", "import sklearn"], capture_output=True, text=True, env=env)
    assert check.returncode != 0 and "No module named 'sklearn'" in check.stderr  # the simulation works
    out_dir = tmp_path / "demo"
    result = subprocess.run([sys.executable, *entry, "--dir", str(out_dir), "--epochs", "2"], capture_output=True,
                            text=True, env=env, timeout=300)  # fmt: skip
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "scikit-learn" in lines[0] and "pip install 'savegame[demo]'" in lines[0], lines[0]
    assert "torch" not in lines[0].split("pip install")[0]  # torch is installed: only what is missing is named
    assert "Traceback" not in result.stderr + result.stdout
    assert not out_dir.exists()  # nothing was started
