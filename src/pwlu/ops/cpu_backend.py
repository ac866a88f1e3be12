"""Kept for pickles only: modules saved with ``torch.save(model)`` by pwlu 0.1 (before the CPU
backend became the package :mod:`pwlu.ops.cpu`) refer to ``_no_plan`` here. Nothing imports
this module."""


def _no_plan() -> None:
    """What an old module's pickled inference plan unpickles to (none: plans are rebuilt)."""
    return None
