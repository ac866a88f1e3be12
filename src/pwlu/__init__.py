"""pwlu: the Piecewise Linear Unit for PyTorch (https://arxiv.org/abs/2104.03693)."""

from .functional import pwlu, pwlu_reference
from .modules import PWLU
from .ops import MIN_WIDTH, fold_tables, get_backend_name, use_backend

__version__ = "0.1.0"

__all__ = [
    "MIN_WIDTH",
    "PWLU",
    "fold_tables",
    "get_backend_name",
    "pwlu",
    "pwlu_reference",
    "use_backend",
]

from .realign import (  # noqa: E402
    DEFAULT_MIN_WIDTH,
    BoundaryRealigner,
    boundary_iou,
    fix_init,
    interval_iou,
    parameter_groups,
    pwlu_modules,
    realign_boundaries,
)

__all__ += [
    "DEFAULT_MIN_WIDTH",
    "BoundaryRealigner",
    "boundary_iou",
    "fix_init",
    "interval_iou",
    "parameter_groups",
    "pwlu_modules",
    "realign_boundaries",
]
from .baselines import ACTIVATIONS, APL, PAU, FReLU, PReLU, Swish, get_activation  # noqa: E402
from .convert import ConversionError, LazyPWLU, TimmPWLU, convert_activations  # noqa: E402

__all__ += [
    "ACTIVATIONS",
    "APL",
    "ConversionError",
    "FReLU",
    "LazyPWLU",
    "PAU",
    "PReLU",
    "Swish",
    "TimmPWLU",
    "convert_activations",
    "get_activation",
]
