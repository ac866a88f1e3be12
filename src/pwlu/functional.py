"""Functional API: :func:`pwlu` (fast path) and :func:`pwlu_reference` (ground truth)."""

from __future__ import annotations

from torch import Tensor

from .ops import dispatch
from .ops.pwlu_op import pwlu_apply
from .ops.reference import pwlu_reference
from .ops.validation import check_params

__all__ = ["pwlu", "pwlu_reference"]


def pwlu(
    x: Tensor,
    points: Tensor,
    left_bound: Tensor,
    right_bound: Tensor,
    left_slope: Tensor,
    right_slope: Tensor,
    channel_dim: int = 1,
) -> Tensor:
    """Piecewise Linear Unit, fast path (same signature and result as :func:`pwlu_reference`).

    Paper: https://arxiv.org/abs/2104.03693. The forward is the folded one-multiply-add
    form (SPEC section 5); the backward returns the exact gradients of SPEC section 3 for
    x and all five parameters and saves only x and the parameters. Eager calls use a
    ``torch.autograd.Function``; under ``torch.compile``/``torch.export`` the same code runs as
    the custom op ``torch.ops.pwlu.pwlu``. The backend is chosen
    in ``pwlu.ops.dispatch`` (see :func:`pwlu.use_backend`).

    Args:
        x (Tensor[...]): input, any floating dtype; float16/bfloat16 compute in float32.
        points (Tensor[N+1] or Tensor[C, N+1]): y values at the breakpoints.
        left_bound, right_bound, left_slope, right_slope (Tensor[] or Tensor[C]).
        channel_dim (int): channel axis of x for channel-wise parameters (negative allowed).

    Returns:
        Tensor: same shape and dtype as x.
    """
    cd = check_params(x, points, left_bound, right_bound, left_slope, right_slope, channel_dim)
    return pwlu_checked(x, points, left_bound, right_bound, left_slope, right_slope, cd)


def pwlu_checked(
    x: Tensor,
    points: Tensor,
    left_bound: Tensor,
    right_bound: Tensor,
    left_slope: Tensor,
    right_slope: Tensor,
    channel_dim: int | None,
) -> Tensor:
    """:func:`pwlu` after :func:`pwlu.ops.validation.check_params` (internal: ``channel_dim`` is
    its result, non-negative or ``None`` for layer-wise parameters)."""
    if dispatch.get_backend_name() == "reference":
        return pwlu_reference(x, points, left_bound, right_bound, left_slope, right_slope, channel_dim or 0)
    return pwlu_apply(x, points, left_bound, right_bound, left_slope, right_slope, channel_dim)
