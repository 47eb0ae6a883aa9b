"""Runs the benchmark: every workload, every contender interleaved round-robin per repetition."""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from . import contenders as C
from . import finetune, report, trainloop
from .workloads import BUILDERS, LARGE, GiB, build

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(HERE, "results")
METRICS = ("blocking", "durable", "load_cold", "load_warm", "into_cold", "into_warm")
MIN_FREE_DISK = 10 * 10**9


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# Page cache


class Cache:
    """Makes the next read of a checkpoint cold: ``drop`` (global, root only) or ``fadvise`` (per file)."""

    def __init__(self, mode: str) -> None:
        self.requested = mode
        self.mode = mode
        self.check: str | None = None
        if mode == "auto":
            self.mode = "fadvise" if hasattr(os, "posix_fadvise") else "none"
        if self.mode == "drop" and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
            log("cannot write /proc/sys/vm/drop_caches (not root?): using posix_fadvise instead")
            self.mode = "fadvise"

    def evict(self, path: str) -> None:
        files = C.files_under(path)
        if self.mode == "drop":
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        elif self.mode == "fadvise":
            for file in files:
                fd = os.open(file, os.O_RDONLY)
                try:
                    os.fsync(fd)  # dirty pages cannot be dropped
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        if self.check is None and self.mode != "none" and files:
            self.check = _resident_check(files)

    def describe(self) -> str:
        if self.mode == "drop":
            how = "`echo 3 > /proc/sys/vm/drop_caches` (global) before each cold load"
        elif self.mode == "fadvise":
            how = ("`posix_fadvise(POSIX_FADV_DONTNEED)` on every file of the checkpoint (after fsync)"
                   " before each cold load")
        else:
            how = "not dropped: cold loads are warm"
        if self.check:
            how += f"; check: {self.check}"
        return how


def _resident_check(files: list[str]) -> str:
    """How much of the files is still in the page cache (util-linux ``fincore``), if available."""
    fincore = shutil.which("fincore")
    if not fincore:
        return "not verified (no fincore)"
    try:
        out = subprocess.run(
            [fincore, "--bytes", "--noheadings", "--output", "RES,SIZE", *files],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.split()
        res = sum(int(x) for x in out[0::2])
        size = sum(int(x) for x in out[1::2])
        return f"fincore: {res} of {size} bytes resident after eviction"
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return f"not verified ({exc.__class__.__name__})"


# ---------------------------------------------------------------------------------------------------
# Environment


def machine_info(tmp: str) -> dict[str, Any]:
    import numpy
    import torch

    import savegame

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default: active)"),
        "loadavg_start": os.getloadavg(),
        "numpy": numpy.__version__,
        "savegame": savegame.__version__,
    }
    try:
        import safetensors

        info["safetensors"] = safetensors.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import psutil

        info["ram_gib"] = round(psutil.virtual_memory().total / GiB, 1)
    except ImportError:
        pass
    try:
        out = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "-T", tmp],
                             capture_output=True, text=True, timeout=10).stdout.split()
        if len(out) >= 2:
            info["filesystem"] = f"{out[1]} on {out[0]}"
            dev = os.path.basename(out[0])
            rot = f"/sys/block/{dev}/queue/rotational"
            if os.path.exists(rot):
                with open(rot) as f:
                    info["rotational"] = f.read().strip() == "1"
                info["disk"] = ("virtio block device " if dev.startswith("vd") else "") + (
                    "(reports rotational)" if info["rotational"] else "(non-rotational)")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no", "src"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if dirty:
            info["git_commit"] += " + uncommitted changes in src/"
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def choose_scale(tmp: str, requested: float, quick: bool) -> tuple[float, str | None]:
    if quick:
        return requested, None
    free = shutil.disk_usage(tmp).free
    if free >= MIN_FREE_DISK:
        return requested, None
    scale = 0.25 if free >= MIN_FREE_DISK / 4 else 0.05
    msg = (f"only {free / 1e9:.1f} GB free on the filesystem of {tmp} (< {MIN_FREE_DISK / 1e9:.0f} GB): "
           f"workloads scaled down to {scale:g}x")
    return min(requested, scale), msg


# ---------------------------------------------------------------------------------------------------
# Measurement


def state_digest(wl: Any) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    for v in C.byte_views(wl.flat_tensors()):
        h.update(v)
    return h.hexdigest()


def zero_state(wl: Any) -> None:
    import torch

    with torch.no_grad():
        for t in wl.flat_tensors():
            t.zero_()


SMALL_STATE_BYTES = 16_000_000
SMALL_REPS_FACTOR = 10
"""Workloads under 16 MB (the 10k-parameter MLP) run 10x the repetitions: each takes milliseconds, and
five samples taken within one second all fall into the same moment of noise on a shared machine."""


def run_workload(
    name: str, contenders: list[C.Contender], *, reps: int, tmp: str, cache: Cache, quick: bool, scale: float,
    rss: str, first: bool = True, rss_all: bool = False,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    wl = build(name, quick=quick, scale=scale)
    digest = state_digest(wl)
    gc.collect()
    gc.freeze()  # the imported libraries' objects: keeps the collections below (outside timings) fast
    log(f"workload {name}: {wl.description}; {wl.state_bytes / 1e6:.1f} MB in {wl.n_tensors} tensors "
        f"(built in {time.perf_counter() - t0:.1f} s)")
    results: dict[str, Any] = {}
    active: list[C.Contender] = []
    for c in contenders:
        reason = c.unavailable()
        entry: dict[str, Any] = {"group": c.group, "samples": {m: [] for m in METRICS}}
        if reason:
            entry["status"] = f"n/a: {reason}"
            log(f"  {c.name}: n/a ({reason})")
        else:
            entry["status"] = "ok"
            active.append(c)
        results[c.name] = entry

    if not quick and wl.state_bytes < SMALL_STATE_BYTES:
        reps *= SMALL_REPS_FACTOR  # milliseconds each: more samples keep a moment of noise out of the median
    for rep in range(reps):
        k = rep % max(1, len(active))
        order = active[k:] + active[:k]  # round-robin, rotated each repetition
        for c in order:
            entry = results[c.name]
            if entry["status"] != "ok":
                continue
            path = os.path.join(tmp, f"{name}-{C.slug(c.name)}-{rep}")
            try:
                _one(c, wl, path, entry, cache, verify=(rep == 0), digest=digest)
            except Exception as exc:  # a failing contender is reported, the others go on
                entry["status"] = f"error: {exc.__class__.__name__}: {str(exc)[:200]}"
                log(f"  {c.name}: {entry['status']}")
                wl = build(name, quick=quick, scale=scale)  # the state may be damaged: rebuild it
            finally:
                shutil.rmtree(path, ignore_errors=True)
        log(f"  {name} rep {rep + 1}/{reps} done ({time.perf_counter() - t0:.0f} s)")

    for c in contenders:
        c.reset()
    entry_meds(results)
    if quick:
        want_rss = first  # --quick: one workload is enough to test the path
    else:
        want_rss = rss_all or name in LARGE
    if rss != "none" and want_rss:
        names = [
            c.name for c in active
            if results[c.name]["status"] == "ok" and c.group != "limit"
            and (rss == "all" or (rss == "savegame" and c.group == "savegame") or c.name == "savegame sync")
        ]
        for r in measure_rss(name, names, tmp, quick=quick, scale=scale):
            if r.get("contender") in results:
                results[str(r["contender"])]["rss"] = r
    log(f"  {name} done in {time.perf_counter() - t0:.0f} s")
    out = {
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "seconds": round(time.perf_counter() - t0, 1),
        "reps": reps,
        "description": wl.description,
        "state_bytes": wl.state_bytes,
        "n_tensors": wl.n_tensors,
        "contenders": results,
    }
    del wl
    gc.unfreeze()
    gc.collect()
    return out


def _one(c: C.Contender, wl: Any, path: str, entry: dict[str, Any], cache: Cache, *, verify: bool,
         digest: str) -> None:
    s = entry["samples"]
    gc.collect()
    os.sync()  # start every timed save on a quiet disk: no writeback or journal commit left by the previous one
    blocking, durable = c.save(wl, path)
    s["blocking"].append(blocking)
    s["durable"].append(durable)
    if os.path.isdir(path):
        entry["bytes_on_disk"] = C.bytes_on_disk(path)
        entry["files"] = len(C.files_under(path))
    if c.has_load:
        cache.evict(path)
        gc.collect()
        s["load_cold"].append(c.load(wl, path))
        gc.collect()
        s["load_warm"].append(c.load(wl, path))
    if c.has_load_into:
        verify = verify and c.restores
        if verify:
            zero_state(wl)
        cache.evict(path)
        gc.collect()
        s["into_cold"].append(c.load_into(wl, path))
        if verify:
            got = state_digest(wl)
            entry["verified"] = got == digest
            if got != digest:
                raise RuntimeError("the state loaded back into the model differs from the state saved")
        gc.collect()
        s["into_warm"].append(c.load_into(wl, path))


def entry_meds(results: dict[str, Any]) -> None:
    for entry in results.values():
        entry["median"] = {
            m: (statistics.median(v) if v and all(x == x for x in v) else None)
            for m, v in entry["samples"].items()
        }


def measure_rss(workload: str, names: list[str], tmp: str, *, quick: bool, scale: float) -> list[dict[str, Any]]:
    """Peak RSS of each contender's save, from a fresh process (see bench/rss.py)."""
    if not names:
        return []
    d = tempfile.mkdtemp(prefix="rss-", dir=tmp)
    cmd = [sys.executable, "-m", "bench.rss", workload, d, *names, "--scale", str(scale)]
    if quick:
        cmd.append("--quick")
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
        if proc.returncode != 0:
            err = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            return [{"contender": n, "error": err} for n in names]
        result: list[dict[str, Any]] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return [{"contender": n, "error": str(exc)} for n in names]
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description="savegame vs peers vs physical limits")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 repetitions (smoke test)")
    ap.add_argument("--workloads", default=",".join(BUILDERS),
                    help=f"comma-separated subset of {','.join(BUILDERS)}")
    ap.add_argument("--contenders", default="",
                    help="comma-separated subset of contender names or slugs (default: all)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 5, 2 with --quick)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="directory for latest.md/.json/.png")
    ap.add_argument("--tmp", default=None,
                    help="directory to write checkpoints in (default: a temp dir under bench/, same fs as /work)")
    ap.add_argument("--cache", choices=("auto", "fadvise", "drop", "none"), default="auto",
                    help="how to make loads cold: fadvise per file (auto), global drop_caches (root), none")
    ap.add_argument("--rss", choices=("all", "savegame", "sync", "none"), default=None,
                    help="peak-RSS subprocesses: all contenders (default), savegame sync+async, savegame sync only"
                    " (default with --quick), none")
    ap.add_argument("--dcp-load", action="store_true",
                    help="also measure dcp.load + load_state_dict (slow, not in the targets)")
    ap.add_argument("--rss-all-workloads", action="store_true",
                    help="peak RSS on every workload (default: the large ones, where the ratio means something)")
    ap.add_argument("--scale", type=float, default=1.0, help="scale the large workloads (1 = issue sizes)")
    ap.add_argument("--trainloop", choices=("on", "off", "only"), default="on",
                    help="the training-loop benchmark (background checkpoint every K steps): on (default), off,"
                    " or only it (no save/load workloads)")
    ap.add_argument("--trainloop-scale", type=float, default=1.0,
                    help="parameters of its GPT-like model relative to the issue's ~27M (width scaled)")
    ap.add_argument("--trainloop-reps", type=int, default=None,
                    help="interleaved blocks per mode (default 3, 1 with --quick)")
    ap.add_argument("--finetune", choices=("on", "off", "only"), default="on",
                    help="the frozen-backbone fine-tune with incremental checkpoints (only: nothing else)")
    ap.add_argument("--finetune-scale", type=float, default=1.0, help="scale of its model (1 = ~27M parameters)")
    ap.add_argument("--finetune-reps", type=int, default=None, help="its repetitions (default 3, 1 with --quick)")
    ap.add_argument("--trainloop-steps", type=int, default=16, help="training steps per block (default 16)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reps = args.reps if args.reps is not None else (2 if args.quick else 5)
    rss = args.rss or ("sync" if args.quick else "all")
    only = args.trainloop == "only" or args.finetune == "only"
    names = [n.strip() for n in args.workloads.split(",") if n.strip()] if not only else []
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; choose from {list(BUILDERS)}")
    contenders = C.all_contenders()
    if args.contenders:
        wanted = {w.strip() for w in args.contenders.split(",") if w.strip()}
        contenders = [c for c in contenders if c.name in wanted or C.slug(c.name) in wanted]
    for c in contenders:
        if args.dcp_load and isinstance(c, C.DCPSave):
            c.has_load_into = True
    base = args.tmp or HERE
    os.makedirs(base, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-bench-", dir=base)
    scale, scale_msg = choose_scale(tmp, args.scale, args.quick)
    if scale_msg:
        log(scale_msg)
    cache = Cache(args.cache)
    start = time.perf_counter()
    data: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {"argv": list(sys.argv[1:] if argv is None else argv),
                   "quick": args.quick, "reps": reps, "scale": scale, "scale_note": scale_msg,
                   "workloads": names, "rss": rss, "tmp_dir": tmp},
        "workloads": {},
    }
    try:
        data["machine"] = machine_info(tmp)
        for i, name in enumerate(names):
            data["workloads"][name] = run_workload(
                name, contenders, reps=reps, tmp=tmp, cache=cache, quick=args.quick, scale=scale, rss=rss,
                first=(i == 0), rss_all=args.rss_all_workloads,
            )
        if args.trainloop != "off" and args.finetune != "only":
            tl_reps = args.trainloop_reps if args.trainloop_reps is not None else (1 if args.quick else 3)
            log(f"trainloop: scale {args.trainloop_scale:g}, {tl_reps} reps of {args.trainloop_steps} steps")
            data["trainloop"] = trainloop.run(
                tmp=tmp, scale=args.trainloop_scale, quick=args.quick, reps=tl_reps, steps=args.trainloop_steps,
                log=log,
            )
        if args.finetune != "off" and args.trainloop != "only":
            ft_reps = args.finetune_reps if args.finetune_reps is not None else (1 if args.quick else 3)
            log(f"finetune: scale {args.finetune_scale:g}, {ft_reps} reps")
            data["finetune"] = finetune.run(tmp=tmp, scale=args.finetune_scale, quick=args.quick, reps=ft_reps,
                                            saves=3 if args.quick else 6, log=log)  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    data["config"]["cache"] = cache.describe()
    data["config"]["cache_mode"] = cache.mode
    data["elapsed_seconds"] = round(time.perf_counter() - start, 1)
    paths = report.write_all(data, args.out)
    log(f"done in {data['elapsed_seconds']:.0f} s: " + ", ".join(paths))
    return 0
