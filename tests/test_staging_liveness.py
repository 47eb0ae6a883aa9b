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
