"""Smoke test of the benchmark harness (``make bench``): a ``--quick`` run with tiny sizes.

No timing assertions: this checks that every workload and contender runs, that each loader really restores
the saved state, and that the JSON, markdown and PNG reports are written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


def test_quick_bench_writes_complete_reports(tmp_path: Path) -> None:
    out = tmp_path / "results"
    work = tmp_path / "work"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out), "--tmp", str(work)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    data = json.loads((out / "latest.json").read_text())
    assert data["config"]["quick"] is True
    reps = data["config"]["reps"]
    assert reps == 2
    assert set(data["workloads"]) == {"1gib-400", "transformer-adamw", "10k-tiny", "mlp-10k"}
    for wl_name, wl in data["workloads"].items():
        assert wl["state_bytes"] > 0 and wl["n_tensors"] > 0
        contenders = wl["contenders"]
        for name in ("savegame sync", "torch.save", "safetensors", "limit: write+fsync", "limit: memcpy (clone)"):
            assert contenders[name]["status"] == "ok", (wl_name, name, contenders[name]["status"])
        for name, entry in contenders.items():
            status = entry["status"]
            assert status == "ok" or status.startswith("n/a"), (wl_name, name, status)
            if status != "ok":
                continue
            assert len(entry["samples"]["blocking"]) == reps
            assert all(x >= 0 for x in entry["samples"]["blocking"])
            if entry["samples"]["into_cold"] and name != "limit: savegame's files, syscalls only":  # reads only
                assert entry.get("verified") is True, (wl_name, name)  # load_into restored the exact bytes
        sync = contenders["savegame sync"]
        assert sync["bytes_on_disk"] >= wl["state_bytes"]
        assert len(sync["samples"]["load_cold"]) == reps and len(sync["samples"]["into_warm"]) == reps

    rss = data["workloads"]["1gib-400"]["contenders"]["savegame sync"]["rss"]
    assert "error" not in rss, rss
    assert rss["ratio"] >= 1.0 and rss["peak_rss"] > 0

    targets = data["targets"]
    assert targets and {"target", "workload", "value", "met"} <= set(targets[0])
    assert any(t["workload"] == "mlp-10k" for t in targets)
    assert set(data["ratios"]) == set(data["workloads"])

    tl = data["trainloop"]  # the training loop with a background checkpoint every K steps
    assert tl["config"]["quick"] is True and tl["state_bytes"] > 0
    saving = {f"{p}-k{k}" for p in ("wait", "skip", "lazy", "lazy-skip", "paced") for k in (1, 4, 16)}
    burning = {f"burn-k{k}" for k in (1, 4, 16)}  # the measured floor: the save's CPU spent by a plain thread
    plain = {f"plain-k{k}" for k in (1, 4, 16)}  # the measured floor: copy + write + fsync, no savegame
    modes = {"none"} | saving | burning | plain
    assert set(tl["samples"]) == modes and all(len(v) == tl["config"]["reps"] for v in tl["samples"].values())
    assert all(x > 0 for v in tl["samples"].values() for x in v)
    steps = tl["config"]["steps_per_block"]
    for k in (1, 4, 16):
        for policy in ("wait", "lazy"):  # every save written
            assert tl["saves_written"][f"{policy}-k{k}"] == [steps // k] * tl["config"]["reps"]
        for policy in ("skip", "lazy-skip", "paced"):  # coalesced, never more
            assert all(1 <= n <= steps // k for n in tl["saves_written"][f"{policy}-k{k}"])
    assert set(tl["overhead"]) == modes - {"none"}
    assert set(tl["save_call_seconds"]) == saving  # how long a saving ckpt.step call blocked
    assert all(v is None or v > 0 for v in tl["save_call_seconds"].values())
    assert any(t["workload"] == "trainloop" for t in targets)
    fl = tl["floors"]  # the measured physical floor: a save's CPU time, the disk's write time
    assert fl["save_cpu_seconds"] > 0 and fl["disk_seconds"] > 0 and fl["bytes"] == tl["state_bytes"]
    assert set(fl["per_k"]) == {"1", "4", "16"} and all(v["cpu"] > 0 and v["disk"] > 0 for v in fl["per_k"].values())
    assert all(r > 0 for r in tl["write_rate_mb_s"].values())
    assert any("floor: CPU" in t["target"] for t in targets if t["workload"] == "trainloop")
    assert all("for the same CPU work in a thread" in t["target"] for t in targets if t["workload"] == "trainloop")
    assert all("plain copy + write + fsync" in t["target"] for t in targets if t["workload"] == "trainloop")

    ft = data["finetune"]  # the frozen-backbone fine-tune, incremental against full checkpoints
    assert set(ft["samples"]) == {"full", "incremental"} and all(x > 0 for v in ft["samples"].values() for x in v)
    assert 0 < ft["floor_ratio"] <= ft["bytes_ratio"] < 1.0  # linked bytes are not written; never below the floor
    assert ft["median_bytes_written"]["full"] == ft["full_bytes"]
    assert any(t["workload"] == "finetune" for t in targets)

    md = (out / "latest.md").read_text()
    assert "## Frozen-backbone fine-tune: incremental checkpoints" in md
    assert "## Training loop: background checkpoint every K steps" in md
    assert "| plain write (copy + write + fsync in a thread) |" in md
    assert "## Targets" in md and "| savegame sync |" in md and "Machine:" in md
    png = out / "latest.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any(p.name.startswith(".tmp-bench-") for p in work.iterdir())  # temp checkpoints removed
