"""Peak RSS of saves: ``python -m bench.rss WORKLOAD DIR CONTENDER...``.

A fresh process builds the workload once and imports every library up front; each contender's save
(until durable) then runs in its own freshly forked child, which measures the resident-set growth it
causes. Preferred method: reset the kernel's high-water mark
(``/proc/self/clear_refs`` <- 5) and read ``VmHWM`` afterwards (exact, no sampling). Fallback: a psutil
sampling thread (1 ms) plus ``getrusage`` max RSS. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import threading
import time
from typing import Any


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)


def current_rss() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return int(psutil.Process().memory_info().rss)


def _measure_child(wl: Any, contender: str, path: str) -> dict[str, object]:
    from .contenders import by_name

    c = by_name(contender)
    gc.collect()
    baseline = current_rss()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if _reset_hwm() and _status_kib("VmHWM") is not None:
        method = "VmHWM after clear_refs"
        c.save(wl, path)
        peak = (_status_kib("VmHWM") or 0) * 1024
    else:
        method = "psutil sampling (1 ms) + getrusage"
        sampler = _Sampler()
        sampler.start()
        c.save(wl, path)
        sampler.stop.set()
        sampler.join()
        maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = max(sampler.peak, maxrss_after if maxrss_after > maxrss_before else 0)
    state_bytes = wl.state_bytes
    extra = max(0, peak - baseline)
    return {
        "workload": wl.name,
        "contender": c.name,
        "state_bytes": state_bytes,
        "baseline_rss": baseline,
        "peak_rss": peak,
        "extra_bytes": extra,
        "ratio": (state_bytes + extra) / state_bytes if state_bytes else None,
        "method": method + (", fresh forked process per save" if hasattr(os, "fork") else ""),
    }


def measure(
    workload: str, contenders: list[str], directory: str, *, quick: bool, scale: float
) -> list[dict[str, object]]:
    """Build ``workload`` once, then run each contender's save in a fresh forked child (clean allocator,
    nothing freed before it) and report its peak RSS growth."""
    import torch

    torch.set_num_threads(1)  # no OpenMP team in the parent: forked children stay safe to use torch
    import safetensors.torch  # noqa: F401
    import torch.distributed.checkpoint

    import savegame
    import savegame.engine.background

    from .workloads import build

    wl = build(workload, quick=quick, scale=scale)
    savegame.save(os.path.join(directory, "warmup"), {"x": torch.zeros(4)})  # import the lazy modules
    gc.collect()
    results: list[dict[str, object]] = []
    for i, name in enumerate(contenders):
        path = os.path.join(directory, f"rss-{i}")
        if not hasattr(os, "fork"):
            results.append(_measure_child(wl, name, path))
            continue
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                os.close(r)
                out = json.dumps(_measure_child(wl, name, path)).encode()
            except BaseException as exc:
                out = json.dumps({"contender": name, "error": f"{exc.__class__.__name__}: {exc}"}).encode()
                code = 1
            with os.fdopen(w, "wb") as f:
                f.write(out)
            os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            raw = f.read()
        os.waitpid(pid, 0)
        try:
            results.append(json.loads(raw))
        except ValueError:
            results.append({"contender": name, "error": "child died without a result"})
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.rss")
    ap.add_argument("workload")
    ap.add_argument("directory")
    ap.add_argument("contenders", nargs="+")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--scale", type=float, default=1.0)
    args = ap.parse_args(argv)
    results = measure(args.workload, args.contenders, args.directory, quick=args.quick, scale=args.scale)
    sys.stdout.write(json.dumps(results) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
