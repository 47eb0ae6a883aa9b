"""Resuming by hand: ``Checkpointer.restore({"keras": KerasState(model)})`` then ``fit(initial_epoch=N)``.

The resumed process builds and compiles the model afresh; its first ``fit`` builds the compiled metrics
from one batch, which draws from the global generators (NumPy's on JAX, torch's on torch) before any
callback runs. The restore makes that build leave the restored random state alone, so the resumed run
trains on the same data order as the uninterrupted one and ends bit-identical to it, on every backend.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from _kerashelp import ROOT, finish, start_script

BACKEND = keras.backend.backend()
SCRIPT = ROOT / "tests" / "keras" / "_restore_fit_script.py"


def _run(phase: str, out: Path, ckpt: Path) -> object:
    return start_script(SCRIPT, backend=BACKEND, cwd=out.parent, args=(str(out), str(ckpt), "--phase", phase),
                        log=out.parent / f"{phase}.log")


def _final(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "final.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.mark.subprocess
def test_checkpointer_restore_then_fit_initial_epoch_equals_uninterrupted(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    outs = {phase: tmp_path / phase / "out" for phase in ("full", "first", "resume")}
    for out in outs.values():
        out.parent.mkdir()
    started = {phase: _run(phase, outs[phase], ckpt) for phase in ("full", "first")}  # side by side
    for phase, proc in started.items():
        code, log = finish(proc, outs[phase].parent / f"{phase}.log")  # type: ignore[arg-type]
        assert code == 0, f"{phase}: {log[-3000:]}"
    code, log = finish(_run("resume", outs["resume"], ckpt), outs["resume"].parent / "resume.log")  # type: ignore[arg-type]
    assert code == 0, log[-3000:]
    want, got = _final(outs["full"]), _final(outs["resume"])
    assert sorted(want) == sorted(got)
    for key in want:  # same weights, optimizer moments and iteration count, bit for bit
        assert want[key].dtype == got[key].dtype and want[key].tobytes() == got[key].tobytes(), key
    # and the checkpoint really was an earlier point of the run (training went on after the restore)
    assert any(a.tobytes() != b.tobytes() for a, b in zip(_final(outs["first"]).values(), got.values()))
