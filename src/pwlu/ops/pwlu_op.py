"""The PWLU custom op (``torch.ops.pwlu.pwlu``): forward, exact backward, fake kernels.

Registered with ``torch.library`` so that ``torch.compile(fullgraph=True)`` sees one opaque
op. Autograd saves only the input and the five parameter tensors; the backward recomputes
regions from them (no per-element index or fraction tensors are kept).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch
from .common import compute_dtype, fold_tables, param_grads_from_histogram


def _channel_form(points, left_bound, right_bound, left_slope, right_slope, dtype):
    """Parameters as ``(C, N+1)`` and ``(C,)`` tensors in ``dtype`` (C = 1 layer-wise)."""
    n1 = points.shape[-1]
    return (
        points.to(dtype).reshape(-1, n1),
        *(p.to(dtype).reshape(-1) for p in (left_bound, right_bound, left_slope, right_slope)),
    )


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
    params = _channel_form(points, left_bound, right_bound, left_slope, right_slope, compute_dtype(x.dtype))
    slopes, intercepts, left, right, inv_d, shift = fold_tables(*params)
    return dispatch.select(x.device).forward(x, slopes, intercepts, left, right, inv_d, channel_dim, shift)


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
    originals = (points, left_bound, right_bound, left_slope, right_slope)
    params = _channel_form(*originals, compute_dtype(x.dtype))
    slopes, _, left, right, inv_d, _ = fold_tables(*params)
    dx, hist = dispatch.select(x.device).backward(grad, x, slopes, left, right, inv_d, channel_dim)
    grads = param_grads_from_histogram(hist, *params, slopes)
    # copy=True: the small gradients are views of one histogram and must not alias each other
    return (dx, *(g.reshape(p.shape).to(p.dtype, copy=True) for g, p in zip(grads, originals)))


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
