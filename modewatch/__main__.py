"""``python -m modewatch``: the same as the ``modewatch`` command."""

import sys

from .cli import main

sys.exit(main())
