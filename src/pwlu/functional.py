"""Functional API: :func:`pwlu` (the one door into the kernels) and :func:`pwlu_reference`
(ground truth)."""

from __future__ import annotations

import torch
from torch import Tensor

from .ops import dispatch, plans
from .ops.autograd import pwlu_differentiable, pwlu_fwd
from .ops.dispatch import PWLU_BACKENDS
from .ops.reference import pwlu_reference
from .ops.registration import in_transform
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
    compiling = torch.compiler.is_compiling()
    gradient_free = (
        not compiling and not (torch.is_grad_enabled() and _needs_grad(x, params)) and not in_transform()
    )
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


def _needs_grad(x, params) -> bool:
    try:
        return x.requires_grad or any(p.requires_grad for p in params)
    except AttributeError:  # not tensors: validation names the culprit
        return True
