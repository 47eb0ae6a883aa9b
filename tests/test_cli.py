"""The ``savegame`` command line, run as the installed console script on checkpoints of real training.

Every test here starts the installed ``savegame`` command in a subprocess (except the few that check
in-process plumbing: the read-only scan against the Checkpointer, remote roots, ``demo`` dispatch),
and checks its output, its JSON (parsed, keys and types) and its exit status: 0 ok, 1 problem found,
2 usage error; errors are one line without a traceback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pty
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import savegame
from savegame.run.checkpointer import PROGRESS_VERSION, Checkpointer

BIN = Path(sys.executable).parent
SAVEGAME = shutil.which("savegame", path=str(BIN)) or shutil.which("savegame")

pytestmark = pytest.mark.subprocess


def run(
    *args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``savegame`` with ``args``; capture stdout and stderr as text."""
    assert SAVEGAME is not None, "the savegame console script is not installed (pip install -e .)"
    full_env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "SAVEGAME_PROGRESS")}
    full_env.update(env or {})
    return subprocess.run([SAVEGAME, *map(str, args)], capture_output=True, text=True, env=full_env, cwd=cwd,
                          timeout=300)  # fmt: skip


def run_all(
    argvs: Sequence[Sequence[str]], env: dict[str, str] | None = None
) -> list[subprocess.CompletedProcess[str]]:
    """Run several commands at once (they are independent); results in order."""
    assert SAVEGAME is not None
    full_env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "SAVEGAME_PROGRESS")} | (env or {})
    procs = [subprocess.Popen([SAVEGAME, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=full_env) for argv in argvs]  # fmt: skip
    results = []
    for argv, proc in zip(argvs, procs):
        out, err = proc.communicate(timeout=300)
        results.append(subprocess.CompletedProcess([SAVEGAME, *argv], proc.returncode, out, err))
    return results


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The command failed with ``code`` and said why in exactly one line, without a traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("savegame: error: "), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(result.stdout)


def checkpoints(root: Path) -> list[str]:
    """The checkpoint folders in ``root`` (not the hidden ``.lock``, staging or quarantine folders)."""
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


# --------------------------------------------------------------------------------------------------
# A real training run


def _train_run(root: Path) -> None:
    """Six epochs of real training of a small MLP with a Checkpointer (keep the 2 newest and the best).

    The last two epochs end with a "bad update" (a perturbation of the output layer), so their validation
    loss is worse and the best checkpoint is neither of the two newest; epochs 1-3 are deleted by retention.
    """
    torch.manual_seed(0)
    x = torch.randn(320, 8)
    y = x @ torch.randn(8, 3) + 0.1 * torch.randn(320, 3)
    x_train, y_train, x_val, y_val = x[:256], y[:256], x[256:], y[256:]
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    checkpointer = Checkpointer(root, monitor="val_loss", keep_last=2, keep_best=1,
                                metadata={"experiment": "cli-test", "lr": 0.05})  # fmt: skip
    step = 0
    for epoch in range(6):
        for i in range(0, 256, 32):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x_train[i : i + 32]), y_train[i : i + 32]).backward()
            optimizer.step()
            step += 1
        if epoch >= 4:
            with torch.no_grad():
                model[2].weight.add_(1.0)
        with torch.no_grad():
            prediction = model(x_val)
            val_loss = torch.nn.functional.mse_loss(prediction, y_val).item()
            val_mae = (prediction - y_val).abs().mean().item()
        checkpointer.step({"model": model, "optimizer": optimizer, "epoch": epoch + 1}, epoch=epoch + 1, step=step,
                          metrics={"val_loss": val_loss, "val_mae": val_mae})  # fmt: skip


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "run"
    _train_run(root)
    return root


@pytest.fixture
def run_copy(torch_run: Path, tmp_path: Path) -> Path:
    """A private copy of the training run (for commands that change it)."""
    copy = tmp_path / "run"
    shutil.copytree(torch_run, copy)
    return copy


# --------------------------------------------------------------------------------------------------
# Help and usage


COMMANDS = ("ls", "inspect", "verify", "diff", "prune", "export", "import", "plot", "gc", "demo")


def test_help_of_every_subcommand_has_examples_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    top, sub, version = run_all([["--help"], ["ls", "--help"], ["--version"]])
    assert top.returncode == 0 and sub.returncode == 0 and version.returncode == 0
    assert version.stdout.startswith("savegame ")
    for command in COMMANDS:
        assert f"\n    {command} " in top.stdout
    assert sub.stdout.startswith("usage: savegame ls") and "savegame ls runs/exp --verify" in sub.stdout
    # Every subcommand's help (in-process: the same parser the installed command builds).
    from savegame import cli

    for command in COMMANDS:
        assert cli.main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: savegame {command}")
        assert f"savegame {command} " in text.split("examples:", 1)[1]
        assert "exit status:" in text and "2  usage error" in text and "--debug" in text


def test_usage_errors_exit_2_with_one_line(tmp_path: Path, torch_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = run_all([
        [],
        ["ls", str(tmp_path / "missing")],
        ["ls", str(torch_run), "--mode", "sideways"],
        ["export", str(torch_run / "latest"), "--to", str(tmp_path / "w.weights.h5")],
    ])  # fmt: skip
    for result in results:
        assert_one_line_error(result, 2)
    assert "no command" in results[0].stderr
    assert "no such directory" in results[1].stderr
    assert "'savegame ls --help'" in results[2].stderr
    assert "--keras-model" in results[3].stderr
    # More of the same in-process (same code path, without the start-up cost of a process each).
    from savegame import cli

    checks = {
        ("frobnicate",): "invalid choice",
        ("ls",): "required",
        ("inspect", str(tmp_path / "missing")): "no such checkpoint",
        ("prune", str(torch_run)): "needs --keep-last N and/or --keep-best K",
        ("prune", str(torch_run), "--keep-last", "0"): "at least 1",
        ("plot", str(torch_run), "--metric", "nope", "-o", str(tmp_path / "p.png")): "'val_loss', 'val_mae'",
        ("export", str(torch_run / "latest"), "--to", str(tmp_path / "w.bin")): "unknown export format",
        ("export", str(torch_run / "latest"), "--item", "nope", "--to", str(tmp_path / "w.npz")): "no item 'nope'",
        ("gc", str(torch_run), "--older-than", "soon"): "invalid duration",
        ("ls", str(torch_run / "epoch=004-step=000032")): "is a checkpoint, not a directory of checkpoints",
        ("ls", str(torch_run), "--bogus"): "unrecognized arguments: --bogus (see 'savegame ls --help')",
        ("prune", str(torch_run), "--keep-last", "two"): "invalid int value",
        ("export", str(torch_run / "latest")): "the following arguments are required: --to",
        ("export", str(torch_run / "latest"), "--to", str(tmp_path / "w.npz"), "--keras-model", "m:f"): "only applies",
        ("inspect", str(torch_run), "--which", "nope"): "no checkpoint named 'nope'",
        ("inspect", str(torch_run / "epoch=004-step=000032"), "--which", "best"): "--which only applies",
        ("inspect", str(torch_run), "--item", "nope"): "no item 'nope'",
        ("verify", str(tmp_path / "missing")): "no such checkpoint or directory",
        ("diff", str(tmp_path / "missing"), str(torch_run / "latest")): "no such checkpoint",
        ("prune", str(tmp_path / "missing"), "--keep-last", "1"): "no such directory",
        ("plot", str(tmp_path / "missing")): "no such directory",
        ("gc", str(tmp_path / "missing")): "no such directory",
        ("plot", str(torch_run), "-o", str(tmp_path / "no" / "p.png")): "no such directory",
        ("demo", "--epochs", "1"): "at least 2",
        ("demo", "--bogus"): "(see 'savegame demo --help')",
        ("diff", str(torch_run / "latest"), str(tmp_path)): "holds no readable checkpoints",
        ("diff", str(torch_run / "latest"), str(torch_run / "best"), "--item", "modle"): "no item 'modle' in either",
    }
    for argv, message in checks.items():
        assert cli.main(list(argv)) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("savegame: error: ") and message in err[0], (argv, err)


def test_debug_adds_the_traceback(tmp_path: Path) -> None:
    result = run("--debug", "ls", tmp_path / "missing")
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("savegame: error: ")


def test_demo_dispatches_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    from savegame import cli
    from savegame.cli import demo

    seen: list[list[str]] = []

    def fake_main(argv: Sequence[str] | None = None) -> int:
        seen.append(list(argv or []))
        return 0

    monkeypatch.setattr(demo, "main", fake_main)
    assert cli.main(["demo", "--epochs", "2", "--dir", "x"]) == 0
    assert cli.main(["--debug", "demo"]) == 0
    assert seen == [["--dir", "x", "--epochs", "2"], []]


# --------------------------------------------------------------------------------------------------
# ls


def test_ls_table_and_json(torch_run: Path) -> None:
    table, data, verified = run_all([["ls", str(torch_run)], ["ls", str(torch_run), "--json"],
                                     ["ls", str(torch_run), "--verify", "--json"]])  # fmt: skip
    assert table.returncode == 0 and table.stderr == ""
    header, *rows, summary = table.stdout.strip().splitlines()
    assert header.split() == ["name", "epoch", "step", "val_loss", "val_mae", "mark", "size", "blocked", "durable",
                              "age", "status"]  # fmt: skip
    assert len(rows) == 3
    assert [r.split()[0] for r in rows] == ["epoch=004-step=000032", "epoch=005-step=000040", "epoch=006-step=000048"]
    assert "best" in rows[0] and "latest" in rows[2] and all("unverified" in r and "KiB" in r for r in rows)
    assert "best by val_loss (min): epoch=004-step=000032" in summary
    assert "\033[" not in table.stdout  # no colour without a terminal

    info = as_json(data)
    assert data.returncode == 0
    assert set(info) == {"root", "monitor", "mode", "verified", "best", "latest", "checkpoints", "quarantined",
                         "leftovers"}  # fmt: skip
    assert info["monitor"] == "val_loss" and info["mode"] == "min" and info["verified"] is False
    assert info["best"] == "epoch=004-step=000032" and info["latest"] == "epoch=006-step=000048"
    types = {"name": str, "path": str, "sequence": int, "epoch": int, "step": int, "metrics": dict, "created": str,
             "age_seconds": float, "size": int, "linked_bytes": int, "files": int, "is_best": bool, "is_latest": bool,
             "pinned": bool, "weights_only": bool, "status": str, "run": str, "blocking_seconds": float,
             "durable_seconds": float}  # fmt: skip
    for entry in info["checkpoints"]:
        assert set(entry) == set(types) | {"problem"}
        for key, kind in types.items():
            assert isinstance(entry[key], kind), (key, entry[key])
        assert entry["status"] == "unverified" and entry["problem"] is None
        assert set(entry["metrics"]) == {"val_loss", "val_mae"}
        assert Path(entry["path"]).parent == torch_run
    assert [e["sequence"] for e in info["checkpoints"]] == [4, 5, 6]
    assert sum(e["is_best"] for e in info["checkpoints"]) == 1
    assert [e["status"] for e in as_json(verified)["checkpoints"]] == ["ok", "ok", "ok"]


def test_ls_colour_on_a_terminal_unless_no_color(torch_run: Path) -> None:
    def on_terminal(env: dict[str, str]) -> str:
        assert SAVEGAME is not None
        master, slave = pty.openpty()
        full_env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | {"TERM": "xterm"} | env
        proc = subprocess.Popen([SAVEGAME, "ls", str(torch_run)], stdout=slave, stderr=slave, env=full_env)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(master)
        assert proc.wait(timeout=120) == 0
        return b"".join(chunks).decode()

    assert "\033[" in on_terminal({})
    assert "\033[" not in on_terminal({"NO_COLOR": "1"})
    assert "\033[32m" in run("--color", "always", "ls", torch_run, "--verify").stdout  # green "ok"


def test_scan_agrees_with_the_checkpointer(run_copy: Path) -> None:
    from savegame.cli.scan import doomed_by_retention, scan_root

    scan = scan_root(str(run_copy))
    records = Checkpointer(run_copy, monitor="val_loss", lock=False).list()  # continues the run: its best
    assert [e.name for e in scan.readable] == [r.name for r in records]
    assert [(e.epoch, e.step, dict(e.metrics), e.is_best, e.is_latest, e.run) for e in scan.readable] == [
        (r.epoch, r.step, dict(r.metrics), r.is_best, r.is_latest, r.run) for r in records
    ]
    for keep_last, keep_best in ((1, None), (1, 1), (2, None), (None, 2)):
        checkpointer = Checkpointer(run_copy, monitor="val_loss", keep_last=keep_last, keep_best=keep_best,
                                    lock=False)  # fmt: skip
        expected = checkpointer.prune(dry_run=True, all_runs=True)
        assert [e.name for e in doomed_by_retention(scan, keep_last=keep_last, keep_best=keep_best)] == expected


# --------------------------------------------------------------------------------------------------
# inspect


def test_inspect_text_and_json(torch_run: Path) -> None:
    text, data, item = run_all([["inspect", str(torch_run / "best")], ["inspect", str(torch_run), "--json"],
                                ["inspect", str(torch_run), "--which", "best", "--item", "model", "--verify"]])
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert "epoch=004-step=000032" in out and "val_loss=" in out and '"experiment": "cli-test"' in out
    assert "torch " in out and "numpy " in out  # library versions
    for expected in ("model.0.weight", "float32", "[16, 8]", "512 B", "optimizer.state.0.momentum_buffer",
                     "optimizer.param_groups.0.lr = 0.05", "epoch = 4"):  # fmt: skip
        assert expected in out, expected

    info = as_json(data)
    assert info["name"] == "epoch=006-step=000048"  # a root means its latest checkpoint
    assert {"path", "created", "format_version", "versions", "metadata", "progress", "size", "files", "items",
            "tensors", "values", "verified"} <= set(info)  # fmt: skip
    assert info["metadata"] == {"experiment": "cli-test", "lr": 0.05}
    assert info["progress"]["epoch"] == 6 and info["progress"]["best"]["name"] == "epoch=004-step=000032"
    assert {i["name"] for i in info["items"]} == {"model", "optimizer", "epoch", "rng"}
    weight = next(t for t in info["tensors"] if t["path"] == "model.0.weight")
    assert weight == {"item": "model", "path": "model.0.weight", "key": "0.weight", "kind": "tensor",
                      "dtype": "float32", "shape": [16, 8], "bytes": 512, "shared_with": None}  # fmt: skip
    for t in info["tensors"]:
        assert isinstance(t["shape"], list) and isinstance(t["bytes"], int) and isinstance(t["dtype"], str)
    assert {"item": "epoch", "path": "epoch", "value": 6} in info["values"]
    model_item = next(i for i in info["items"] if i["name"] == "model")
    assert model_item["tensors"] == 4 and model_item["bytes"] == (16 * 8 + 16 + 3 * 16 + 3) * 4

    assert item.returncode == 0 and "all hashes verified" in item.stdout
    assert "optimizer." not in item.stdout and "model.2.bias" in item.stdout


# --------------------------------------------------------------------------------------------------
# verify


def _flip_byte(path: Path, offset: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_verify_catches_a_flipped_byte(run_copy: Path) -> None:
    ok, ok_json = run_all([["verify", str(run_copy)], ["verify", str(run_copy / "latest"), "--json"]])
    assert ok.returncode == 0 and ok.stdout.count("ok ") == 3 and "3 ok, 0 corrupt" in ok.stdout
    assert "\r" not in ok.stderr  # no progress bar without a terminal
    assert as_json(ok_json)["ok"] is True and len(as_json(ok_json)["checkpoints"]) == 1

    victim = run_copy / "epoch=005-step=000040" / "model.safetensors"
    _flip_byte(victim)
    root, single, data, listing = run_all([["verify", str(run_copy)], ["verify", str(victim.parent)],
                                           ["verify", str(run_copy), "--json"], ["ls", str(run_copy), "--verify"]])
    for result in (root, single):
        line = assert_one_line_error(result, 1)
        assert "epoch=005-step=000040" in line
        assert "CORRUPT" in result.stdout and str(victim) in result.stdout and "content hash differs" in result.stdout
    assert "2 ok, 1 corrupt" in root.stdout
    info = as_json(data)
    assert data.returncode == 1 and info["ok"] is False
    assert [c["status"] for c in info["checkpoints"]] == ["ok", "corrupt", "ok"]
    assert str(victim) in info["checkpoints"][1]["problem"]
    assert listing.returncode == 1 and "corrupt" in listing.stdout
    assert "epoch=005-step=000040 is corrupt" in listing.stderr


def test_ls_reports_truncated_files_and_broken_manifests_without_hashing(run_copy: Path) -> None:
    victim = run_copy / "epoch=004-step=000032" / "optimizer.safetensors"
    victim.write_bytes(victim.read_bytes()[:-1])
    _flip_byte(run_copy / "epoch=006-step=000048" / "manifest.json", offset=200)
    listing, verify = run_all([["ls", str(run_copy), "--json"], ["verify", str(run_copy), "--json"]])
    assert listing.returncode == 1 and verify.returncode == 1
    statuses = {c["name"]: (c["status"], c["problem"]) for c in as_json(listing)["checkpoints"]}
    assert statuses["epoch=004-step=000032"][0] == "corrupt"
    assert "bytes, the manifest says" in statuses["epoch=004-step=000032"][1]
    assert statuses["epoch=006-step=000048"][0] == "corrupt" and "manifest" in statuses["epoch=006-step=000048"][1]
    assert statuses["epoch=005-step=000040"] == ("unverified", None)
    assert as_json(listing)["latest"] == "epoch=005-step=000040"  # an unreadable manifest is not the latest
    assert [c["status"] for c in as_json(verify)["checkpoints"]].count("corrupt") == 2


def test_corrupt_checkpoints_exit_1_naming_the_file(
    run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = run_copy / "epoch=005-step=000040" / "model.safetensors"
    _flip_byte(data)
    manifest = run_copy / "epoch=006-step=000048" / "manifest.json"
    _flip_byte(manifest, offset=200)
    good = str(run_copy / "epoch=004-step=000032")
    results = run_all([
        ["inspect", str(manifest.parent)],  # the manifest is read (and its own hash checked) first
        ["export", str(data.parent), "--to", str(tmp_path / "w.safetensors")],
        ["diff", good, str(data.parent)],
    ])  # fmt: skip
    for result, damaged in zip(results, (manifest, data, data)):
        line = assert_one_line_error(result, 1)
        assert str(damaged) in line, line
    assert "manifest_hash" in results[0].stderr and "content hash differs" in results[1].stderr
    assert not (tmp_path / "w.safetensors").exists() and list(tmp_path.glob("*.tmp.*")) == []  # no partial output
    # More of the same in-process.
    from savegame import cli

    capsys.readouterr()
    assert cli.main(["inspect", str(data.parent), "--verify"]) == 1
    assert str(data) in capsys.readouterr().err
    assert cli.main(["verify", str(manifest.parent), "--json"]) == 1
    info = json.loads(capsys.readouterr().out)
    assert info["ok"] is False and str(manifest) in info["checkpoints"][0]["problem"]
    # Not a checkpoint at all: a usage error (2), not a corrupt checkpoint.
    (tmp_path / "file.txt").write_text("hello")
    assert cli.main(["inspect", str(tmp_path / "file.txt")]) == 2
    assert "not a savegame checkpoint" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# diff


def test_diff_of_two_training_checkpoints(torch_run: Path) -> None:
    a, b = torch_run / "epoch=004-step=000032", torch_run / "epoch=006-step=000048"
    text, data, same = run_all([["diff", str(a), str(b)], ["diff", str(a), str(b), "--json"],
                                ["diff", str(b), str(torch_run / "latest")]])
    assert text.returncode == 1, text.stderr
    assert "metric    val_loss:" in text.stdout and "progress  epoch: 4 -> 6" in text.stdout
    assert "model.2.weight" in text.stdout and "max abs" in text.stdout and "~ epoch: 4 -> 6" in text.stdout
    info = as_json(data)
    assert data.returncode == 1 and info["identical"] is False
    changed = {c["path"]: c for c in info["changed"]}
    assert set(changed) >= {"model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"}
    state_a, state_b = savegame.load(a), savegame.load(b)
    for name in ("0.weight", "2.weight"):
        ta, tb = state_a["model"][name].double(), state_b["model"][name].double()
        entry = changed[f"model.{name}"]
        assert entry["max_abs"] == pytest.approx(float((tb - ta).abs().max()))
        assert entry["rel"] == pytest.approx(float((tb - ta).abs().max() / ta.abs().max()))
        assert entry["dtype"] == "float32" and entry["shape"] == list(ta.shape)
    assert {"path": "epoch", "a": 4, "b": 6} in info["values"]
    assert [m["name"] for m in info["metrics"]] == ["val_loss", "val_mae"]
    assert info["added"] == [] and info["removed"] == [] and info["metadata"] == []
    assert same.returncode == 0 and "identical state" in same.stdout


def test_diff_reports_keys_shapes_dtypes_and_metadata(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    savegame.save(tmp_path / "a", {"model": {"w": w, "b": np.zeros(3, np.float32), "old": np.ones(2)}, "lr": 0.1},
                  metadata={"run": "a", "seed": 1})  # fmt: skip
    w2 = w.copy()
    w2[1, 2] += 0.5
    savegame.save(tmp_path / "b", {"model": {"w": w2, "b": np.zeros(4, np.float32), "new": np.ones(2)}, "lr": 0.2},
                  metadata={"run": "b", "seed": 1})  # fmt: skip
    result = run("diff", tmp_path / "a", tmp_path / "b", "--json")
    info = as_json(result)
    assert result.returncode == 1
    assert info["added"] == [{"path": "model.new", "kind": "tensor"}]
    assert info["removed"] == [{"path": "model.old", "kind": "tensor"}]
    assert info["retyped"] == [{"path": "model.b", "a": {"dtype": "float32", "shape": [3]},
                                "b": {"dtype": "float32", "shape": [4]}}]  # fmt: skip
    assert info["changed"][0]["path"] == "model.w" and info["changed"][0]["max_abs"] == pytest.approx(0.5)
    assert info["values"] == [{"path": "lr", "a": 0.1, "b": 0.2}]
    assert info["metadata"] == [{"path": "run", "a": "a", "b": "b", "change": "changed"}]


# --------------------------------------------------------------------------------------------------
# prune and gc


def test_prune_dry_run_deletes_nothing_then_prunes_like_the_library(run_copy: Path) -> None:
    before = sorted(p.name for p in run_copy.iterdir())
    dry_text, dry = run_all([["prune", str(run_copy), "--keep-last", "1", "--dry-run"],
                             ["prune", str(run_copy), "--keep-last", "1", "--dry-run", "--json"]])
    assert dry_text.returncode == 0 and "would delete  epoch=005-step=000040" in dry_text.stdout
    assert "nothing was deleted" in dry_text.stdout and "[best]" in dry_text.stdout
    plan = as_json(dry)
    assert plan["dry_run"] is True and plan["deleted"] == [] and plan["would_delete"] == ["epoch=005-step=000040"]
    assert sorted(p.name for p in run_copy.iterdir()) == before  # nothing deleted, nothing cleaned

    done = run("prune", run_copy, "--keep-last", "1", "--json")
    assert done.returncode == 0, done.stderr
    result = as_json(done)
    assert result["deleted"] == plan["would_delete"] and result["bytes_freed"] > 0
    assert checkpoints(run_copy) == ["epoch=004-step=000032", "epoch=006-step=000048"]
    # The newest and the best are never deleted, whatever the counts.
    again = as_json(run("prune", run_copy, "--keep-last", "1", "--keep-best", "1", "--json"))
    assert again["deleted"] == [] and again["kept"] == ["epoch=004-step=000032", "epoch=006-step=000048"]


def test_gc_removes_dead_writers_leftovers_and_old_quarantine(run_copy: Path) -> None:
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    staging = run_copy / f".staging-{socket.gethostname()}-{dead.pid}-0123456789ab"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"partial")
    live = run_copy / f".staging-{socket.gethostname()}-{os.getpid()}-0123456789ab"
    live.mkdir()
    old = run_copy / ".quarantine-epoch=002-step=000016-20200101T000000-abcdef"
    shutil.copytree(run_copy / "epoch=005-step=000040", old)
    recent_stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    recent = run_copy / f".quarantine-epoch=003-step=000024-{recent_stamp}-abcdef"
    recent.mkdir()

    listing = as_json(run("ls", run_copy, "--json"))
    assert [q["status"] for q in listing["quarantined"]] == ["quarantined", "quarantined"]
    assert sorted(listing["leftovers"]) == sorted([staging.name, live.name])

    dry = run("gc", run_copy, "--dry-run", "--json")
    assert dry.returncode == 0
    assert sorted(a["name"] for a in as_json(dry)["actions"]) == sorted([staging.name, old.name])
    assert staging.exists() and old.exists()

    done = run("gc", run_copy)
    assert done.returncode == 0, done.stderr
    assert "removed" in done.stdout and staging.name in done.stdout and old.name in done.stdout
    assert not staging.exists() and not old.exists()
    assert live.exists() and recent.exists()  # a live writer's staging and a fresh quarantine stay
    assert len(checkpoints(run_copy)) == 3
    assert "nothing to clean" in run("gc", run_copy).stdout


def test_gc_removes_symlinked_leftovers_themselves_and_never_restores_one(tmp_path: Path) -> None:
    """A ``.trash-*`` or ``.staging-*`` entry that is a symlink (it could point out of the root) is removed as
    a link: gc neither reported it removed while leaving it there, nor put a symlink back as a checkpoint,
    and its target is never touched."""
    import numpy as np

    root, outside = tmp_path / "run", tmp_path / "outside"
    savegame.save(root / "c1", {"m": np.ones(2)})
    outside.mkdir()
    (outside / "manifest.json").write_text("{}")
    (outside / "data").write_text("keep me")
    links = [root / ".trash-c2-abcd1234", root / ".trash-del-c3-abcd1234", root / ".staging-otherhost-1-0123456789ab"]
    for link in links:
        link.symlink_to(outside, target_is_directory=True)
    os.utime(links[2], (0, 0), follow_symlinks=False)  # another host's, untouched for long: a dead writer's
    done = run("gc", root, "--json")
    assert done.returncode == 0, done.stderr
    assert sorted(a["name"] for a in as_json(done)["actions"]) == sorted(link.name for link in links)
    assert all(a["action"] == "remove" for a in as_json(done)["actions"])
    assert not any(os.path.lexists(link) for link in links) and not os.path.lexists(root / "c2")
    assert (outside / "data").read_text() == "keep me" and (outside / "manifest.json").exists()


def test_prune_and_gc_refuse_a_root_that_a_training_run_is_writing(run_copy: Path) -> None:
    with Checkpointer(run_copy, monitor="val_loss", restart="off"):  # holds the root's writer lock
        prune, gc, dry_prune, dry_gc = run_all([
            ["prune", str(run_copy), "--keep-last", "1"], ["gc", str(run_copy), "--older-than", "0"],
            ["prune", str(run_copy), "--keep-last", "1", "--dry-run"], ["gc", str(run_copy), "--dry-run"],
        ])  # fmt: skip
    for result in (prune, gc):
        line = assert_one_line_error(result, 1)
        assert "locked by another writer" in line and f"pid {os.getpid()}" in line
    assert dry_prune.returncode == 0 and dry_gc.returncode == 0  # the dry runs only read
    assert len(checkpoints(run_copy)) == 3


# --------------------------------------------------------------------------------------------------
# export


def test_export_loads_with_safetensors_torch_and_numpy(
    torch_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    best = torch_run / "epoch=004-step=000032"
    st, pt, npz = tmp_path / "m.safetensors", tmp_path / "m.pt", tmp_path / "m.npz"
    results = run_all([["export", str(torch_run / "best"), "--item", "model", "--to", str(st)],
                       ["export", str(best), "--to", str(pt), "--json"],
                       ["export", str(torch_run), "--which", "best", "--to", str(npz)]])
    for result in results:
        assert result.returncode == 0, result.stderr
    assert results[0].stdout.startswith("wrote ") and "(safetensors): 4 tensors of item 'model'" in results[0].stdout
    info = as_json(results[1])
    assert info["format"] == "torch" and info["tensors"] == 4 and info["bytes"] == pt.stat().st_size
    from savegame import cli

    assert cli.main(["export", str(best), "--item", "optimizer", "--to", str(tmp_path / "opt.npz")]) == 0
    assert "left out" in capsys.readouterr().err  # lr, momentum...: values, not tensors

    expected = savegame.load(best)["model"]
    from_st = load_file(str(st))
    from_pt = torch.load(pt, weights_only=True)
    from_npz = np.load(npz, allow_pickle=False)
    assert set(from_st) == set(from_pt) == set(from_npz.files) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(from_st[name], tensor)
        assert type(from_pt[name]) is torch.Tensor and torch.equal(from_pt[name], tensor)
        assert np.array_equal(from_npz[name], tensor.numpy())

    again = run("export", best, "--to", st)
    assert "exists" in assert_one_line_error(again, 2)
    assert run("export", best, "--to", st, "--force").returncode == 0


def test_export_exact_dtypes_and_tied_tensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from savegame.export import export_checkpoint

    weight = torch.randn(4, 3).to(torch.bfloat16)
    model = {"emb": weight, "head": weight, "scale": torch.tensor(2.5, dtype=torch.float16), "step": 7}
    savegame.save(tmp_path / "ckpt", {"model": model})
    st, pt, npz = tmp_path / "t.safetensors", tmp_path / "t.pt", tmp_path / "t.npz"
    results = run_all([["export", str(tmp_path / "ckpt"), "--to", str(p)] for p in (st, npz)])
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    assert "left out 1 values" in results[0].stderr and "step" in results[0].stderr
    exact = load_file(str(st))
    assert exact["emb"].dtype == torch.bfloat16 and torch.equal(exact["emb"], weight)
    widened = np.load(npz, allow_pickle=False)
    assert widened["emb"].dtype == np.float32 and np.array_equal(widened["emb"], weight.float().numpy())
    assert widened["scale"].shape == () and widened["scale"] == np.float16(2.5)
    assert "bfloat16 -> float32" in results[1].stderr
    # .pt in-process (the command's .pt path is run above on the trained model): ties survive.
    result = export_checkpoint(tmp_path / "ckpt", pt)
    assert result.skipped == ("step",) and result.tensors == 3
    loaded = torch.load(pt, weights_only=True)
    assert loaded["emb"].dtype == torch.bfloat16 and torch.equal(loaded["head"], weight)
    assert loaded["emb"].untyped_storage().data_ptr() == loaded["head"].untyped_storage().data_ptr()  # still tied


# --------------------------------------------------------------------------------------------------
# plot


def test_plot_writes_a_png_that_is_not_blank(torch_run: Path, tmp_path: Path) -> None:
    import matplotlib.image

    out = tmp_path / "history.png"
    result, text = run_all([["plot", str(torch_run), "--metric", "val_loss", "-o", str(out), "--json"],
                            ["plot", str(torch_run), "-o", str(tmp_path / "h.svg")]])
    assert result.returncode == 0, result.stderr
    info = as_json(result)
    assert info["path"] == str(out) and info["axis"] == "epoch" and info["metric"] == "val_loss"
    assert info["saved"] == 3 and info["best"] == "epoch=004-step=000032" and info["deleted_unknown"] == 3
    assert [p["epoch"] for p in info["points"]] == [4, 5, 6]
    image = matplotlib.image.imread(str(out))
    assert image.shape[0] >= 300 and image.shape[1] >= 500
    assert float(np.var(image[..., :3])) > 0.005  # lines, markers and text, not a blank canvas
    assert text.returncode == 0 and "val_loss (min) over epoch; 3 saved, best epoch=004-step=000032" in text.stdout
    assert (tmp_path / "h.svg").read_text().lstrip().startswith("<?xml")


def test_plot_marks_deleted_checkpoints_known_from_best_records(tmp_path: Path) -> None:
    root = tmp_path / "run"

    def save(name: str, sequence: int, value: float, best: tuple[str, int, float]) -> None:
        progress = {"checkpointer": PROGRESS_VERSION, "sequence": sequence, "epoch": sequence, "step": 10 * sequence,
                    "metrics": {"val_accuracy": value},
                    "best": {"monitor": "val_accuracy", "mode": "max", "name": best[0], "epoch": best[1],
                             "step": 10 * best[1], "value": best[2]}}  # fmt: skip
        savegame.save(root / name, {"w": np.zeros(2)}, progress=progress)

    # e1 .. e3 were saved; e2 (then the best) was deleted later, e1 too; e5 is the new best.
    save("e3", 3, 0.7, ("e2", 2, 0.8))
    save("e4", 4, 0.6, ("e2", 2, 0.8))
    save("e5", 5, 0.9, ("e5", 5, 0.9))
    result = run("plot", root, "-o", tmp_path / "p.png", "--json")
    info = as_json(result)
    assert result.returncode == 0 and info["metric"] == "val_accuracy" and info["mode"] == "max"
    assert info["saved"] == 3 and info["deleted"] == 1 and info["deleted_unknown"] == 1 and info["best"] == "e5"
    assert {"name": "e2", "value": 0.8, "epoch": 2, "step": 20, "kind": "deleted", "is_best": False} in info["points"]


# --------------------------------------------------------------------------------------------------
# Remote roots (fsspec memory://, in-process: the memory filesystem lives in this process)


def test_remote_roots_through_fsspec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("fsspec")
    from savegame import cli

    base = f"memory://savegame-cli-{os.getpid()}-{time.monotonic_ns()}/run"
    for i, value in enumerate([0.5, 0.3, 0.4]):
        savegame.save(f"{base}/ck{i}", {"model": {"w": np.full((2, 3), float(i), np.float32)}},
                      progress={"checkpointer": PROGRESS_VERSION, "sequence": i + 1, "epoch": i + 1,
                                "metrics": {"val_loss": value},
                                "best": {"monitor": "val_loss", "mode": "min", "value": min([0.5, 0.3, 0.4][: i + 1]),
                                         "name": "ck0" if i == 0 else "ck1"}})  # fmt: skip
    capsys.readouterr()
    assert cli.main(["ls", base, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in info["checkpoints"]] == ["ck0", "ck1", "ck2"] and info["best"] == "ck1"
    assert cli.main(["verify", base]) == 0 and "3 ok, 0 corrupt" in capsys.readouterr().out
    assert cli.main(["inspect", f"{base}/best", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"][0]["shape"] == [2, 3]
    assert cli.main(["export", f"{base}/latest", "--to", str(tmp_path / "w.npz")]) == 0
    assert np.load(tmp_path / "w.npz")["w"][0, 0] == 2.0
    capsys.readouterr()
    assert cli.main(["diff", f"{base}/best", f"{base}/latest", "--json"]) == 1
    assert [c["path"] for c in json.loads(capsys.readouterr().out)["changed"]] == ["model.w"]
    assert cli.main(["plot", base, "-o", str(tmp_path / "remote.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["best"] == "ck1" and (tmp_path / "remote.png").stat().st_size > 0
    assert cli.main(["gc", base]) == 0 and "nothing to clean" in capsys.readouterr().out
    assert cli.main(["gc", base, "--dry-run"]) == 2 and "not available for remote roots" in capsys.readouterr().err
    assert cli.main(["prune", base, "--keep-last", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == ["ck0"]
    assert cli.main(["ls", f"{base}/ck1"]) == 2 and "is a checkpoint" in capsys.readouterr().err


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """An S3-compatible server (moto) on a local port, for the installed command to reach over HTTP."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import logging
    import socket

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def test_s3_root_through_the_installed_command(s3_endpoint: str, torch_run: Path, tmp_path: Path) -> None:
    """``s3://`` roots through fsspec/s3fs: the credentials and endpoint come from the usual AWS variables."""
    import fsspec

    env = {"AWS_ACCESS_KEY_ID": "AKIDSAVEGAMECLI", "AWS_SECRET_ACCESS_KEY": "sg-cli-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint}  # fmt: skip
    options = {"endpoint_url": s3_endpoint, "key": env["AWS_ACCESS_KEY_ID"], "secret": env["AWS_SECRET_ACCESS_KEY"]}
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    fs.mkdir("sg-cli")
    url = "s3://sg-cli/run"
    for name in checkpoints(torch_run):  # the trained run, written to S3 through the library's remote storage
        manifest = savegame.read_manifest(torch_run / name)
        savegame.save(f"{url}/{name}", {"model": savegame.load(torch_run / name)["model"]}, progress=manifest.progress,
                      metadata=manifest.metadata, storage_options=options)  # fmt: skip
    listing, verify, export = run_all([
        ["ls", url, "--json"], ["verify", url], ["export", f"{url}/latest", "--to", str(tmp_path / "w.safetensors")],
    ], env=env)  # fmt: skip
    for result in (listing, verify, export):
        assert result.returncode == 0, (result.args, result.stderr)
    info = as_json(listing)
    assert [c["name"] for c in info["checkpoints"]] == checkpoints(torch_run)
    assert info["best"] == "epoch=004-step=000032" and info["root"] == url
    assert "3 ok, 0 corrupt" in verify.stdout
    from safetensors.numpy import load_file

    exported = load_file(str(tmp_path / "w.safetensors"))
    latest = savegame.load(torch_run / "epoch=006-step=000048")["model"]
    assert np.array_equal(exported["0.weight"], latest["0.weight"].numpy())
    # diff, prune and the rest on remote roots: test_remote_roots_through_fsspec (memory://, in-process).


# --------------------------------------------------------------------------------------------------
# Keras


KERAS_MODEL = '''
import keras


def build():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                             keras.layers.BatchNormalization(), keras.layers.Dense(2)])
'''

KERAS_TRAIN = '''
import sys
import numpy as np
import keras
import savegame

sys.path.insert(0, sys.argv[1])
from kmodel import build

keras.utils.set_random_seed(0)
model = build()
model.compile(optimizer="adam", loss="mse")
x = np.random.default_rng(0).random((32, 4)).astype("float32")
model.fit(x, x[:, :2] * 2.0, epochs=2, batch_size=8, verbose=0)
weights = {w.path: np.asarray(w) for w in model.weights}
savegame.save(sys.argv[2], {"model": weights}, metadata={"framework": "keras", "backend": keras.backend.backend()})
print("READY", flush=True)
sys.stdin.readline()
fresh = build()
fresh.load_weights(sys.argv[3])
same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(model.weights, fresh.weights))
print("LOADED", same, flush=True)
'''


def _keras_backend() -> str | None:
    if importlib.util.find_spec("keras") is None:
        return None
    for backend, module in (("jax", "jax"), ("torch", "torch"), ("tensorflow", "tensorflow")):
        if importlib.util.find_spec(module) is not None:
            return backend
    return None


@dataclass
class KerasTrainer:
    """The Keras training process: it saved ``ckpt`` and waits to load ``h5`` back (see KERAS_TRAIN)."""

    proc: subprocess.Popen[str]
    directory: Path
    ckpt: Path
    h5: Path
    backend: str


@pytest.fixture(scope="module", autouse=True)
def keras_trainer(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KerasTrainer | None]:
    """Start the Keras training process with the first test of the module, so that importing Keras
    (seconds) overlaps with the other tests; only when the Keras test is selected."""
    backend = _keras_backend()
    wanted = any(item.name == "test_keras_checkpoint_ls_inspect_and_export_to_weights_h5"
                 for item in request.session.items)  # fmt: skip
    if backend is None or not wanted:
        yield None
        return
    directory = tmp_path_factory.mktemp("keras")
    (directory / "kmodel.py").write_text(KERAS_MODEL)
    (directory / "train.py").write_text(KERAS_TRAIN)
    ckpt, h5 = directory / "keras" / "epoch=002", directory / "model.weights.h5"
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen([sys.executable, str(directory / "train.py"), str(directory), str(ckpt), str(h5)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)  # fmt: skip
    try:
        yield KerasTrainer(proc, directory, ckpt, h5, backend)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_keras_checkpoint_ls_inspect_and_export_to_weights_h5(keras_trainer: KerasTrainer | None) -> None:
    if keras_trainer is None:
        pytest.skip("keras is not installed")
    trainer, ckpt, h5, directory = keras_trainer.proc, keras_trainer.ckpt, keras_trainer.h5, keras_trainer.directory
    assert trainer.stdout is not None and trainer.stdin is not None
    assert trainer.stdout.readline().strip() == "READY"
    listing, inspect, npz = run_all([
        ["ls", str(ckpt.parent), "--json"], ["inspect", str(ckpt), "--json"],
        ["export", str(ckpt), "--to", str(directory / "k.npz")],
    ])  # fmt: skip
    assert as_json(listing)["checkpoints"][0]["name"] == "epoch=002"
    tensors = {t["path"]: t for t in as_json(inspect)["tensors"]}
    assert tensors["model.sequential/dense/kernel"]["shape"] == [4, 8]
    assert as_json(inspect)["metadata"]["framework"] == "keras"
    assert npz.returncode == 0, npz.stderr
    expected = savegame.load(ckpt)["model"]
    exported = np.load(directory / "k.npz", allow_pickle=False)
    assert set(exported.files) == set(expected) and all(np.array_equal(exported[k], v) for k, v in expected.items())

    result = run("export", ckpt, "--to", h5, "--keras-model", f"{directory / 'kmodel.py'}:build",
                 env={"KERAS_BACKEND": keras_trainer.backend, "TF_CPP_MIN_LOG_LEVEL": "3"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "(keras): 8 tensors" in result.stdout
    trainer.stdin.write("go\n")
    trainer.stdin.flush()
    assert trainer.stdout.readline().strip() == "LOADED True"  # Keras's own load_weights reads it back


def test_gc_touches_only_what_savegame_names_and_honours_older_than_zero(tmp_path: Path) -> None:
    """gc reported removing the files ``.staging-notes`` and ``.trash-notes`` (and left them), and deleted a
    user's ``.trash-photos`` folder: only folders named as savegame names its own are leftovers. A
    quarantine whose name's clock is ahead survived ``--older-than 0``, which means every one."""
    import numpy as np

    root = tmp_path / "run"
    savegame.save(root / "c1", {"m": np.ones(2)})
    (root / ".staging-notes").write_text("mine")
    (root / ".trash-notes").write_text("mine")
    (root / ".trash-photos").mkdir()
    (root / ".trash-photos" / "a.jpg").write_text("photo")
    ahead = root / ".quarantine-x-29991231T000000-abcdef"
    ahead.mkdir()
    done = run("gc", root, "--older-than", "0", "--json")
    assert done.returncode == 0, done.stderr
    assert [a["name"] for a in as_json(done)["actions"]] == [ahead.name]
    assert not ahead.exists() and (root / ".trash-photos" / "a.jpg").read_text() == "photo"
    assert (root / ".staging-notes").exists() and (root / ".trash-notes").exists()
