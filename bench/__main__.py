"""``python -m bench`` (``make bench``): savegame against its peers and this machine's physical limits."""

import os

# libgomp's default active spin-wait makes torch's 2-thread copies ~10x slower whenever the CPUs are
# oversubscribed (measured here: 1 GiB of copy_ 2.6 s vs 0.24 s with PASSIVE); it must be set before torch
# loads. Applies to every contender alike; set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .runner import main

raise SystemExit(main())
