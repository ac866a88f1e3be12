"""Shared math for every PWLU backend: effective bounds, folded tables, gradient epilogue.

A backend kernel only ever sees the *folded* form (SPEC section 5): per channel, ``N + 2``
slopes and intercepts (``y = a[k] * (x - shift) + b[k]``, see :func:`fold_tables`) plus the left bound, the (effective) right bound, ``1 / d`` and ``shift``.
For the backward pass a kernel returns ``dx`` and a per-channel histogram over the
``N + 2`` regions of two sums, ``sum(g)`` and ``sum(g * r)``, where ``r`` is the
well-conditioned local coordinate of the element inside its region (see
:func:`param_grads_from_histogram`). The exact parameter gradients of SPEC section 3 are
then a tiny ``O(C * N)`` epilogue, shared by every backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Minimum width ``B_R - B_L`` enforced by every forward pass. If training (or a user)
#: moves the boundaries closer than this, the effective right boundary becomes
#: ``B_L + MIN_WIDTH`` (the gradient then flows to ``B_L`` only), so ``d > 0`` and the
#: function stays finite and defined.
MIN_WIDTH = 1e-3


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 compute in float32; float32/float64 in their own dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def channel_form(points, left_bound, right_bound, left_slope, right_slope, dtype):
    """Parameters as ``(C, N+1)`` and ``(C,)`` tensors in ``dtype`` (C = 1 layer-wise)."""
    n1 = points.shape[-1]
    return (
        points.to(dtype).reshape(-1, n1),
        *(p.to(dtype).reshape(-1) for p in (left_bound, right_bound, left_slope, right_slope)),
    )


def effective_bounds(
    left_bound: Tensor, right_bound: Tensor, num_intervals: int, min_width: float = MIN_WIDTH
) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(right_eff, width, inv_d)`` with the minimum width applied.

    ``right_eff`` equals ``right_bound`` bit for bit whenever ``right - left >= MIN_WIDTH``.
    Differentiable (used by the reference as well as by the fast path).
    """
    raw = right_bound - left_bound
    # min_width is an argument (not the global) so that TorchScript can compile this
    # not `raw >= min_width`: a NaN range stays NaN (NaN out), it is not floored to a valid one
    ok = ~(raw < min_width)
    width = torch.where(ok, raw, torch.full_like(raw, min_width))
    right_eff = torch.where(ok, right_bound, left_bound + min_width)
    inv_d = num_intervals / width
    return right_eff, width, inv_d


def fold_tables(
    points: Tensor,
    left_bound: Tensor,
    right_bound: Tensor,
    left_slope: Tensor,
    right_slope: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fold the parameters into per-region slope/intercept tables (SPEC section 5).

    In region ``k`` of channel ``c``: ``y = slopes[k] * (x - shift) + intercepts[k]``, where
    ``shift = clamp(0, B_L, B_R)`` is the point of the range nearest 0. This is SPEC
    section 5's ``a * x + b`` with ``b = intercepts[k] - slopes[k] * shift``: identical
    (and exact for ReLU) whenever the range contains 0, and free of the cancellation of
    ``Y_i - B_i * K_i`` when the range lies far from 0 (boundaries realigned to data with a
    large mean). :meth:`pwlu.PWLU.inference_tables` returns the plain SPEC form.

    Args:
        points (Tensor[C, N+1]): y values at the breakpoints.
        left_bound, right_bound, left_slope, right_slope (Tensor[C]): the other parameters.

    Returns:
        ``(slopes, intercepts, left, right_eff, inv_d, shift)``: ``slopes`` and
        ``intercepts`` are ``Tensor[C, N+2]`` (entry 0: ``x < B_L``; entry ``k`` in ``1..N``:
        interval ``k-1``; entry ``N+1``: ``x >= B_R``), the others ``Tensor[C]``.
        Differentiable.
    """
    n = points.shape[-1] - 1
    right_eff, width, inv_d = effective_bounds(left_bound, right_bound, n)
    shift = torch.minimum(torch.maximum(torch.zeros_like(left_bound), left_bound), right_eff)
    steps = torch.arange(n, device=points.device, dtype=points.dtype)
    # K_i = (Y[i+1] - Y[i]) / d for the intervals i = 0 .. N-1
    inner_slopes = (points[..., 1:] - points[..., :-1]) * inv_d.unsqueeze(-1)
    # every intercept is the value of its piece at x = shift; shift - B_i is formed as
    # (shift - B_L) - i * d so that no rounded breakpoint B_i multiplies a steep slope
    to_shift = (shift - left_bound).unsqueeze(-1) - steps * (width / n).unsqueeze(-1)
    inner_intercepts = points[..., :-1] + to_shift * inner_slopes
    slopes = torch.cat([left_slope.unsqueeze(-1), inner_slopes, right_slope.unsqueeze(-1)], -1)
    intercepts = torch.cat(
        [
            (points[..., 0] + (shift - left_bound) * left_slope).unsqueeze(-1),
            inner_intercepts,
            (points[..., -1] + (shift - right_eff) * right_slope).unsqueeze(-1),
        ],
        -1,
    )
    return slopes, intercepts, left_bound, right_eff, inv_d, shift


def param_grads_from_histogram(
    hist: Tensor,
    points: Tensor,
    left_bound: Tensor,
    right_bound: Tensor,
    left_slope: Tensor,
    right_slope: Tensor,
    slopes: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Exact parameter gradients (SPEC section 3, Table 1) from per-region sums.

    Args:
        hist (Tensor[C, N+2, 2]): ``hist[c, k, 0] = sum(g)`` and ``hist[c, k, 1] = sum(g * r)``
            over the elements of channel ``c`` in region ``k``, where ``r = x - B_L`` in
            region 0, ``r = x - B_R`` in region ``N+1`` and ``r = t`` (the position inside
            the interval, ``u - i``) in the inner regions.
        points, left_bound, right_bound, left_slope, right_slope: channel-form parameters
            (``Tensor[C, N+1]`` and ``Tensor[C]``) in the compute dtype.
        slopes (Tensor[C, N+2]): the folded slope table.

    Returns:
        ``(d_points, d_left_bound, d_right_bound, d_left_slope, d_right_slope)``.
    """
    n = points.shape[-1] - 1
    sum_g, sum_r = hist[..., 0], hist[..., 1]
    inner_g = sum_g[:, 1 : n + 1]
    inner_t = sum_r[:, 1 : n + 1]
    # dY[i] += sum g (1 - t) over interval i; dY[i+1] += sum g t; outer regions add sum g
    d_points = torch.zeros_like(points)
    d_points[:, :n] += inner_g - inner_t
    d_points[:, 1:] += inner_t
    d_points[:, 0] += sum_g[:, 0]
    d_points[:, n] += sum_g[:, n + 1]
    d_left_slope = sum_r[:, 0]  # sum g (x - B_L) over x < B_L
    d_right_slope = sum_r[:, n + 1]  # sum g (x - B_R) over x >= B_R
    # sum over interval i of g * u / N, with u = i + t
    idx = torch.arange(n, device=points.device, dtype=points.dtype)
    sum_gu_over_n = (idx * inner_g + inner_t) / n
    k_inner = slopes[:, 1 : n + 1]
    # dB_L = -K_L sum_left g - sum_i K_i sum g (1 - u/N);  dB_R = -K_R sum_right g - sum_i K_i sum g u/N
    d_left = -left_slope * sum_g[:, 0] - (k_inner * (inner_g - sum_gu_over_n)).sum(-1)
    d_right_eff = -right_slope * sum_g[:, n + 1] - (k_inner * sum_gu_over_n).sum(-1)
    clamped = (right_bound - left_bound) < MIN_WIDTH
    d_left = d_left + torch.where(clamped, d_right_eff, torch.zeros_like(d_right_eff))
    d_right = torch.where(clamped, torch.zeros_like(d_right_eff), d_right_eff)
    return d_points, d_left, d_right, d_left_slope, d_right_slope
