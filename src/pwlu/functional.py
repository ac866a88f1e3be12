"""Functional API: :func:`pwlu` (the one door into the kernels) and :func:`pwlu_reference`
(ground truth)."""

from __future__ import annotations

from torch import Tensor

from .ops import dispatch, plans
from .ops.autograd import pwlu_differentiable, pwlu_fwd
from .ops.dispatch import PWLU2D_BACKENDS, PWLU_BACKENDS
from .ops.npwlu_reference import npwlu_reference
from .ops.pwlu2d_autograd import pwlu2d_differentiable
from .ops.pwlu2d_reference import check_pwlu2d_params, pwlu2d_composite, pwlu2d_reference
from .ops.reference import pwlu_reference
from .ops.validation import check_params

__all__ = ["npwlu", "npwlu_reference", "pwlu", "pwlu2d", "pwlu2d_reference", "pwlu_reference"]


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
    the custom op ``torch.ops.pwlu.pwlu``. The backend is chosen in ``pwlu.ops.dispatch`` (see
    :func:`pwlu.use_backend`). Repeated gradient-free calls with the same ``nn.Parameter``
    tensors and input geometry reuse a prepared inference plan where the backend has one
    (the CPU kernel), which is checked against the parameters' current values on every call.

    Args:
        x (Tensor[...]): input, any floating dtype; float16/bfloat16 compute in float32.
        points (Tensor[N+1] or Tensor[C, N+1]): y values at the breakpoints.
        left_bound, right_bound, left_slope, right_slope (Tensor[] or Tensor[C]).
        channel_dim (int): channel axis of x for channel-wise parameters (negative allowed).

    Returns:
        Tensor: same shape and dtype as x.
    """
    params = (points, left_bound, right_bound, left_slope, right_slope)
    setting = dispatch.get_backend_name()
    gradient_free = plans.gradient_free((x, *params))
    if gradient_free:  # a plan made earlier from validated arguments with this key: no checks again
        y = plans.run(x, params, channel_dim, setting)
        if y is not None:
            return y
    cd = check_params(x, *params, channel_dim)
    if setting == "reference":
        return pwlu_reference(x, *params, channel_dim)
    if gradient_free:
        make = PWLU_BACKENDS.select(x.device).make_plan
        if make is not None:
            y = plans.make_and_run(make, x, params, channel_dim, cd, setting)
            if y is not None:
                return y
        return pwlu_fwd(x, *params, cd)
    return pwlu_differentiable(x, *params, cd)


def npwlu(
    x: Tensor,
    points: Tensor,
    width_logits: Tensor,
    left_bound: Tensor,
    right_bound: Tensor,
    left_slope: Tensor,
    right_slope: Tensor,
    channel_dim: int = 1,
) -> Tensor:
    """Non-uniform Piecewise Linear Unit, fast path (same signature and result as
    :func:`npwlu_reference`; SPEC section 9).

    PWLU with learnable interval widths: ``softmax(width_logits)`` are the relative widths of
    the ``N`` intervals between ``left_bound`` and ``right_bound``. The forward is the folded
    form (``N + 2`` slope/intercept pairs, the region found by comparing ``x`` with the ``N - 1``
    interior breakpoints); the backward returns the exact gradients for ``x`` and all six
    parameters from per-region sums and saves only ``x`` and the parameters. Eager calls use a
    ``torch.autograd.Function``; ``torch.compile``/``torch.export`` see the custom op
    ``torch.ops.pwlu.npwlu``. The backend follows :func:`pwlu.use_backend`.

    Args:
        x (Tensor[...]): input, any floating dtype; float16/bfloat16 compute in float32.
        points (Tensor[N+1] or Tensor[C, N+1]): y values at the breakpoints.
        width_logits (Tensor[N] or Tensor[C, N]): interval width logits (zeros: uniform PWLU).
        left_bound, right_bound, left_slope, right_slope (Tensor[] or Tensor[C]).
        channel_dim (int): channel axis of x for channel-wise parameters (negative allowed).

    Returns:
        Tensor: same shape and dtype as x.
    """
    from .ops.npwlu_autograd import npwlu_call

    return npwlu_call(x, points, width_logits, left_bound, right_bound, left_slope, right_slope, channel_dim)


def pwlu2d(
    x: Tensor,
    y: Tensor,
    values: Tensor,
    x_left_bound: Tensor,
    x_right_bound: Tensor,
    y_left_bound: Tensor,
    y_right_bound: Tensor,
    x_left_slope: Tensor,
    x_right_slope: Tensor,
    y_left_slope: Tensor,
    y_right_slope: Tensor,
    channel_dim: int = 1,
) -> Tensor:
    """2-D Piecewise Linear Unit ``z = F(x, y)``, fast path (same signature and result as
    :func:`pwlu2d_reference`, SPEC section 10): a learnable merge of two branches.

    PWLU paper: https://arxiv.org/abs/2104.03693. The backward returns the exact gradients of
    x, y and all nine parameters, saves only x, y and the parameters, reads x, y and the
    incoming gradient once and gets the parameter gradients from per-cell, per-triangle
    histograms (:mod:`pwlu.ops.pwlu2d_grads`). Eager calls use a ``torch.autograd.Function``;
    under ``torch.compile``/``torch.export`` the custom op ``torch.ops.pwlu.pwlu2d``. The
    backend (Triton on CUDA, the compiled C kernel on CPU, vectorised torch otherwise) is
    chosen as for :func:`pwlu` (:func:`pwlu.use_backend`). Repeated gradient-free calls with
    the same ``nn.Parameter`` tensors and input geometry reuse an inference plan (the CPU
    kernel's), checked against the parameters' current values on every call.

    Args:
        x, y (Tensor[...]): the two inputs, same shape and floating dtype.
        values (Tensor[N+1, N+1] or Tensor[C, N+1, N+1]): vertex values.
        x_left_bound, x_right_bound, y_left_bound, y_right_bound (Tensor[] or Tensor[C]).
        x_left_slope, x_right_slope, y_left_slope, y_right_slope (Tensor[] or Tensor[C]).
        channel_dim (int): channel axis of x and y for channel-wise parameters.

    Returns:
        Tensor: same shape and dtype as x.
    """
    params = (
        values,
        x_left_bound,
        x_right_bound,
        y_left_bound,
        y_right_bound,
        x_left_slope,
        x_right_slope,
        y_left_slope,
        y_right_slope,
    )
    setting = dispatch.get_backend_name()
    gradient_free = plans.gradient_free((x, y, *params))
    if gradient_free:  # a plan made earlier from validated arguments with this key: no checks again
        z = plans.run(x, params, channel_dim, setting, y)
        if z is not None:
            return z
    cd = check_pwlu2d_params(x, y, *params, channel_dim=channel_dim)
    if setting == "reference":
        return pwlu2d_composite(x, y, *params, cd)
    if gradient_free:
        make = PWLU2D_BACKENDS.select(x.device).make_plan
        if make is not None:
            z = plans.make_and_run(make, x, params, channel_dim, cd, setting, y)
            if z is not None:
                return z
    return pwlu2d_differentiable(x, y, *params, cd)
