"""pwlu: the Piecewise Linear Unit for PyTorch (https://arxiv.org/abs/2104.03693).

The library needs only torch. The command-line application (training recipe, datasets, small
models, plots, demo) is :mod:`pwlu.app`, which the library never imports.
"""

import warnings

with warnings.catch_warnings():  # torch warns at import when numpy is absent; the library needs no numpy
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch  # noqa: F401

from .baselines import ACTIVATIONS, APL, PAU, FReLU, PReLU, Swish, get_activation
from .convert import ConversionError, convert_activations
from .convert2d import convert_merges
from .distributed import prepare_fully_shard
from .functional import npwlu, npwlu_reference, pwlu, pwlu2d, pwlu2d_reference, pwlu_reference
from .merge import PWLU2D, LazyPWLU2D
from .metrics import boundary_iou, interval_iou
from .modules import PWLU, LazyPWLU, TimmPWLU
from .nonuniform import NPWLU
from .ops import MIN_WIDTH, fold_tables, get_backend_name, use_backend
from .realign import DEFAULT_MIN_WIDTH, fix_init, pwlu_modules, realign_boundaries
from .schedule import BoundaryRealigner, parameter_groups

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "APL",
    "DEFAULT_MIN_WIDTH",
    "MIN_WIDTH",
    "NPWLU",
    "PAU",
    "PWLU",
    "PWLU2D",
    "BoundaryRealigner",
    "ConversionError",
    "FReLU",
    "LazyPWLU",
    "LazyPWLU2D",
    "PReLU",
    "Swish",
    "TimmPWLU",
    "boundary_iou",
    "convert_activations",
    "convert_merges",
    "fix_init",
    "fold_tables",
    "get_activation",
    "get_backend_name",
    "interval_iou",
    "npwlu",
    "npwlu_reference",
    "parameter_groups",
    "prepare_fully_shard",
    "pwlu",
    "pwlu2d",
    "pwlu2d_reference",
    "pwlu_modules",
    "pwlu_reference",
    "realign_boundaries",
    "use_backend",
]
