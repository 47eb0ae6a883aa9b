"""One liveness rule for unfinished writes (savegame.storage.liveness), local and remote alike.

Local cleanup (what the Checkpointer runs on opening a directory) and ``savegame gc`` kept another
host's ``.staging-*`` folder for 24 h; remote cleanup removed another host's upload after 1 h of
silence. The longer, safer wait now applies to both: a write last seen 2 h ago is kept everywhere,
one last seen 25 h ago is removed everywhere.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from savegame.cli.manage import gc_plan
from savegame.storage import LocalStorage, RemoteStorage
from savegame.storage.liveness import FOREIGN_WRITER_GRACE_SECONDS, writer_is_live

HOUR = 3600.0


def _foreign_staging(root: Path, age: float) -> str:
    """A staging folder of a writer on another host, last touched ``age`` seconds ago."""
    name = ".staging-elsewhere.example-4242-0123456789ab"
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"partial")
    stamp = time.time() - age
    os.utime(folder, (stamp, stamp))
    return name


def _foreign_upload(storage: RemoteStorage, age: float) -> str:
    """A version folder whose writer on another host last refreshed its heartbeat ``age`` seconds ago."""
    version = "v20260101T000000000000-0badcafe"
    prefix = f"{storage.root}/c/{version}"
    marker = {"format": "savegame-staging", "owner": "someone-else", "host": "elsewhere.example", "pid": 4242,
              "started": time.time() - age, "heartbeat": time.time() - age, "name": "c"}  # fmt: skip
    storage.fs.pipe_file(f"{prefix}/.staging", json.dumps(marker).encode())
    storage.fs.pipe_file(f"{prefix}/model.safetensors", b"partial")
    return f"c/{version}"


@pytest.mark.parametrize(("age", "kept"), [(2 * HOUR, True), (25 * HOUR, False)])
def test_local_cleanup_and_gc_agree(tmp_path: Path, age: float, kept: bool) -> None:
    name = _foreign_staging(tmp_path, age)
    planned = {step["name"] for step in gc_plan(str(tmp_path), older_than=7 * 24 * HOUR)}
    assert (name not in planned) is kept
    removed = LocalStorage(tmp_path).cleanup()
    assert (name not in removed) is kept
    assert (tmp_path / name).exists() is kept


@pytest.mark.parametrize(("age", "kept"), [(2 * HOUR, True), (25 * HOUR, False)])
def test_remote_cleanup_follows_the_same_rule(age: float, kept: bool) -> None:
    storage = RemoteStorage(f"memory://sg-liveness-{os.getpid()}-{int(age)}/run")
    upload = _foreign_upload(storage, age)
    removed = storage.cleanup()
    assert (upload not in removed) is kept
    assert storage.grace_seconds == FOREIGN_WRITER_GRACE_SECONDS == 24 * HOUR


def test_a_configured_grace_still_applies_to_remote_storage() -> None:
    storage = RemoteStorage(f"memory://sg-liveness-{os.getpid()}-grace/run", grace_seconds=HOUR)
    upload = _foreign_upload(storage, 2 * HOUR)
    assert storage.cleanup() == [upload]


def test_the_rule_itself() -> None:
    now = 1_000_000.0
    assert writer_is_live(host="elsewhere.example", pid=1, touched=now - 2 * HOUR, now=now)
    assert not writer_is_live(host="elsewhere.example", pid=1, touched=now - 25 * HOUR, now=now)
    assert not writer_is_live(host=None, pid=None, touched=None, now=now)
    import socket

    here = socket.gethostname()
    assert writer_is_live(host=here, pid=os.getpid(), touched=None)
    assert not writer_is_live(host=here, pid=os.getpid(), touched=None, this_process=False)


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_plain_save_removes_only_dead_writers_staging_folders_once(tmp_path: Path) -> None:
    """A run killed mid-save (preemption, SIGKILL) leaves ``.staging-*``; the next ``savegame.save`` into
    that root (the Lightning / transformers integrations' path) removes those of writers that are gone, and
    nothing else: a live writer's folder, an old-version ``.trash-*`` folder and the user's files stay."""
    import socket

    import numpy as np

    import savegame

    host = socket.gethostname()
    dead = tmp_path / f".staging-{host}-{_dead_pid()}-0123456789ab"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"\x10\x00")  # cut off mid-header
    live = tmp_path / f".staging-{host}-{os.getpid()}-0123456789ab"
    live.mkdir()
    trash = tmp_path / ".trash-last.ckpt-0123"
    trash.mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    recent_foreign = _foreign_staging(tmp_path, age=2 * HOUR)

    savegame.save(tmp_path / "a.ckpt", {"w": np.arange(3)})
    assert not dead.exists()
    assert live.is_dir() and trash.is_dir() and (tmp_path / recent_foreign).is_dir()
    assert (tmp_path / "notes.txt").read_text() == "mine"

    # once per root and process: a folder of a writer that died afterwards is the next process's to remove
    later = tmp_path / f".staging-{host}-{_dead_pid()}-0123456789ac"
    later.mkdir()
    savegame.save(tmp_path / "b.ckpt", {"w": np.arange(3)}, background=True).result()
    assert later.is_dir()
    assert LocalStorage(str(tmp_path)).remove_dead_staging() == [later.name]
