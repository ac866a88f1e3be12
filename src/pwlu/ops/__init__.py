"""Kernels, the reference and the custom op. Knows nothing of modules.

Layers, bottom up: ``reference`` (SPEC in plain torch), ``folding`` (tables and the gradient
epilogue shared by every backend), ``validation``, ``folded`` (the exportable folded forward),
the backends (``torch_backend``, ``cpu/``, ``triton_backend``) chosen by ``dispatch``, and
``autograd`` (the op registered through ``registration``).
"""

from .autograd import pwlu_op
from .dispatch import get_backend_name, use_backend
from .folding import MIN_WIDTH, fold_tables
from .reference import pwlu_reference

__all__ = ["MIN_WIDTH", "fold_tables", "get_backend_name", "pwlu_op", "pwlu_reference", "use_backend"]
