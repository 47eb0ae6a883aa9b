"""Dependency-free helpers (layer ``_util``): escaping untrusted text for a terminal, the progress bar,
the lazily started fork-safe thread pools, pausing the garbage collector, process liveness, the snapshot
copy queue. Nothing here imports another savegame module; internal, not a public import path."""
