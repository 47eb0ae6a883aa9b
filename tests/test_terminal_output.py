"""Human-readable CLI output of hostile checkpoints shows control characters as escapes.

Names of checkpoint folders, items, keys, metrics, library versions and metadata come from files that
anyone could have written. Printed raw, an ``ESC [2J`` clears the screen, ``ESC ] 0;...`` retitles the
terminal, a C1 CSI (``\\x9b``) moves the cursor and U+202E turns a name around. Every command here runs
the real CLI in a subprocess on a checkpoint of a real torch model whose manifest was forged (and
re-signed, as a forger can) and whose folder names carry escape sequences; its raw stdout and stderr
must hold no control character but ``\\n`` -- and with ``--color always`` none but the CLI's own colour
codes. ``savegame ls`` must not follow a ``.quarantine-*`` symlink out of the root.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from savegame._util.safetext import escape_controls
from savegame.format import manifest as M
from savegame.run.checkpointer import Checkpointer
from savegame.run.lock import LockHolder

pytestmark = pytest.mark.subprocess

SRC = str(Path(__file__).resolve().parents[1] / "src")

CLEAR = "\x1b[2J\x1b[H"
TITLE = "\x1b]0;pwned\x07"
CSI8 = "\x9b1A"  # the one-byte (C1) control sequence introducer
BIDI = "\u202e"
EVIL = CLEAR + TITLE + CSI8 + BIDI + "\x7f"
EVIL_KEY = EVIL + "\x00"  # (a NUL cannot be in a file name, but in a key or metric name it can)
RED = "\x1b[31m"  # a colour code the CLI itself uses: must still be escaped when it comes from a file
MATH = "cost$\\frac{$"  # matplotlib would parse $...$ as (here: invalid) mathtext

_SGR = re.compile(r"\x1b\[(?:0|1|2|3[1-6])(?:;(?:0|1|2|3[1-6]))*m")
_BAD = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def assert_terminal_safe(data: bytes, *, color: bool = False) -> str:
    """``data`` (raw output) is valid UTF-8 (a raw 8-bit CSI byte is not) with no control character but
    ``\\n``; with ``color``, the CLI's own colour codes are allowed. Returns the text."""
    text = data.decode("utf-8")
    checked = _SGR.sub("", text) if color else text
    bad = _BAD.findall(checked)
    assert not bad, f"raw control characters {bad!r} in output:\n{text!r}"
    return text


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """``python -m savegame.cli ARGS`` with this checkout's sources; raw bytes of stdout and stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "SAVEGAME_PROGRESS")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "savegame.cli", *map(str, args)], capture_output=True, env=env,
                          cwd=cwd, timeout=300)  # fmt: skip


def forge(checkpoint: Path, change: Any) -> None:
    """Rewrite ``checkpoint``'s manifest with ``change(body)`` applied, re-signed (a forger can)."""
    path = checkpoint / "manifest.json"
    body = json.loads(path.read_bytes())
    change(body)
    path.write_bytes(M.sign_manifest(body))


def _hostile_manifest(body: dict[str, Any]) -> None:
    progress = body["progress"]
    progress["metrics"] = {f"val_loss{EVIL_KEY}": progress["metrics"]["val_loss"], f"acc{RED}": 0.5,
                           MATH: progress["sequence"] / 10}  # fmt: skip
    body["versions"]["torch"] = f"2.0{CLEAR}"
    body["versions"][f"evil{TITLE}"] = f"1{CSI8}"
    body["metadata"] = {f"who{EVIL_KEY}": f"me{EVIL_KEY}", "plain": "ok"}
    body["items"][f"extra{EVIL}"] = body["items"].pop("extra")


@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run root of real checkpoints: hostile dict keys and values saved through the library, forged
    metrics, versions, metadata and item names, and folder names with escape sequences (one of them
    with a raw ``\\x9b`` byte that is not even UTF-8)."""
    root = tmp_path_factory.mktemp("hostile") / "run"
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"model": model, "optimizer": optimizer,
             "extra": {f"w{EVIL}": torch.ones(2), "note": f"v{EVIL_KEY}", f"k{RED}": [1, f"x{TITLE}"]}}  # fmt: skip
    with Checkpointer(root, monitor="val_loss", keep_last=5) as ckpt:
        for epoch in range(1, 4):
            with torch.no_grad():
                model.weight.add_(0.1)
                state["extra"][f"w{EVIL}"] = torch.full((2,), float(epoch))  # type: ignore[index]
            ckpt.step(state, epoch=epoch, step=epoch * 10, metrics={"val_loss": 1.0 / epoch})
    names = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    assert len(names) == 3
    for name in names:
        forge(root / name, _hostile_manifest)
    os.rename(root / names[0], root / f"first{EVIL}")
    os.rename(os.fsencode(root / names[1]), os.fsencode(root) + b"/second\x9b2J\x1b[31m")
    os.rename(root / names[2], root / f"third{RED}")
    return root


def _folder(root: Path, prefix: str) -> Path:
    return next(p for p in root.iterdir() if p.name.startswith(prefix))


COMMANDS = [
    ["ls", "{root}"],
    ["ls", "{root}", "--verify"],
    ["ls", "{root}", "--metrics", f"val_loss{EVIL},acc{RED}"],
    ["inspect", "{third}"],
    ["inspect", "{first}", "--verify"],
    ["verify", "{root}"],
    ["verify", "{first}"],
    ["diff", "{first}", "{third}"],
    ["prune", "{root}", "--keep-last", "1", "--dry-run"],
    ["plot", "{root}", "--metric", f"acc{RED}", "-o", "{plot}"],
    ["plot", "{root}", "--metric", MATH, "-o", "{plot}"],
    ["ls", "{root}", "--json"],
    ["inspect", "{third}", "--json"],
    ["diff", "{first}", "{third}", "--json"],
]


@pytest.mark.parametrize("color", ["never", "always"])
@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a).replace("{", "").replace("}", "")[:40])
def test_hostile_names_are_escaped_in_every_command(hostile_root: Path, argv: list[str], color: str) -> None:
    if argv[0] == "plot":
        pytest.importorskip("matplotlib")
    plot = hostile_root.parent / f"plot-{color}.png"
    paths = {"root": hostile_root, "first": _folder(hostile_root, "first"), "third": _folder(hostile_root, "third"),
             "plot": plot}  # fmt: skip
    args = [paths[a[1:-1]] if a[1:-1] in paths and a[0] + a[-1] == "{}" else a for a in argv]
    result = run(*args, "--color", color)
    assert result.returncode in (0, 1), (result.returncode, result.stderr)
    out = assert_terminal_safe(result.stdout, color=color == "always")
    assert_terminal_safe(result.stderr, color=color == "always")
    for prefix in ("acc", "third", "k", "second\\udc9b2J"):  # a colour code from a file is escaped too
        assert prefix + RED not in out, out
    if argv[0] == "plot":
        assert result.returncode == 0 and plot.stat().st_size > 0, result.stderr
        plot.unlink()
    if "--json" in argv:
        assert out.isascii()
        json.loads(out)  # still valid JSON, the names escaped the JSON way
        return
    if argv[0] in ("ls", "inspect", "diff"):
        # What the file says is shown, visibly: the escaped form of the hostile text.
        assert escape_controls(CLEAR) in out, out


def test_ls_shows_what_the_hostile_names_are(hostile_root: Path) -> None:
    out = assert_terminal_safe(run("ls", hostile_root, "--color", "always").stdout, color=True)
    assert escape_controls(f"first{EVIL}") in out
    assert "second\\udc9b2J\\x1b[31m" in out  # the raw byte 0x9b of the folder name, shown as Python names it
    assert "third\\x1b[31m" in out
    assert escape_controls(f"val_loss{EVIL_KEY}") in out  # the forged metric column


def test_corrupt_checkpoint_problem_quotes_the_folder_escaped(tmp_path: Path, hostile_root: Path) -> None:
    import shutil

    root = tmp_path / "run"
    shutil.copytree(hostile_root, root, symlinks=True)
    data = _folder(root, "first") / "model.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x40
    data.write_bytes(bytes(raw))
    for argv in (["verify", root], ["ls", root, "--verify"], ["verify", _folder(root, "first")]):
        result = run(*argv)
        assert result.returncode == 1, result
        out = assert_terminal_safe(result.stdout) + assert_terminal_safe(result.stderr)
        assert "content hash differs" in out and escape_controls(f"first{EVIL}") in out, out


def test_error_messages_quoting_paths_are_escaped(tmp_path: Path, hostile_root: Path) -> None:
    missing = tmp_path / f"nothing{EVIL}"
    for argv in (["ls", missing], ["inspect", missing], ["verify", missing], ["inspect", hostile_root,
                 "--which", f"x{EVIL}"], ["ls", missing, "--debug"], ["export", _folder(hostile_root, "third"),
                 "--item", "model", "--to", missing / "model.safetensors"], ["ls", hostile_root, f"--bogus{EVIL}"],
                 ["ls", hostile_root, "--mode", f"x{EVIL}"]):  # fmt: skip
        result = run(*argv)
        assert result.returncode == 2, (argv, result)
        assert_terminal_safe(result.stdout)
        err = assert_terminal_safe(result.stderr)
        assert "\\x1b[2J" in err, err


def test_quarantine_symlink_out_of_the_root_is_not_followed(tmp_path: Path) -> None:
    """A ``.quarantine-*`` entry that is a symlink (to a checkpoint elsewhere) is not listed, read or
    plotted: the root's listing never reads what lies outside it."""
    root, outside = tmp_path / "run", tmp_path / "elsewhere"
    model = torch.nn.Linear(2, 2)
    with Checkpointer(root, monitor="val_loss") as ckpt:
        ckpt.step({"model": model}, epoch=1, step=1, metrics={"val_loss": 0.5})
    with Checkpointer(outside, monitor="val_loss") as ckpt:
        ckpt.step({"model": model}, epoch=7, step=77, metrics={"val_loss": 0.1, "secret_metric": 42.0})
    secret = next(p for p in outside.iterdir() if not p.name.startswith("."))
    (root / ".quarantine-evil").symlink_to(secret, target_is_directory=True)
    (root / ".quarantine-dangling").symlink_to(tmp_path / "missing")
    listing = run("ls", root, "--json")
    assert listing.returncode == 0, listing
    data = json.loads(listing.stdout)
    assert data["quarantined"] == [] and len(data["checkpoints"]) == 1
    text = run("ls", root)
    assert text.returncode == 0 and b"secret_metric" not in text.stdout and b"quarantined" not in text.stdout
    verify = run("verify", root)
    assert verify.returncode == 0 and b"quarantine" not in verify.stdout, verify
    assert (root / ".quarantine-evil").is_symlink()  # nothing was changed either


def test_lock_record_fields_are_escaped() -> None:
    """The lock file names its holder; anyone can write it, and LockedError and the stale-lock warning
    (logged, outside the CLI too) quote it."""
    record = {"pid": 1, "host": f"node{CLEAR}", "program": f"train{TITLE}.py", "since": f"now{CSI8}", "token": "t"}
    holder = LockHolder.from_json(json.dumps(record).encode())
    assert holder is not None
    assert not _BAD.findall(holder.describe()), holder.describe()
    assert escape_controls(f"node{CLEAR}") in holder.describe()


def test_gc_shows_hostile_leftover_names_escaped(tmp_path: Path, hostile_root: Path) -> None:
    import shutil

    root = tmp_path / "run"
    shutil.copytree(hostile_root, root, symlinks=True)
    (root / f".trash-del-evil{EVIL}-1234abcd").mkdir()
    shutil.copytree(_folder(root, "third"), root / f".quarantine-q{EVIL}-20200101T000000-abcdef")
    result = run("gc", root, "--dry-run", "--older-than", "0", "--color", "always")
    assert result.returncode == 0, result
    out = assert_terminal_safe(result.stdout, color=True)
    assert_terminal_safe(result.stderr, color=True)
    assert escape_controls(f".trash-del-evil{EVIL}") in out and escape_controls(f".quarantine-q{EVIL}") in out, out


def test_the_load_progress_bar_and_log_line_escape_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``load`` accepts any folder name (``save`` refuses such names, a rename does not): the progress bar
    and the ``loaded ...`` log line printed it raw, so a folder name retitled the terminal or cleared it."""
    import io
    import logging

    import savegame
    from savegame._util import progress

    folder = tmp_path / ("c" + CLEAR + TITLE + BIDI)
    savegame.save(tmp_path / "c", {"w": torch.ones(4)})
    (tmp_path / "c").rename(folder)
    stream = io.StringIO()
    stream.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr(progress, "SHOW_AFTER_SECONDS", 0.0)
    monkeypatch.setattr(progress.sys, "stderr", stream)
    monkeypatch.setenv("SAVEGAME_PROGRESS", "1")
    with caplog.at_level(logging.INFO, logger="savegame"):
        savegame.load(folder)
    drawn = stream.getvalue()
    assert "loading" in drawn and escape_controls(str(folder)) in drawn
    assert not {"\x1b", "\x07", BIDI} & set(drawn)
    logged = [r.getMessage() for r in caplog.records if "loaded" in r.getMessage()]
    assert logged and escape_controls(str(folder)) in logged[0]
    assert not {"\x1b", "\x07", BIDI} & set(logged[0])


def test_resume_warnings_escape_the_names_they_quote(tmp_path: Path) -> None:
    """A damaged checkpoint folder with escape sequences in its name: the ResumeWarning saying it was
    quarantined quoted the name raw, and Python's warning display writes a warning's text as it is.
    Every savegame warning goes through ``savegame._util.logs.warn``, which escapes it."""
    import shutil
    import warnings

    from savegame.errors import ResumeWarning

    model = torch.nn.Linear(2, 2)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save({"model": model}, step=1)
    evil = tmp_path / ("step=000009" + CLEAR + TITLE + BIDI)
    shutil.copytree(tmp_path / "step=000001", evil)
    data = evil / "model.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    with warnings.catch_warnings(record=True) as caught, Checkpointer(tmp_path) as ckpt:
        warnings.simplefilter("always")
        ckpt.restore({"model": model})
    texts = [str(w.message) for w in caught if issubclass(w.category, ResumeWarning)]
    assert texts and any("quarantine" in t for t in texts), texts
    for text in texts:
        assert not {"\x1b", "\x07", BIDI} & set(text), text
        assert escape_controls("step=000009" + CLEAR) in text


def test_no_module_calls_warnings_warn_directly() -> None:
    """The escaping above holds only while every warning goes through ``savegame._util.logs.warn``."""
    package = Path(SRC) / "savegame"
    direct = [str(p.relative_to(package)) for p in package.rglob("*.py")
              if "warnings.warn(" in p.read_text() and p != package / "_util" / "logs.py"]  # fmt: skip
    assert direct == []
