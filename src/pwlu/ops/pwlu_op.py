"""PWLU forward/backward implementations, the eager autograd Function and the custom op
(``torch.ops.pwlu.pwlu``) with fake kernels.

Registered with ``torch.library`` so that ``torch.compile(fullgraph=True)`` sees one opaque
op. Autograd saves only the input and the five parameter tensors; the backward recomputes
regions from them (no per-element index or fraction tensors are kept).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch
from .common import channel_form, compute_dtype, fold_tables, param_grads_from_histogram


def _fold(backend):
    """The backend's own folding if it has one (the CPU kernel folds in C), else the torch one."""
    return getattr(backend, "fold_tables", fold_tables)


def forward_impl(x, points, left_bound, right_bound, left_slope, right_slope, channel_dim):
    """Fold the parameters and run the selected backend's forward (no autograd)."""
    backend = dispatch.select(x.device)
    fused = getattr(backend, "forward_from_params", None)
    if fused is not None:  # the backend folds and runs in one native call
        y = fused(x, points, left_bound, right_bound, left_slope, right_slope, channel_dim)
        if y is not None:
            return y
    params = channel_form(points, left_bound, right_bound, left_slope, right_slope, compute_dtype(x.dtype))
    slopes, intercepts, left, right, inv_d, shift = _fold(backend)(*params)
    return backend.forward(x, slopes, intercepts, left, right, inv_d, channel_dim, shift)


def backward_impl(grad, x, points, left_bound, right_bound, left_slope, right_slope, channel_dim):
    """``(dx, d_points, d_left_bound, d_right_bound, d_left_slope, d_right_slope)``: backend
    ``dx`` and per-region histograms, then the exact parameter gradients (SPEC section 3)."""
    originals = (points, left_bound, right_bound, left_slope, right_slope)
    backend = dispatch.select(x.device)
    fused = getattr(backend, "backward_from_params", None)
    if fused is not None:  # fold, kernel and gradient epilogue in one native call
        res = fused(grad, x, *originals, channel_dim)
        if res is not None:
            return (res[0], *res[1])
    params = channel_form(*originals, compute_dtype(x.dtype))
    slopes, _, left, right, inv_d, _ = _fold(backend)(*params)
    dx, hist = backend.backward(grad, x, slopes, left, right, inv_d, channel_dim)
    grads = param_grads_from_histogram(hist, *params, slopes)
    # copy=True: the small gradients are views of one histogram and must not alias each other
    return (dx, *(g.reshape(p.shape).to(p.dtype, copy=True) for g, p in zip(grads, originals)))


def inference_plan(x, points, left_bound, right_bound, left_slope, right_slope, channel_dim):
    """A prepared gradient-free forward for repeated calls with this input geometry (see
    :class:`pwlu.ops.cpu.plan.InferencePlan`), from the selected backend; ``None`` where the
    backend has none. Call it as ``plan(x, params, dispatch.get_backend_name())``."""
    name = dispatch.get_backend_name()
    make = getattr(dispatch.select(x.device), "inference_plan", None)
    if make is None or name == "reference":
        return None
    return make(x, points, left_bound, right_bound, left_slope, right_slope, channel_dim, name)


class PWLUFunction(torch.autograd.Function):
    """Eager autograd for PWLU: saves only x and the five parameters (no per-element state)."""

    @staticmethod
    def forward(ctx, x, points, left_bound, right_bound, left_slope, right_slope, channel_dim):
        ctx.save_for_backward(x, points, left_bound, right_bound, left_slope, right_slope)
        ctx.channel_dim = channel_dim
        return forward_impl(x, points, left_bound, right_bound, left_slope, right_slope, channel_dim)

    @staticmethod
    def backward(ctx, grad):
        return (*backward_impl(grad, *ctx.saved_tensors, ctx.channel_dim), None)


def pwlu_apply(x, points, left_bound, right_bound, left_slope, right_slope, channel_dim):
    """The one entry point: the custom op under ``torch.compile``/``torch.export`` (an opaque
    graph node), the autograd Function when a gradient is needed, else the plain forward.

    All three run the same ``forward_impl``/``backward_impl``; the eager routes skip the
    custom-op dispatcher, whose Python overhead (~0.15 ms a call) dominates small tensors.
    """
    args = (x, points, left_bound, right_bound, left_slope, right_slope, channel_dim)
    if torch.compiler.is_compiling():
        return pwlu_op(*args)
    if torch.is_grad_enabled() and any(t.requires_grad for t in args[:6]):
        return PWLUFunction.apply(*args)
    return forward_impl(*args)


@torch.library.custom_op("pwlu::pwlu", mutates_args=())
def pwlu_op(
    x: Tensor,
    points: Tensor,
    left_bound: Tensor,
    right_bound: Tensor,
    left_slope: Tensor,
    right_slope: Tensor,
    channel_dim: int | None,
) -> Tensor:
    return forward_impl(x, points, left_bound, right_bound, left_slope, right_slope, channel_dim)


@pwlu_op.register_fake
def _(x, points, left_bound, right_bound, left_slope, right_slope, channel_dim):
    return torch.empty_like(x)


@torch.library.custom_op("pwlu::pwlu_backward", mutates_args=())
def pwlu_backward_op(
    grad: Tensor,
    x: Tensor,
    points: Tensor,
    left_bound: Tensor,
    right_bound: Tensor,
    left_slope: Tensor,
    right_slope: Tensor,
    channel_dim: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return backward_impl(grad, x, points, left_bound, right_bound, left_slope, right_slope, channel_dim)


@pwlu_backward_op.register_fake
def _(grad, x, points, left_bound, right_bound, left_slope, right_slope, channel_dim):
    return (
        torch.empty_like(x),
        *(torch.empty_like(p) for p in (points, left_bound, right_bound, left_slope, right_slope)),
    )


def _setup_context(ctx, inputs, output):
    x, points, left_bound, right_bound, left_slope, right_slope, channel_dim = inputs
    ctx.save_for_backward(x, points, left_bound, right_bound, left_slope, right_slope)
    ctx.channel_dim = channel_dim


def _backward(ctx, grad):
    grads = pwlu_backward_op(grad, *ctx.saved_tensors, ctx.channel_dim)
    return (*grads, None)


pwlu_op.register_autograd(_backward, setup_context=_setup_context)
