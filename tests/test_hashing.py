"""File hashes: the chunked hash of format 3 (its definition, its parallel computation) end to end.

A data file longer than the manifest's ``hash_chunk_bytes`` is hashed as the XXH3-128 of its chunks'
16-byte digests, so one large file is verified on several threads. The tests use the smallest chunk a
manifest may declare (1 MiB) so that multi-chunk files stay small.
"""

from __future__ import annotations

import json
import mmap
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash

import savegame
from savegame.cli.scan import verify_checkpoint
from savegame.errors import HashMismatchError
from savegame.format import hashing
from savegame.format.hashing import MIN_CHUNK_BYTES, FileHasher, hash_buffer, hash_in_background

C = MIN_CHUNK_BYTES


def spec_hash(data: bytes, chunk: int | None) -> str:
    """The definition, written independently of savegame's implementation."""
    if chunk is None or len(data) <= chunk:
        return xxhash.xxh3_128_hexdigest(data)
    digests = b"".join(xxhash.xxh3_128_digest(data[i : i + chunk]) for i in range(0, len(data), chunk))
    return xxhash.xxh3_128_hexdigest(digests)


SIZES = [0, 1, C - 1, C, C + 1, 2 * C, 3 * C + 5]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("chunk", [None, C])
def test_incremental_hash_matches_the_definition_for_any_update_sizes(size: int, chunk: int | None) -> None:
    data = random.Random(size).randbytes(size)
    whole = FileHasher(chunk)
    whole.update(data)
    pieces = FileHasher(chunk)
    rng = random.Random(1)
    pos = 0
    while pos < size:  # updates that straddle chunk boundaries, some empty, as the writer's coalescing does
        n = rng.choice([0, 1, 7, 4096, C // 3, C + 11])
        pieces.update(memoryview(data)[pos : pos + n])
        pos += n
    assert whole.hexdigest() == pieces.hexdigest() == spec_hash(data, chunk)
    if chunk is not None and size <= chunk:
        assert whole.hexdigest() == xxhash.xxh3_128_hexdigest(data)  # one chunk: the format-2 hash


def test_updates_with_typed_memoryviews_count_bytes() -> None:
    arr = np.arange(C // 2, dtype=np.float64)  # 4 MiB: four chunks, passed as a float64 buffer
    hasher = FileHasher(C)
    hasher.update(memoryview(arr))
    assert hasher.hexdigest() == spec_hash(arr.tobytes(), C)


@pytest.mark.parametrize("size", [*SIZES, 9 * C + 3])
def test_background_and_buffer_hashes_match_the_definition(size: int, tmp_path: Path) -> None:
    data = random.Random(size).randbytes(size)
    for chunk in (None, C):
        expected = spec_hash(data, chunk)
        assert hash_in_background(data, size, chunk).result() == expected
        assert hash_in_background(bytearray(data), size, chunk).result() == expected
        assert hash_buffer(data, size, chunk) == expected
    if size:
        file = tmp_path / "f"
        file.write_bytes(data)
        with open(file, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
            assert hash_in_background(m, size, C).result() == spec_hash(data, C)


def test_the_chunks_of_one_file_are_hashed_off_the_caller_in_one_lane_per_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads: list[str] = []
    one_shot = xxhash.xxh3_128_digest

    def recording(data: object) -> bytes:
        threads.append(threading.current_thread().name)
        return one_shot(data)  # type: ignore[arg-type]

    data = random.Random(0).randbytes(8 * C + 1)
    expected = spec_hash(data, C)
    monkeypatch.setattr(hashing.xxhash, "xxh3_128_digest", recording)
    assert hash_buffer(data, len(data), C) == expected
    assert len(threads) == 9 and all(name.startswith("savegame-verify") for name in threads)
    lanes = hash_in_background(data, len(data), C)._lanes  # bounded by the pool, not by the file's size
    assert len(lanes) == min(9, hashing._READ_WORKERS)


def test_hash_errors_are_raised_after_every_part_finished() -> None:
    pending = hash_in_background(object(), 4 * C, C)  # not a buffer: every part fails
    with pytest.raises(TypeError, match="memoryview"):
        pending.result()


# ---------------------------------------------------------------------------------------------------
# End to end: checkpoints whose files span several chunks


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(hashing, "HASH_CHUNK_BYTES", C)
    return C


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))  # ~4.2 MB of weights


def test_multi_chunk_checkpoint_round_trips_and_records_its_chunk(tmp_path: Path, small_chunks: int) -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 512)).sum().backward()
    opt.step()
    saved = savegame.save(tmp_path / "c", {"model": model, "optimizer": opt})
    body = json.loads((tmp_path / "c" / "manifest.json").read_bytes())
    assert body["format_version"] == 3 and body["hash_chunk_bytes"] == small_chunks
    assert saved.hash_chunk_bytes == small_chunks == savegame.read_manifest(tmp_path / "c").hash_chunk_bytes
    for name, entry in body["files"].items():
        data = (tmp_path / "c" / name).read_bytes()
        assert len(data) > 3 * small_chunks
        assert entry["hash"] == spec_hash(data, small_chunks) != xxhash.xxh3_128_hexdigest(data)
    fresh = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    savegame.load(tmp_path / "c", {"model": fresh, "optimizer": fresh_opt})
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    savegame.verify(tmp_path / "c")
    verify_checkpoint(str(tmp_path / "c"))
    assert torch.equal(savegame.load(tmp_path / "c")["model"]["0.weight"], model[0].weight)


def test_a_flipped_byte_in_any_chunk_is_found_before_anything_is_restored(tmp_path: Path, small_chunks: int) -> None:
    model = _model()
    savegame.save(tmp_path / "c", {"model": model})
    file = tmp_path / "c" / "model.safetensors"
    good = file.read_bytes()
    assert len(good) > 4 * small_chunks
    for offset in (small_chunks - 1, small_chunks, 2 * small_chunks + 12345, len(good) - 1):
        bad = bytearray(good)
        bad[offset] ^= 0x01
        file.write_bytes(bytes(bad))
        target = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))
        before = [t.clone() for t in target.state_dict().values()]
        with pytest.raises(HashMismatchError, match="content hash differs"):
            savegame.load(tmp_path / "c", {"model": target})
        for attempt in (savegame.load, savegame.verify, lambda p: verify_checkpoint(str(p))):
            with pytest.raises(HashMismatchError, match="content hash differs"):
                attempt(tmp_path / "c")
        assert all(torch.equal(a, b) for a, b in zip(before, target.state_dict().values()))
    file.write_bytes(good)
    savegame.verify(tmp_path / "c")


def test_checkpoints_written_with_another_chunk_size_are_read_by_their_own(tmp_path: Path) -> None:
    """The reader takes the chunk size from each manifest, not from its own default."""
    model = _model()
    old = hashing.HASH_CHUNK_BYTES
    try:
        hashing.HASH_CHUNK_BYTES = 2 * C
        savegame.save(tmp_path / "two", {"model": model})
    finally:
        hashing.HASH_CHUNK_BYTES = old
    savegame.save(tmp_path / "default", {"model": model})
    assert savegame.verify(tmp_path / "two").hash_chunk_bytes == 2 * C
    assert savegame.verify(tmp_path / "default").hash_chunk_bytes == old
    target = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))
    savegame.load(tmp_path / "two", {"model": target})
    assert torch.equal(target[1].weight, model[1].weight)
