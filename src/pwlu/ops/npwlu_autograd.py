"""The N-PWLU op (SPEC section 9): forward and backward through the selected backend, registered
for eager autograd (:data:`NPWLUFunction`) and as the custom op ``torch.ops.pwlu.npwlu``
(:data:`npwlu_op`) by the same :class:`~pwlu.ops.registration.DifferentiableOp` as PWLU.

:func:`npwlu_fwd` / :func:`npwlu_bwd` compute (no autograd, validated arguments);
:data:`npwlu_differentiable` routes a call; :func:`npwlu_call` is what :func:`pwlu.npwlu` runs.
Autograd saves only the input and the six parameter tensors; the backward recomputes the
regions. Second-order, forward-mode and ``torch.func`` derivatives are those of
:func:`npwlu_reference` (:func:`npwlu_composite`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch, plans
from .folding import compute_dtype
from .npwlu_backends import NPWLU_BACKENDS
from .npwlu_folding import npwlu_channel_form, npwlu_fold_tables, npwlu_param_grads_from_histogram
from .npwlu_reference import check_npwlu_params, npwlu_reference
from .registration import DifferentiableOp

__all__ = [
    "NPWLUFunction",
    "npwlu_bwd",
    "npwlu_call",
    "npwlu_composite",
    "npwlu_differentiable",
    "npwlu_fwd",
    "npwlu_op",
]


def _tables(backend, params):
    fold = getattr(backend, "fold", None) or npwlu_fold_tables
    with torch.no_grad():
        return fold(*params)


def npwlu_fwd(
    x: Tensor,
    points: Tensor,
    width_logits: Tensor,
    left_bound: Tensor,
    right_bound: Tensor,
    left_slope: Tensor,
    right_slope: Tensor,
    channel_dim: int | None,
) -> Tensor:
    """Fold the parameters and run the selected backend's forward (no autograd)."""
    backend = NPWLU_BACKENDS.select(x.device)
    fused = getattr(backend, "forward_from_params", None)
    if fused is not None:  # fold in native code around the kernel
        y = fused(x, points, width_logits, left_bound, right_bound, left_slope, right_slope, channel_dim)
        if y is not None:
            return y
    params = npwlu_channel_form(
        points, width_logits, left_bound, right_bound, left_slope, right_slope, compute_dtype(x.dtype)
    )
    slopes, intercepts, breakpoints, _, shift = _tables(backend, params)
    return backend.forward(x, slopes, intercepts, breakpoints, shift, channel_dim)


def npwlu_bwd(
    grad: Tensor,
    x: Tensor,
    points: Tensor,
    width_logits: Tensor,
    left_bound: Tensor,
    right_bound: Tensor,
    left_slope: Tensor,
    right_slope: Tensor,
    channel_dim: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, d_points, d_width_logits, d_left_bound, d_right_bound, d_left_slope, d_right_slope)``:
    the backend's ``dx`` and per-region histogram, then the exact parameter gradients."""
    originals = (points, width_logits, left_bound, right_bound, left_slope, right_slope)
    backend = NPWLU_BACKENDS.select(x.device)
    fused = getattr(backend, "backward_from_params", None)
    if fused is not None:  # fold, kernel and gradient epilogue in native code
        res = fused(grad, x, *originals, channel_dim)
        if res is not None:
            return (res[0], *res[1])
    params = npwlu_channel_form(*originals, compute_dtype(x.dtype))
    slopes, _, breakpoints, inv_widths, _ = _tables(backend, params)
    dx, hist = backend.backward(grad, x, slopes, breakpoints, inv_widths, channel_dim)
    grads = npwlu_param_grads_from_histogram(hist, *params, breakpoints)
    # copy=True: the small gradients are views of one histogram and must not alias each other
    return (dx, *(g.reshape(p.shape).to(p.dtype, copy=True) for g, p in zip(grads, originals)))


def npwlu_composite(
    x: Tensor,
    points: Tensor,
    width_logits: Tensor,
    left_bound: Tensor,
    right_bound: Tensor,
    left_slope: Tensor,
    right_slope: Tensor,
    channel_dim: int | None,
) -> Tensor:
    """:func:`npwlu_reference` with :func:`npwlu_fwd`'s arguments (for higher-order derivatives)."""
    return npwlu_reference(
        x, points, width_logits, left_bound, right_bound, left_slope, right_slope,
        0 if channel_dim is None else channel_dim,
    )  # fmt: skip


npwlu_differentiable = DifferentiableOp(
    "pwlu::npwlu",
    npwlu_fwd,
    npwlu_bwd,
    npwlu_composite,
    tensor_names=("x", "points", "width_logits", "left_bound", "right_bound", "left_slope", "right_slope"),
    static_schema="int? channel_dim",
    function_name="NPWLUFunction",
)
#: The custom op ``torch.ops.pwlu.npwlu`` (what ``torch.compile`` and ``torch.export`` see).
npwlu_op = npwlu_differentiable.op
#: The eager ``torch.autograd.Function``.
NPWLUFunction = npwlu_differentiable.function


def npwlu_call(
    x: Tensor,
    points: Tensor,
    width_logits: Tensor,
    left_bound: Tensor,
    right_bound: Tensor,
    left_slope: Tensor,
    right_slope: Tensor,
    channel_dim: int,
) -> Tensor:
    """Validate, then run the reference (``use_backend("reference")``) or the op; repeated
    gradient-free calls with the same ``nn.Parameter`` tensors and input geometry reuse an
    inference plan where the backend makes one (the CPU kernel's), as :func:`pwlu.pwlu` does."""
    params = (points, width_logits, left_bound, right_bound, left_slope, right_slope)
    setting = dispatch.get_backend_name()
    gradient_free = plans.gradient_free((x, *params))
    if gradient_free:  # a plan made earlier from validated arguments with this key: no checks again
        y = plans.run(x, params, channel_dim, setting)
        if y is not None:
            return y
    cd = check_npwlu_params(x, *params, channel_dim)
    if setting == "reference":
        return npwlu_reference(x, *params, channel_dim)
    if gradient_free:
        make = NPWLU_BACKENDS.select(x.device).make_plan
        if make is not None:
            y = plans.make_and_run(make, x, params, channel_dim, cd, setting)
            if y is not None:
                return y
    return npwlu_differentiable(x, *params, cd)
