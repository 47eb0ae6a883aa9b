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
import torch

import savegame

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


PRELUDE = """
import os, runpy, signal, sys
import savegame

kill_at, calls, step = int(os.environ.get("KILL_AT_STEP", "0")), [0], savegame.Checkpointer.step

def preempting_step(self, *args, **kwargs):  # a SIGTERM (preemption) arrives at per-batch call KILL_AT_STEP
    if not kwargs.get("epoch_end", True):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGTERM)
    return step(self, *args, **kwargs)

savegame.Checkpointer.step = preempting_step
runpy.run_path(sys.argv[1], run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.timeout(400)
def test_the_main_example_preempted_mid_epoch_ends_like_an_uninterrupted_run(tmp_path: Path) -> None:
    """The first block (the training loop), SIGTERMed in the middle of its third epoch, saves there and
    exits; run again, it resumes at the next batch and its final checkpoint's model is the
    uninterrupted run's, bit for bit (the shuffle order, the scheduler and the RNG all carried over)."""
    line, code = RUNNABLE[0]
    assert "savegame.data.resumable(" in code and "save_on_signal=True" in code, f"README.md:{line}"
    (tmp_path / "main.py").write_text(code, encoding="utf-8")
    (tmp_path / "prelude.py").write_text(PRELUDE, encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    env.setdefault("TORCHDYNAMO_DISABLE", "1")

    def run(where: Path, kill_at: int = 0) -> None:
        where.mkdir(exist_ok=True)
        proc = subprocess.run([sys.executable, str(tmp_path / "prelude.py"), str(tmp_path / "main.py")], cwd=where,
                              env={**env, "KILL_AT_STEP": str(kill_at)}, capture_output=True, text=True,
                              timeout=240)  # fmt: skip
        expected = 128 + 15 if kill_at else 0  # save_on_signal: saved, then exits as SIGTERM asks
        assert proc.returncode == expected, f"{proc.stdout}\n{proc.stderr[-4000:]}"

    run(tmp_path / "straight")
    run(tmp_path / "preempted", kill_at=30)  # 14 batches per epoch: epoch 2, batch 2
    assert (tmp_path / "preempted" / "runs" / "exp" / "epoch=002-step=000030").is_dir()
    run(tmp_path / "preempted")
    finals = []
    for where in ("straight", "preempted"):
        with savegame.Checkpointer(tmp_path / where / "runs" / "exp", lock=False) as ckpt:
            assert ckpt.latest is not None and ckpt.latest.epoch == 5
            finals.append(savegame.load(ckpt.latest.path)["model"])
    assert finals[0].keys() == finals[1].keys()
    for key in finals[0]:
        assert torch.equal(finals[0][key], finals[1][key]), key
