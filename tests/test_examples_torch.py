"""The example scripts (one per seed usage) run and do what they say.

They run as ``__main__`` (``runpy``) in one child process, so torch and scikit-learn are imported once
for all of them; each gets its own ``sys.argv`` and output, and ``sys.exit`` codes are recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

HARNESS = """
import contextlib, io, json, runpy, sys
results = []
for script, args in json.loads(sys.argv[1]):
    out = io.StringIO()
    sys.argv = [script, *args]
    status = 0
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
    results.append({"script": script, "status": status, "out": out.getvalue()})
print(json.dumps(results))
"""


def run_examples(runs: list[tuple[str, list[str]]]) -> list[dict[str, object]]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    env.setdefault("TORCHDYNAMO_DISABLE", "1")  # the examples never compile; skips a slow import
    payload = json.dumps([(str(EXAMPLES / script), args) for script, args in runs])
    proc = subprocess.run([sys.executable, "-c", HARNESS, payload], capture_output=True, text=True, env=env,
                          timeout=600, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results: list[dict[str, object]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


@pytest.mark.subprocess
@pytest.mark.slow
def test_all_examples(tmp_path: Path) -> None:
    resume = str(tmp_path / "resume")
    results = run_examples([
        ("wine_best_val_loss.py", ["--dir", str(tmp_path / "wine"), "--epochs", "15"]),
        ("epoch_metric_names.py", ["--dir", str(tmp_path / "names"), "--epochs", "6"]),
        ("resume_loop.py", ["--dir", resume, "--epochs", "6", "--stop-after-epoch", "3"]),
        ("resume_loop.py", ["--dir", resume, "--epochs", "6"]),
        ("candle_digits.py", ["--ckpt_directory", str(tmp_path / "candle"), "--epochs", "4"]),
        ("candle_digits.py", ["--ckpt_directory", str(tmp_path / "candle"), "--epochs", "5",
                              "--ckpt_save_interval", "0"]),
        ("strategies.py", ["--dir", str(tmp_path / "strategies"), "--epochs", "12"]),
    ])  # fmt: skip
    status = [r["status"] for r in results]
    outputs = [str(r["out"]) for r in results]
    assert status == [0, 0, 3, 0, 0, 0, 0], outputs
    wine, names, crashed, resumed, candle, candle_again, strategies = outputs

    # seed 002: only the best (by val_loss) is kept, and reloading it gives the same loss
    assert "Model saved at epoch 0" in wine
    best_line = next(line for line in wine.splitlines() if line.startswith("best checkpoint"))
    reloaded = next(line for line in wine.splitlines() if line.startswith("reloaded"))
    assert best_line.split("val_loss ")[1].rstrip(")") == reloaded.split("val_loss ")[1]
    assert [n for n in os.listdir(tmp_path / "wine") if not n.startswith(".")] == ["epoch=015"]  # .lock is hidden

    # seed 004: Keras-style names, saved only on improvement
    saved = sorted(n for n in os.listdir(tmp_path / "names") if not n.startswith("."))
    assert saved and all(n.startswith("mobilenet_v2_") for n in saved)
    accuracies = [float(n.rsplit("_", 1)[1]) for n in saved]
    assert accuracies == sorted(accuracies) and "<- best" in names

    # seed 000: a crash after epoch 3, then the loop continues at epoch 4 with the saved loss
    assert "simulated crash" in crashed and "epoch 4/6" not in crashed
    last_loss = next(line for line in crashed.splitlines() if line.startswith("epoch 3/6")).split("loss ")[1]
    assert f"resumed from epoch=003: epoch 3, loss {last_loss}" in resumed
    assert "epoch 4/6" in resumed and "epoch 3/6" not in resumed

    # seed 001: CANDLE default-model file + overrides; accuracy maximised; restart from the directory
    assert "'ckpt_save_best_metric': 'val_accuracy'" in candle and "(best)" in candle
    assert "restarting from" in candle_again and "epoch 5:" in candle_again and "epoch 4:" not in candle_again

    # seed 003: the three strategies
    rows = {line.split()[0]: line for line in strategies.splitlines() if line.strip()}
    assert set(rows) == {"short", "normal", "long"}
    assert "saves   1  kept   1" in rows["short"]
