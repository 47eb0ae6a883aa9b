"""Launching ``torchrun`` (gloo, CPU) from pytest: a hard timeout, and the output in the failure message."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
LAUNCH_TIMEOUT = 120


def torchrun(
    script: str, *args: str, nproc: int = 2, expect_ok: bool = True, drop_env: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``tests/distributed/<script>`` on ``nproc`` local processes (gloo, CPU); return the result.

    ``drop_env``: prefixes of environment variables the children must not see (``AWS_``: credentials).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop_env)} if drop_env else dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), str(HERE), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("TORCHDYNAMO_DISABLE", "1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", str(HERE / script), *args]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=LAUNCH_TIMEOUT, cwd=str(ROOT))
    if expect_ok:
        message = f"{script} {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-6000:]}"
        assert proc.returncode == 0, message
    return proc


@dataclass(frozen=True)
class FsdpRuns:
    """Directories of the FSDP2 runs: checkpoints in ``root``, references and reports in ``out``."""

    root: Path
    out: Path

