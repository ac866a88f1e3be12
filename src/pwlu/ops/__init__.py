"""Kernels, the reference and the custom op. Knows nothing of modules."""

from .common import MIN_WIDTH, fold_tables
from .dispatch import get_backend_name, use_backend
from .pwlu_op import pwlu_op
from .reference import pwlu_reference

__all__ = ["MIN_WIDTH", "fold_tables", "get_backend_name", "pwlu_op", "pwlu_reference", "use_backend"]
