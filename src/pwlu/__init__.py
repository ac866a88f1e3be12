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
