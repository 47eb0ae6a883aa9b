"""A sparse data file (a few KiB on disk, 2 GiB apparent size) with a forged, re-signed manifest that
records its true size and hash is refused before it is mapped: it used to cost ~2 GB of RSS to verify and
~4 GB to load. Legitimate large files (every byte written, as savegame does) are unaffected.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import savegame
from savegame import Checkpointer, TruncatedFileError
from savegame.format.hashing import FileHasher
from savegame.format.manifest import sign_manifest
from savegame.format.tensorfile import _DENSE_FILESYSTEMS, _filesystem_type

APPARENT = 2 << 30  # 2 GiB of float32 zeros, all of it a hole


def _dense_filesystem(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _filesystem_type(fd) in _DENSE_FILESYSTEMS
    finally:
        os.close(fd)


def forge_sparse(checkpoint: Path, item: str = "x") -> None:
    """Replace ``item``'s tensor file by a sparse one holding one 2 GiB tensor of zeros, and re-sign the
    manifest with its real size and hash (computed from a small zero buffer: bounded memory here)."""
    body = json.loads((checkpoint / "manifest.json").read_bytes())
    n = APPARENT // 4
    header = json.dumps({"t": {"dtype": "F32", "shape": [n], "data_offsets": [0, APPARENT]}}).encode()
    header += b" " * ((-(8 + len(header))) % 64)
    prefix = struct.pack("<Q", len(header)) + header
    path = checkpoint / f"{item}.safetensors"
    with open(path, "wb") as f:
        f.write(prefix)
        f.truncate(len(prefix) + APPARENT)
    hasher = FileHasher(body.get("hash_chunk_bytes"))
    hasher.update(prefix)
    zeros = bytes(16 << 20)
    for _ in range(APPARENT // len(zeros)):
        hasher.update(zeros)
    body["files"][path.name] = {"bytes": len(prefix) + APPARENT, "hash": hasher.hexdigest()}
    body["items"][item]["skeleton"]["key"] = "t"
    (checkpoint / "manifest.json").write_bytes(sign_manifest(body))
    assert os.stat(path).st_blocks * 512 < 1 << 20


@pytest.fixture
def sparse(tmp_path: Path) -> Path:
    if not _dense_filesystem(tmp_path):
        pytest.skip("the temporary directory is not on ext4/XFS/tmpfs, where sparse data files are refused")
    savegame.save(tmp_path / "ckpt", {"x": np.zeros(4, np.float32), "epoch": 3})
    forge_sparse(tmp_path / "ckpt")
    return tmp_path / "ckpt"


_MEASURE = textwrap.dedent(
    """
    import sys, savegame
    action = sys.argv[2]
    try:
        (savegame.verify if action == "verify" else savegame.load)(sys.argv[1])
        print("returned")
    except savegame.CheckpointError as exc:
        print(type(exc).__name__, str(exc))
    # VmHWM: the peak of this process's own memory. (ru_maxrss is not: Linux carries it over from the
    # forked parent across exec, so a large pytest process would be measured instead of this one.)
    with open("/proc/self/status") as status:
        print(next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) // 1024)
    """
)


@pytest.mark.parametrize("action", ["verify", "load"])
def test_sparse_file_is_refused_with_bounded_memory(sparse: Path, action: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(savegame.__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(sparse), action], capture_output=True, text=True,
                            env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    outcome, rss_mib = result.stdout.splitlines()
    assert outcome.startswith("TruncatedFileError") and "sparse" in outcome and "x.safetensors" in outcome, outcome
    assert int(rss_mib) < 400, f"{action} of a 2 GiB sparse file used {rss_mib} MiB"


def test_cli_verify_and_restore_refuse_a_sparse_file(sparse: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(savegame.__file__).parents[1])}
    result = subprocess.run([sys.executable, "-m", "savegame.cli", "verify", str(sparse)], capture_output=True,
                            text=True, env=env, timeout=300)  # fmt: skip
    assert result.returncode == 1 and "CORRUPT" in result.stdout and "sparse" in result.stdout, result.stdout
    with pytest.raises(TruncatedFileError, match="sparse"):
        savegame.load(sparse, verify=False)


def test_restore_falls_back_past_a_sparse_newest_checkpoint(tmp_path: Path) -> None:
    if not _dense_filesystem(tmp_path):
        pytest.skip("not on ext4/XFS/tmpfs")
    with Checkpointer(tmp_path / "run") as ckpt:
        ckpt.save({"x": np.ones(4, np.float32)}, epoch=1)
        ckpt.save({"x": np.zeros(4, np.float32)}, epoch=2)
    newest = max((p for p in (tmp_path / "run").iterdir() if p.name.startswith("epoch")), key=lambda p: p.name)
    forge_sparse(newest)
    state = {"x": np.zeros(4, np.float32)}
    with pytest.warns(savegame.ResumeWarning, match="sparse"):
        restored = Checkpointer(tmp_path / "run").restore(state)
    assert restored is not None and restored.epoch == 1
    assert np.array_equal(state["x"], np.ones(4, np.float32))


def test_large_dense_files_still_load(tmp_path: Path) -> None:
    zeros = np.zeros(1 << 20, np.float32)  # 4 MiB of zeros, written (allocated) like every savegame file
    savegame.save(tmp_path / "c", {"x": zeros})
    savegame.verify(tmp_path / "c")
    assert np.array_equal(savegame.load(tmp_path / "c")["x"], zeros)
