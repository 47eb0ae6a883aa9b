"""README.md's python code blocks run as written.

Every ```` ```python ```` block runs in a fresh interpreter in an empty temporary directory, twice (the
second run finds the first one's checkpoints and resumes from them), and must exit with status 0
without a warning. A block that is not meant to run (a fragment, a block that needs data the README
does not have) is preceded by an HTML comment ``<!-- not run: why -->``; the reason is required.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
_FENCE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
_NOT_RUN = re.compile(r"<!--\s*not run:\s*(\S.*?)\s*-->\s*$")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line, code, reason it is not run or None)`` for each python block of ``text``."""
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _NOT_RUN.search(before)
        line = text.count("\n", 0, match.start()) + 1
        blocks.append((line, match.group(1), marker.group(1) if marker else None))
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))
RUNNABLE = [(line, code) for line, code, reason in BLOCKS if reason is None]


def test_the_parser_sees_markers_and_blocks() -> None:
    sample = "a\n```python\nx = 1\n```\n<!-- not run: a fragment -->\n```python\ny\n```\n```\nnot python\n```\n"
    assert python_blocks(sample) == [(2, "x = 1\n", None), (6, "y\n", "a fragment")]
    assert RUNNABLE, "README.md has no runnable python block"


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("line", "code"), RUNNABLE, ids=[f"README.md:{line}" for line, _ in RUNNABLE])
def test_readme_block_runs(tmp_path: Path, line: int, code: str) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    env.setdefault("TORCHDYNAMO_DISABLE", "1")
    env["PYTHONWARNINGS"] = "error"  # a README example that warns is not a good example
    script = tmp_path / f"readme_{line}.py"
    script.write_text(code, encoding="utf-8")
    for attempt in ("first run", "second run (resumes)"):
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=240)  # fmt: skip
        assert proc.returncode == 0, f"README.md:{line}, {attempt}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
