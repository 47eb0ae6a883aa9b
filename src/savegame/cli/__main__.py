"""``python -m savegame.cli``: the same as the ``savegame`` command."""

import sys

from savegame.cli.app import main

sys.exit(main())
