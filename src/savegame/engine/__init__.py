"""Live objects <-> checkpoint files (layer ``engine``): capture and encoding, **the one write loop**
used by sync, background and per-rank saves (``write_loop``), snapshot-then-persist (``background``),
**the one verifier** (``verifier``) and the local-first mirror. Internal: use ``savegame.save`` /
``savegame.load`` / ``savegame.verify``."""
