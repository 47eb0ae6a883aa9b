"""On S3 too, a save replaces a savegame checkpoint only (moto's real server, through s3fs).

Objects under ``NAME/`` that are not savegame's version folders, an object named ``NAME`` itself, or a
``NAME/manifest.json`` another program wrote: the save raises :class:`OccupiedPathError` before it
uploads anything, and every object is left as it was. Version folders of an interrupted upload (no
commit marker) do not count: that name may be saved again.
"""

from __future__ import annotations

from typing import Any

import fsspec
import numpy as np
import pytest

import savegame
from savegame.errors import CommitError, OccupiedPathError


def _fs(options: dict[str, Any]) -> Any:
    fs = fsspec.filesystem("s3", **options)
    fs.invalidate_cache()
    return fs


def _snapshot(fs: Any, bucket: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    root = bucket.removeprefix("s3://")
    return {p: fs.cat_file(p) for p in fs.find(root)}


@pytest.mark.parametrize("background", [False, True])
def test_save_refuses_objects_that_are_not_a_checkpoint(
    bucket: str, s3_options: dict[str, Any], background: bool
) -> None:
    fs = _fs(s3_options)
    root = bucket.removeprefix("s3://")
    fs.pipe_file(f"{root}/run/mydata/train.csv", b"x,y\n1,2\n")
    fs.pipe_file(f"{root}/run/mydata/sub/x.bin", b"\x00\x01" * 100)
    fs.pipe_file(f"{root}/run/notes.txt", b"do not lose me")
    fs.pipe_file(f"{root}/run/site/manifest.json", b'{"name": "my web app"}')
    fs.pipe_file(f"{root}/run/site/index.html", b"<html></html>")
    before = _snapshot(fs, bucket)
    for name, kind in (("mydata", "not a savegame checkpoint"), ("notes.txt", "an object"),
                       ("site", "not a savegame manifest")):  # fmt: skip
        for overwrite in (True, False):
            with pytest.raises(OccupiedPathError, match=kind) as info:
                savegame.save(f"{bucket}/run/{name}", {"x": np.ones(3)}, overwrite=overwrite,
                              background=background, storage_options=s3_options)  # fmt: skip
            assert isinstance(info.value, CommitError) and f"{bucket}/run/{name}" in str(info.value)
            assert _snapshot(fs, bucket) == before, name
    savegame.engine.background.default_writer().wait()


def test_a_checkpoint_and_an_interrupted_upload_may_be_saved_over(bucket: str, s3_options: dict[str, Any]) -> None:
    fs = _fs(s3_options)
    root = bucket.removeprefix("s3://")
    url = f"{bucket}/run/c"
    savegame.save(url, {"v": 1}, storage_options=s3_options)
    savegame.save(url, {"v": 2}, storage_options=s3_options)  # a savegame checkpoint: replaced
    assert savegame.load(url, storage_options=s3_options)["v"] == 2
    fs.pipe_file(f"{root}/run/half/v20260101T000000000000-00000000/x.safetensors", b"x")  # interrupted upload
    savegame.save(f"{bucket}/run/half", {"v": 3}, overwrite=False, storage_options=s3_options)
    assert savegame.load(f"{bucket}/run/half", storage_options=s3_options)["v"] == 3
