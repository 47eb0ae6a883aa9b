"""The savegame benchmark (issue 5): ``python -m bench [--quick] [--workloads ...] [--reps N] [--out DIR]``."""
