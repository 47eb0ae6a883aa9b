"""Where a remote checkpoint's objects go: the names of version folders and of the owner marker.

Object stores cannot rename a folder atomically, so a checkpoint is published by writing one object
last: its manifest. Layout under a root ``s3://bucket/run``::

    run/NAME/manifest.json              the commit marker: NAME is a committed checkpoint iff it exists
    run/NAME/VERSION/model.safetensors  the data of one upload (VERSION = v<UTC time>-<random>)
    run/NAME/VERSION/manifest.json      the same manifest bytes: each version folder is a complete,
                                        self-contained checkpoint directory (copy it to load it locally)
    run/NAME/VERSION/.staging           owner marker (host, pid, heartbeat) while the upload runs
    run/.quarantine-NAME-STAMP-RAND/    damaged checkpoints moved aside (copied, never listed or loaded)

The transactions (:mod:`~savegame.storage.remote.write`) name new version folders with
:func:`_new_version`; the reader (:mod:`~savegame.storage.remote.read`) and
:class:`~savegame.storage.remote.root.RemoteStorage` (check_target, delete, cleanup) find them in a
listing with :func:`versions_under`.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

STAGING_MARKER = ".staging"
"""Object inside a version folder that names its writer while the upload runs."""

_VERSION_RE = re.compile(r"^v\d{8}T\d{12}-[0-9a-f]{8}$")
"""A version folder's name, as :func:`_new_version` makes it."""


def versions_under(prefix: str, objects: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """``{version: {relative file: path}}`` of the objects under ``prefix/`` (a checkpoint's key,
    ``ROOT/NAME``), skipping anything that is not in a version folder."""
    prefix = prefix + "/"
    out: dict[str, dict[str, str]] = {}
    for path in objects:
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        if len(parts) >= 2 and _VERSION_RE.match(parts[0]):
            out.setdefault(parts[0], {})["/".join(parts[1:])] = path
    return out


def _new_version() -> str:
    """A fresh version folder name: ``v<UTC time to the microsecond>-<8 random hex digits>``."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now % 1 * 1_000_000):06d}"
    return f"v{stamp}-{uuid.uuid4().hex[:8]}"
