"""Peak RSS growth of one upload, measured in a fresh process (run by test_remote_memory.py).

``python _rss_upload.py URL OPTIONS_JSON MIB`` builds a torch state of MIB MiB, imports and warms up
everything (one tiny save to the same root), then resets the kernel's high-water mark
(``/proc/self/clear_refs`` <- 5), saves the state to URL and prints one JSON line with the state size,
the baseline RSS and the peak RSS (``VmHWM``; a psutil sampling thread where that is unavailable).
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import time


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def main() -> None:
    url, options_json, mib = sys.argv[1], sys.argv[2], int(sys.argv[3])
    options = json.loads(options_json)
    import psutil
    import torch

    import savegame

    n = mib << 20
    # a model-like state: a few large tensors and many small ones
    state = {
        "model": {f"layer{i}.weight": torch.rand(n // 16 // 4) for i in range(12)},
        "optimizer": {"exp_avg": torch.rand(n // 4 // 4), "step": torch.tensor(3.0)},
        "epoch": 1,
    }
    state_bytes = sum(t.numel() * t.element_size() for item in ("model", "optimizer") for t in state[item].values())
    savegame.save(url + "-warmup", {"x": torch.ones(10)}, storage_options=options)
    gc.collect()
    proc = psutil.Process()
    baseline = proc.memory_info().rss
    peak = baseline
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM"
    except OSError:
        method = "psutil"
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    savegame.save(url, state, storage_options=options)
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    if method == "VmHWM":
        peak = max(peak, (_status_kib("VmHWM") or 0) * 1024)
    print(json.dumps({"state_bytes": state_bytes, "baseline": baseline, "peak": peak, "method": method,
                      "seconds": seconds}))


if __name__ == "__main__":
    main()
