"""The PWLU op: forward and backward through the selected backend, registered for eager
autograd (:data:`PWLUFunction`) and as the custom op ``torch.ops.pwlu.pwlu`` (:data:`pwlu_op`).

Names by layer: :func:`pwlu_fwd` / :func:`pwlu_bwd` compute (no autograd, arguments as
validated by :func:`pwlu.ops.validation.check_params`); :data:`pwlu_differentiable` routes a call to the
autograd Function, the custom op or the bare forward. The user-facing door is
:func:`pwlu.pwlu`, which validates and then calls these.

Autograd saves only the input and the five parameter tensors; the first-order backward
recomputes the regions from them (no per-element index or fraction tensors are kept).
Second-order, forward-mode and ``torch.func`` derivatives are those of the reference
(:func:`pwlu_composite`), see :mod:`pwlu.ops.registration`.
"""

from __future__ import annotations

from torch import Tensor

from .dispatch import PWLU_BACKENDS
from .folding import channel_form, compute_dtype, fold_tables, param_grads_from_histogram
from .reference import pwlu_reference
from .registration import DifferentiableOp

__all__ = ["PWLUFunction", "pwlu_bwd", "pwlu_composite", "pwlu_differentiable", "pwlu_fwd", "pwlu_op"]


def pwlu_fwd(
    x: Tensor,
    points: Tensor,
    left_bound: Tensor,
    right_bound: Tensor,
    left_slope: Tensor,
    right_slope: Tensor,
    channel_dim: int | None,
) -> Tensor:
    """Fold the parameters and run the selected backend's forward (no autograd)."""
    backend = PWLU_BACKENDS.select(x.device)
    if backend.forward_from_params is not None:  # fold and run in one native call
        y = backend.forward_from_params(x, points, left_bound, right_bound, left_slope, right_slope, channel_dim)
        if y is not None:
            return y
    params = channel_form(points, left_bound, right_bound, left_slope, right_slope, compute_dtype(x.dtype))
    slopes, intercepts, left, right, inv_d, shift = (backend.fold or fold_tables)(*params)
    return backend.forward(x, slopes, intercepts, left, right, inv_d, channel_dim, shift)


def pwlu_bwd(
    grad: Tensor,
    x: Tensor,
    points: Tensor,
    left_bound: Tensor,
    right_bound: Tensor,
    left_slope: Tensor,
    right_slope: Tensor,
    channel_dim: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, d_points, d_left_bound, d_right_bound, d_left_slope, d_right_slope)``: the backend's
    ``dx`` and per-region histograms, then the exact parameter gradients (SPEC section 3)."""
    originals = (points, left_bound, right_bound, left_slope, right_slope)
    backend = PWLU_BACKENDS.select(x.device)
    if backend.backward_from_params is not None:  # fold, kernel and gradient epilogue in one native call
        res = backend.backward_from_params(grad, x, *originals, channel_dim)
        if res is not None:
            return (res[0], *res[1])
    params = channel_form(*originals, compute_dtype(x.dtype))
    slopes, _, left, right, inv_d, _ = (backend.fold or fold_tables)(*params)
    dx, hist = backend.backward(grad, x, slopes, left, right, inv_d, channel_dim)
    grads = param_grads_from_histogram(hist, *params, slopes)
    # copy=True: the small gradients are views of one histogram and must not alias each other
    return (dx, *(g.reshape(p.shape).to(p.dtype, copy=True) for g, p in zip(grads, originals)))


def pwlu_composite(
    x: Tensor,
    points: Tensor,
    left_bound: Tensor,
    right_bound: Tensor,
    left_slope: Tensor,
    right_slope: Tensor,
    channel_dim: int | None,
) -> Tensor:
    """:func:`pwlu_reference` with :func:`pwlu_fwd`'s arguments: what higher-order, forward-mode
    and ``torch.func`` derivatives are taken of."""
    return pwlu_reference(
        x, points, left_bound, right_bound, left_slope, right_slope, 0 if channel_dim is None else channel_dim
    )


pwlu_differentiable = DifferentiableOp(
    "pwlu::pwlu",
    pwlu_fwd,
    pwlu_bwd,
    pwlu_composite,
    tensor_names=("x", "points", "left_bound", "right_bound", "left_slope", "right_slope"),
    static_schema="int? channel_dim",
    function_name="PWLUFunction",
)
#: The custom op ``torch.ops.pwlu.pwlu`` (what ``torch.compile`` and ``torch.export`` see).
pwlu_op = pwlu_differentiable.op
#: The eager ``torch.autograd.Function``.
PWLUFunction = pwlu_differentiable.function
