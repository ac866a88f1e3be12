"""``python -m pwlu.app``: the same command line as ``pwlu`` and ``python -m pwlu``."""

import sys

from .launcher import main

sys.exit(main())
