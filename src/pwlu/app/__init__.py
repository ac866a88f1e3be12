"""The pwlu command-line application: the ``pwlu`` console script and ``python -m pwlu``.

Training recipe (:mod:`.train`, :mod:`.config`), datasets (:mod:`.data`), small models
(:mod:`.models`), figures (:mod:`.plotting`), the demo (:mod:`.demo`) and rebuilding a model
from a training checkpoint (:mod:`.checkpoint`). It uses the library only through its public
API and needs the ``app`` extra (``pip install 'pwlu[app]'``); the library never imports it.
This package imports nothing itself, so :mod:`.launcher` can check the extra first.
"""
