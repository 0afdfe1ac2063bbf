"""``python -m fluxmini.cli``: the ``fluxmini`` command."""

import sys

from . import main

sys.exit(main())
