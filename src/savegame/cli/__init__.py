"""The ``savegame`` command (layer ``cli``): ``app`` builds the parser and dispatches; ``read``,
``scan``, ``manage``, ``diff``, ``plot`` and ``demo`` hold the commands; ``common`` and ``output`` the
shared helpers. ``main`` is the console entry point (``savegame = "savegame.cli:main"``)."""

from savegame.cli.app import main

__all__ = ["main"]
