"""The 2-D PWLU op (SPEC section 10): forward and backward through the selected backend
(:data:`pwlu.ops.dispatch.PWLU2D_BACKENDS`), registered through :class:`DifferentiableOp` for
eager autograd (:data:`PWLU2DFunction`) and as the custom op ``torch.ops.pwlu.pwlu2d``.

Autograd saves only the two inputs and the nine parameters; the first-order backward reads
``x``, ``y`` and ``g`` once, writes ``dx`` and ``dy``, and gets the parameter gradients from
per-triangle histograms (:mod:`pwlu.ops.pwlu2d_grads`). Higher-order, forward-mode and
``torch.func`` derivatives are those of the reference (:func:`pwlu2d_composite`).
"""

from __future__ import annotations

from torch import Tensor

from .dispatch import PWLU2D_BACKENDS
from .folding import compute_dtype
from .pwlu2d_grads import pwlu2d_geometry, pwlu2d_param_grads
from .pwlu2d_reference import PWLU2D_PARAMETER_NAMES, pwlu2d_composite
from .registration import DifferentiableOp

__all__ = ["PWLU2DFunction", "pwlu2d_bwd", "pwlu2d_differentiable", "pwlu2d_fwd", "pwlu2d_op"]


def pwlu2d_fwd(x: Tensor, y: Tensor, *args) -> Tensor:
    """``pwlu2d_fwd(x, y, *nine_params, channel_dim)``: the selected backend's forward (no
    autograd; arguments validated, ``channel_dim`` normalised or ``None``)."""
    *params, channel_dim = args
    backend = PWLU2D_BACKENDS.select(x.device)  # first: selecting the C backend loads its library
    values, geometry = pwlu2d_geometry(tuple(params), compute_dtype(x.dtype))
    return backend.forward(x, y, values, geometry, channel_dim)


def pwlu2d_bwd(grad: Tensor, x: Tensor, y: Tensor, *args) -> tuple[Tensor, ...]:
    """``(dx, dy, d_values, d_x_left_bound, ..., d_y_right_slope)``: the backend's ``dx``,
    ``dy`` and histograms, then the exact parameter gradients."""
    *params, channel_dim = args
    backend = PWLU2D_BACKENDS.select(x.device)
    values, geometry = pwlu2d_geometry(tuple(params), compute_dtype(x.dtype))
    dx, dy, hist, sums = backend.backward(grad, x, y, values, geometry, channel_dim)
    return (dx, dy, *pwlu2d_param_grads(hist, sums, geometry, tuple(params)))


pwlu2d_differentiable = DifferentiableOp(
    "pwlu::pwlu2d",
    pwlu2d_fwd,
    pwlu2d_bwd,
    pwlu2d_composite,
    tensor_names=("x", "y", *PWLU2D_PARAMETER_NAMES),
    static_schema="int? channel_dim",
    function_name="PWLU2DFunction",
)
#: The custom op ``torch.ops.pwlu.pwlu2d`` (what ``torch.compile`` and ``torch.export`` see).
pwlu2d_op = pwlu2d_differentiable.op
#: The eager ``torch.autograd.Function``.
PWLU2DFunction = pwlu2d_differentiable.function
