"""One training run (layer ``run``): the Checkpointer (orchestration only) and the collaborators it
wires: ``index`` (the read-only ``RunIndex`` of a run root), ``records``, ``save_naming``, ``saving``,
``retention``, ``resume``, ``preemption``, ``checks``, ``coordination``, ``lock`` and ``signals``.
Internal: the public names are re-exported by ``savegame`` (``Checkpointer``, ``SaveResult``...)."""
