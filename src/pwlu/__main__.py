"""``python -m pwlu``: the command-line application (:mod:`pwlu.app`).

Only ``python -m pwlu`` runs this file; the library never imports it. The launcher checks the
app's extra packages before importing any of the app.
"""

import sys

from pwlu.app.launcher import main

sys.exit(main())
