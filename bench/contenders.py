"""The contenders: savegame (sync, async), its peers, and the physical limits of this machine.

Every ``save(workload, path)`` writes into the directory ``path`` (which does not exist yet) and returns
``(blocking_seconds, durable_seconds)``: how long the caller was blocked, and how long until the data, the
files and the directory entries are on stable storage. Peers that do not fsync directories get the same
fsyncs savegame does (the checkpoint directory and its parent) so that "durable" means the same for all.

``load(workload, path)`` is the plain load (savegame's and safetensors' return views of a private
mapping, torch.load reads into fresh memory) and touches every page of the result (lazy/mmap loaders
cannot skip work); ``load_into(workload, path)`` restores the live model and optimizer
in place, the way a resuming training script does. Either returns the elapsed seconds, or None when
the contender has no such operation.
"""

from __future__ import annotations

import inspect
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .workloads import Workload

_IOV_BATCH = 1024  # IOV_MAX on Linux
_CHUNK = 64 << 20


# ---------------------------------------------------------------------------------------------------
# Helpers


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def files_under(path: str) -> list[str]:
    out = []
    for root, _, names in os.walk(path):
        out += [os.path.join(root, n) for n in names]
    return sorted(out)


def bytes_on_disk(path: str) -> int:
    """Apparent size of every file of the checkpoint."""
    return sum(os.path.getsize(p) for p in files_under(path))


def byte_views(tensors: list[torch.Tensor]) -> list[memoryview]:
    """The raw bytes of each tensor (no copy), split into slices of at most 64 MiB."""
    views = []
    for t in tensors:
        if t.numel() == 0:
            continue
        mv = memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())
        for start in range(0, len(mv), _CHUNK):
            views.append(mv[start : start + _CHUNK])
    return views


_SMALL = 1 << 20


def _batches(views: list[memoryview]) -> Iterator[list[memoryview]]:
    """Large views alone (one plain write/read each); small ones gathered for one writev/readv.

    Measured on this machine (ext4 on virtio): ``writev`` with dozens of multi-MB iovecs is erratic and up to
    5x slower than one ``write`` per buffer, so large buffers never share a call."""
    batch: list[memoryview] = []
    size = 0
    for v in views:
        if len(v) >= _SMALL:
            if batch:
                yield batch
                batch, size = [], 0
            yield [v]
            continue
        batch.append(v)
        size += len(v)
        if len(batch) >= _IOV_BATCH or size >= 8 * _SMALL:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _advance(pending: list[memoryview], n: int) -> list[memoryview]:
    while pending and n >= len(pending[0]):
        n -= len(pending[0])
        pending = pending[1:]
    if pending and n:
        pending = [pending[0][n:], *pending[1:]]
    return pending


def write_all(fd: int, views: list[memoryview]) -> int:
    """Write every view without copying it; handle partial writes."""
    total = 0
    for batch in _batches(views):
        pending = batch
        while pending:
            n = os.write(fd, pending[0]) if len(pending) == 1 else os.writev(fd, pending)
            total += n
            pending = _advance(pending, n)
    return total


def read_all(fd: int, views: list[memoryview]) -> int:
    """Fill every view straight from the file; handle short reads."""
    total = 0
    for batch in _batches(views):
        pending = batch
        while pending:
            n = os.readv(fd, pending)
            if n == 0:
                raise EOFError("file shorter than the state")
            total += n
            pending = _advance(pending, n)
    return total


def touch(obj: Any) -> int:
    """Read one byte of every page of every tensor in ``obj`` (forces lazily mapped data in)."""
    total = 0
    if isinstance(obj, torch.Tensor):
        if obj.numel():
            flat = obj.detach().reshape(-1).view(torch.uint8)
            total += int(flat[::4096].sum())
    elif isinstance(obj, dict):
        for v in obj.values():
            total += touch(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            total += touch(v)
    return total


def make_durable_dir(path: str) -> None:
    """fsync the checkpoint directory and its parent (the directory entry itself)."""
    fsync_dir(path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def flatten_for_safetensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``{"model": sd, "optimizer": sd}`` -> flat tensors + string metadata (what users of
    ``safetensors.torch.save_file`` write by hand: tensors by dotted name, the rest as JSON)."""
    flat: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for k, v in state["model"].items():
        flat[f"model.{k}"] = v.detach()
    if "optimizer" in state:
        osd = state["optimizer"]
        other: dict[str, dict[str, Any]] = {}
        for pid, per in osd["state"].items():
            for k, v in per.items():
                if isinstance(v, torch.Tensor):
                    flat[f"optimizer.state.{pid}.{k}"] = v
                else:
                    other.setdefault(str(pid), {})[k] = v
        meta["optimizer"] = json.dumps({"param_groups": osd["param_groups"], "other": other})
    return flat, meta


def unflatten_from_safetensors(flat: dict[str, torch.Tensor], meta: dict[str, str] | None) -> dict[str, Any]:
    model = {k[len("model.") :]: v for k, v in flat.items() if k.startswith("model.")}
    out: dict[str, Any] = {"model": model}
    if meta and "optimizer" in meta:
        info = json.loads(meta["optimizer"])
        state: dict[int, dict[str, Any]] = {}
        for k, v in flat.items():
            if k.startswith("optimizer.state."):
                pid, name = k[len("optimizer.state.") :].split(".", 1)
                state.setdefault(int(pid), {})[name] = v
        for pid, per in info["other"].items():
            state.setdefault(int(pid), {}).update(per)
        out["optimizer"] = {"state": state, "param_groups": info["param_groups"]}
    return out


def restore_state_dicts(wl: Workload, state: dict[str, Any]) -> None:
    wl.model.load_state_dict(state["model"])
    if wl.optimizer is not None:
        wl.optimizer.load_state_dict(state["optimizer"])


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _timed_into(wl: Workload, fn: Callable[[], Any]) -> float:
    """Time a restore into the live objects, then touch every page of the restored state (loaders that
    leave the optimizer state as lazy file mappings pay for the page-ins here, as training would)."""
    start = time.perf_counter()
    fn()
    touch(wl.flat_tensors())
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------
# Contenders


class Contender:
    name = "?"
    group = "peer"  # "savegame" | "peer" | "limit"
    has_load = False
    has_load_into = False
    restores = True  # its load_into puts the saved state back (checked once per workload); False: reads only

    def unavailable(self) -> str | None:
        """Why this contender cannot run here (None when it can)."""
        return None

    def save(self, wl: Workload, path: str) -> tuple[float, float]:
        raise NotImplementedError

    def load(self, wl: Workload, path: str) -> float | None:
        return None

    def load_into(self, wl: Workload, path: str) -> float | None:
        return None

    def reset(self) -> None:
        """Drop caches/buffers kept between saves (called between workloads)."""


class SavegameSync(Contender):
    name = "savegame sync"
    group = "savegame"
    has_load = True
    has_load_into = True

    def save(self, wl: Workload, path: str) -> tuple[float, float]:
        import savegame

        start = time.perf_counter()
        savegame.save(path, wl.savegame_state())
        t = time.perf_counter() - start
        return t, t

    def load(self, wl: Workload, path: str) -> float:
        import savegame

        return _timed(lambda: touch(savegame.load(path)))

    def load_into(self, wl: Workload, path: str) -> float:
        import savegame

        return _timed_into(wl, lambda: savegame.load(path, wl.savegame_state()))


class SavegameAsync(Contender):
    name = "savegame async"
    group = "savegame"

    def unavailable(self) -> str | None:
        import savegame

        if "background" not in inspect.signature(savegame.save).parameters:
            return "savegame.save has no background= parameter yet"
        return None

    def save(self, wl: Workload, path: str) -> tuple[float, float]:
        import savegame

        start = time.perf_counter()
        handle = savegame.save(path, wl.savegame_state(), background=True)
        blocking = time.perf_counter() - start
        wait = getattr(handle, "result", None) or handle.wait
        wait()
        return blocking, time.perf_counter() - start

    def reset(self) -> None:
        try:
            from savegame.engine.background import default_writer

            default_writer().pool.clear()
        except (ImportError, AttributeError):
            pass


class TorchSave(Contender):
    name = "torch.save"
    has_load = True
    has_load_into = True

    def save(self, wl: Workload, path: str) -> tuple[float, float]:
        start = time.perf_counter()
        os.mkdir(path)
        with open(os.path.join(path, "checkpoint.pt"), "wb") as f:
            torch.save(wl.state_dicts(), f)
            f.flush()
            os.fsync(f.fileno())
        make_durable_dir(path)
        t = time.perf_counter() - start
        return t, t

    def load(self, wl: Workload, path: str) -> float:
        file = os.path.join(path, "checkpoint.pt")
        return _timed(lambda: touch(torch.load(file, map_location="cpu", weights_only=True)))

    def load_into(self, wl: Workload, path: str) -> float:
        file = os.path.join(path, "checkpoint.pt")
        return _timed_into(
            wl, lambda: restore_state_dicts(wl, torch.load(file, map_location="cpu", weights_only=True))
        )


class SafetensorsSave(Contender):
    name = "safetensors"
    has_load = True
    has_load_into = True

    def unavailable(self) -> str | None:
        try:
            import safetensors.torch  # noqa: F401
        except ImportError as exc:
            return f"safetensors not installed ({exc})"
        return None

    @staticmethod
    def write_fsynced(wl: Workload, directory: str) -> None:
        """Make ``directory`` and write the state into it as one fsynced safetensors file."""
        from safetensors.torch import save_file

        os.mkdir(directory)
        file = os.path.join(directory, "checkpoint.safetensors")
        flat, meta = flatten_for_safetensors(wl.state_dicts())
        save_file(flat, file, metadata=meta)
        fsync_file(file)

    def save(self, wl: Workload, path: str) -> tuple[float, float]:
        start = time.perf_counter()
        self.write_fsynced(wl, path)
        make_durable_dir(path)
        t = time.perf_counter() - start
        return t, t

    def load(self, wl: Workload, path: str) -> float:
        from safetensors.torch import load_file

        file = os.path.join(path, "checkpoint.safetensors")
        return _timed(lambda: touch(load_file(file)))

    def load_into(self, wl: Workload, path: str) -> float:
        from safetensors import safe_open
        from safetensors.torch import load_file

        file = os.path.join(path, "checkpoint.safetensors")

        def run() -> None:
            flat = load_file(file)
            with safe_open(file, "pt") as f:
                meta = f.metadata()
            restore_state_dicts(wl, unflatten_from_safetensors(flat, meta))

        return _timed_into(wl, run)


class SafetensorsAtomic(SafetensorsSave):
    """safetensors made crash-atomic the way savegame commits: the file is written and fsynced in a staging
    directory, which is fsynced, renamed into place, and the parent fsynced. A crash at any point leaves
    either nothing or the complete checkpoint (the plain peer above can leave a directory with a partial
    file: its rename is not ordered after the data). The difference between the two is what atomicity
    itself costs on this disk: a second, ordered flush."""

    name = "safetensors (atomic commit)"
    has_load = False
    has_load_into = False

    def save(self, wl: Workload, path: str) -> tuple[float, float]:
        start = time.perf_counter()
        staging = f"{path}.staging"
        self.write_fsynced(wl, staging)
        fsync_dir(staging)
        os.rename(staging, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
        t = time.perf_counter() - start
        return t, t


class _DCPBase(Contender):
    def unavailable(self) -> str | None:
        try:
            import torch.distributed.checkpoint as dcp
        except ImportError as exc:
            return f"torch.distributed.checkpoint unavailable ({exc})"
        if "no_dist" not in inspect.signature(dcp.save).parameters:
            return "this torch's dcp.save has no no_dist parameter"
        return None


class DCPSave(_DCPBase):
    name = "dcp.save"
    has_load_into = False  # off by default (slow, not a target); --dcp-load turns it on

    def save(self, wl: Workload, path: str) -> tuple[float, float]:
        import torch.distributed.checkpoint as dcp

        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(wl.state_dicts(), checkpoint_id=path, no_dist=True)
        make_durable_dir(path)
        t = time.perf_counter() - start
        return t, t

    def load_into(self, wl: Workload, path: str) -> float:
        import torch.distributed.checkpoint as dcp

        def run() -> None:
            state = wl.state_dicts()  # DCP loads in place into these (the live tensors)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.load(state, checkpoint_id=path, no_dist=True)
            restore_state_dicts(wl, state)

        return _timed_into(wl, run)


class DCPAsyncSave(_DCPBase):
    name = "dcp.async_save"

    def unavailable(self) -> str | None:
        reason = super().unavailable()
        if reason:
            return reason
        import torch.distributed.checkpoint as dcp

        return None if hasattr(dcp, "async_save") else "this torch has no dcp.async_save"

    def save(self, wl: Workload, path: str) -> tuple[float, float]:
        import torch.distributed.checkpoint as dcp

        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handle = dcp.async_save(wl.state_dicts(), checkpoint_id=path, no_dist=True)
            blocking = time.perf_counter() - start
            if hasattr(handle, "upload_completion"):
                handle.upload_completion.result()
            else:
                handle.result()
        make_durable_dir(path)
        return blocking, time.perf_counter() - start


class RawWrite(Contender):
    """The physical limit: the state's bytes written with writev from tensor memory, fsync, dir fsyncs.
    Its loads are the read limits: readv into fresh memory, and readv straight into the live tensors."""

    name = "limit: write+fsync"
    group = "limit"
    has_load = True
    has_load_into = True

    def save(self, wl: Workload, path: str) -> tuple[float, float]:
        views = byte_views(wl.flat_tensors())
        start = time.perf_counter()
        os.mkdir(path)
        fd = os.open(os.path.join(path, "raw.bin"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            write_all(fd, views)
            os.fsync(fd)
        finally:
            os.close(fd)
        make_durable_dir(path)
        t = time.perf_counter() - start
        return t, t

    def load(self, wl: Workload, path: str) -> float:
        file = os.path.join(path, "raw.bin")

        def run() -> None:
            dest = torch.empty(os.path.getsize(file), dtype=torch.uint8)
            fd = os.open(file, os.O_RDONLY)
            try:
                read_all(fd, byte_views([dest]))
            finally:
                os.close(fd)

        return _timed(run)

    def load_into(self, wl: Workload, path: str) -> float:
        file = os.path.join(path, "raw.bin")

        def run() -> None:
            fd = os.open(file, os.O_RDONLY)
            try:
                read_all(fd, byte_views(wl.flat_tensors()))
            finally:
                os.close(fd)

        return _timed_into(wl, run)


class SavegameFilesLimit(Contender):
    """The I/O floor of savegame's own layout: the files a savegame save of the workload writes (one tensor
    file per item plus the manifest, same names and sizes, filled with other bytes), committed with the
    same system calls and no Python work in between: staging directory, every file written, the data
    files fsynced on worker threads while the manifest is fsynced, the staging directory fsynced, renamed,
    the parent fsynced. What savegame's save costs above this is its CPU work (encoding, headers, hashes,
    the manifest). Small workloads only (it holds the files' bytes in memory).

    Its load into the model is the read floor of the same layout: every file opened, the kernel asked to
    read them all ahead (``POSIX_FADV_WILLNEED``, as savegame's reader does) and each read whole into
    memory, with nothing decoded or restored. What savegame's load costs above this is its CPU work."""

    name = "limit: savegame's files, syscalls only"
    group = "limit"
    has_load_into = True
    restores = False
    _MAX_BYTES = 16 << 20

    def __init__(self) -> None:
        self._layout: tuple[str, list[tuple[str, bytes]]] | None = None
        self._pool: Any = None

    def _files(self, wl: Workload, path: str) -> list[tuple[str, bytes]] | None:
        if self._layout is None or self._layout[0] != wl.name:
            import savegame

            if wl.state_bytes > self._MAX_BYTES:
                return None
            probe = f"{path}.probe"
            savegame.save(probe, wl.savegame_state())
            names = sorted(os.listdir(probe), key=lambda n: n == "manifest.json")  # the manifest last
            files = [(n, os.urandom(os.path.getsize(os.path.join(probe, n)))) for n in names]
            import shutil

            shutil.rmtree(probe)
            self._layout = (wl.name, files)
        return self._layout[1]

    def save(self, wl: Workload, path: str) -> tuple[float, float]:
        from concurrent.futures import ThreadPoolExecutor

        files = self._files(wl, path)
        if files is None:
            return float("nan"), float("nan")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(2)

        def fsync_close(fd: int) -> None:
            os.fsync(fd)
            os.close(fd)

        start = time.perf_counter()
        staging = f"{path}.staging"
        os.mkdir(staging)
        fds = []
        for name, data in files:
            fd = os.open(os.path.join(staging, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            fds.append(fd)
        pending = [self._pool.submit(fsync_close, fd) for fd in fds[:-1]]
        fsync_close(fds[-1])
        for f in pending:
            f.result()
        fsync_dir(staging)
        os.rename(staging, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
        t = time.perf_counter() - start
        return t, t

    def load_into(self, wl: Workload, path: str) -> float | None:
        files = self._files(wl, path)
        if files is None or not os.path.isdir(path):
            return float("nan")
        names = [name for name, _ in reversed(files)]  # the manifest first, as savegame reads it

        def run() -> None:
            fds = [os.open(os.path.join(path, name), os.O_RDONLY) for name in names]
            try:
                for fd in fds:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                for fd in fds:
                    while os.read(fd, 1 << 20):
                        pass
            finally:
                for fd in fds:
                    os.close(fd)

        return _timed(run)

    def reset(self) -> None:
        self._layout = None


class Memcpy(Contender):
    """The physical limit of a snapshot: ``torch.clone`` of every tensor (fresh memory)."""

    name = "limit: memcpy (clone)"
    group = "limit"

    def save(self, wl: Workload, path: str) -> tuple[float, float]:
        tensors = wl.flat_tensors()
        start = time.perf_counter()
        copies = [t.clone() for t in tensors]
        t = time.perf_counter() - start
        del copies
        return t, float("nan")


class MemcpyWarm(Contender):
    """A snapshot into preallocated, already touched buffers (what reused staging buffers cost)."""

    name = "limit: memcpy (reused buffers)"
    group = "limit"

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] | None = None

    def save(self, wl: Workload, path: str) -> tuple[float, float]:
        tensors = wl.flat_tensors()
        if self._buffers is None or len(self._buffers) != len(tensors):
            self._buffers = [torch.empty_like(t) for t in tensors]
            for b, t in zip(self._buffers, tensors):
                b.copy_(t)
        start = time.perf_counter()
        for b, t in zip(self._buffers, tensors):
            b.copy_(t)
        t = time.perf_counter() - start
        return t, float("nan")

    def reset(self) -> None:
        self._buffers = None


def all_contenders() -> list[Contender]:
    return [
        SavegameSync(),
        SavegameAsync(),
        TorchSave(),
        SafetensorsSave(),
        SafetensorsAtomic(),
        DCPSave(),
        DCPAsyncSave(),
        RawWrite(),
        SavegameFilesLimit(),
        Memcpy(),
        MemcpyWarm(),
    ]


def by_name(name: str) -> Contender:
    for c in all_contenders():
        if c.name == name or slug(c.name) == name:
            return c
    raise KeyError(name)


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-").replace("--", "-")
