"""Shared math for every N-PWLU backend (SPEC section 9): folded tables, the exportable folded
forward, and the gradient epilogue. The N-PWLU counterpart of :mod:`pwlu.ops.folding` and
:mod:`pwlu.ops.folded`.

A backend kernel sees, per channel (channel form, compute dtype, ``C = 1`` layer-wise):

* ``slopes``, ``intercepts`` (``Tensor[C, N+2]``): in region ``k``,
  ``y = slopes[k] * (x - shift) + intercepts[k]`` (region 0: ``x < b_0``; ``k`` in ``1..N``:
  interval ``k - 1``; ``N+1``: ``x >= b_N``), as PWLU's :func:`pwlu.ops.fold_tables`;
* ``breakpoints`` (``Tensor[C, N+1]``): ``b_0 = B_L`` .. ``b_N`` = the effective ``B_R``. The
  region of ``x`` is ``0`` if ``x < b_0``, ``N+1`` if ``x >= b_N``, else ``1`` plus the number
  of interior breakpoints ``b_1 .. b_{N-1}`` that are ``<= x`` (NaN: region 1);
* ``inv_widths`` (``Tensor[C, N]``): ``1 / w_j`` of the floored interval widths (backward);
* ``shift`` (``Tensor[C]``): the point of the range nearest 0.

The backward returns ``dx`` and the per-region histogram ``Tensor[C, N+2, 2]`` of ``sum(g)`` and
``sum(g * r)``, ``r = x - B_L`` (left), ``x - B_R`` (right), ``t = (x - b_j) / w_j`` (interval
``j``); :func:`npwlu_param_grads_from_histogram` turns it into the exact gradients of all six
parameters (an ``O(C * N)`` epilogue shared by every backend).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .folded import channel_view
from .folding import MIN_WIDTH
from .npwlu_reference import MIN_INTERVAL_WIDTH, npwlu_breakpoints


def npwlu_channel_form(points, width_logits, left_bound, right_bound, left_slope, right_slope, dtype):
    """Parameters as ``(C, N+1)``, ``(C, N)`` and ``(C,)`` tensors in ``dtype`` (C = 1 layer-wise)."""
    n1 = points.shape[-1]
    return (
        points.to(dtype).reshape(-1, n1),
        width_logits.to(dtype).reshape(-1, n1 - 1),
        *(p.to(dtype).reshape(-1) for p in (left_bound, right_bound, left_slope, right_slope)),
    )


def npwlu_fold_tables(
    points: Tensor,
    width_logits: Tensor,
    left_bound: Tensor,
    right_bound: Tensor,
    left_slope: Tensor,
    right_slope: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fold N-PWLU parameters (channel form) into the kernels' tables (module docstring).

    Args:
        points (Tensor[C, N+1]), width_logits (Tensor[C, N]),
        left_bound, right_bound, left_slope, right_slope (Tensor[C]).

    Returns:
        ``(slopes, intercepts, breakpoints, inv_widths, shift)``: ``Tensor[C, N+2]`` twice,
        ``Tensor[C, N+1]``, ``Tensor[C, N]``, ``Tensor[C]``. Differentiable.
    """
    n = points.shape[-1] - 1
    b, widths, _ = npwlu_breakpoints(width_logits, left_bound, right_bound)
    right_eff = b[:, n]
    shift = torch.minimum(torch.maximum(torch.zeros_like(left_bound), left_bound), right_eff)
    inv_widths = 1.0 / widths
    # K_j = (Y[j+1] - Y[j]) / w_j, and every intercept is its piece's value at x = shift
    inner_slopes = (points[:, 1:] - points[:, :-1]) * inv_widths
    inner_intercepts = points[:, :-1] + (shift.unsqueeze(-1) - b[:, :-1]) * inner_slopes
    slopes = torch.cat([left_slope.unsqueeze(-1), inner_slopes, right_slope.unsqueeze(-1)], -1)
    intercepts = torch.cat(
        [
            (points[:, 0] + (shift - left_bound) * left_slope).unsqueeze(-1),
            inner_intercepts,
            (points[:, n] + (shift - right_eff) * right_slope).unsqueeze(-1),
        ],
        -1,
    )
    return slopes, intercepts, b, inv_widths, shift


def npwlu_regions(x: Tensor, breakpoints: Tensor, channel_dim: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """Region ``k`` in ``0..N+1`` of every element (module docstring), and the outer masks."""
    n = breakpoints.shape[-1] - 1
    view = lambda p: channel_view(p, x.dim(), channel_dim)  # noqa: E731
    is_left = x < view(breakpoints[:, 0])
    is_right = x >= view(breakpoints[:, n])
    k = torch.ones(x.shape, dtype=torch.long, device=x.device)
    for j in range(1, n):  # compare with the N - 1 interior breakpoints
        k = k + (x >= view(breakpoints[:, j])).long()
    k = torch.where(is_left, torch.zeros_like(k), torch.where(is_right, torch.full_like(k, n + 1), k))
    return k, is_left, is_right


def _flat_index(k: Tensor, num_channels: int, width: int, channel_dim: int | None) -> Tensor:
    if channel_dim is None:
        return k
    channel = torch.arange(num_channels, device=k.device)
    return k + channel_view(channel, k.dim(), channel_dim) * width


def npwlu_from_tables(
    x: Tensor, slopes: Tensor, intercepts: Tensor, breakpoints: Tensor, shift: Tensor, channel_dim: int | None
) -> Tensor:
    """N-PWLU from folded tables, in plain exportable torch ops (standard ONNX operators only).

    Args:
        x (Tensor[...]): input, any floating dtype (computed in the tables' dtype).
        slopes, intercepts (Tensor[C, N+2]), breakpoints (Tensor[C, N+1]), shift (Tensor[C]):
            from :func:`npwlu_fold_tables`.
        channel_dim (int, optional): non-negative channel axis; ``None`` layer-wise.

    Returns:
        Tensor: same shape and dtype as ``x``.
    """
    n = slopes.shape[-1] - 2
    xc = x.to(slopes.dtype)
    k, _, _ = npwlu_regions(xc, breakpoints, channel_dim)
    flat = _flat_index(k, slopes.shape[0], n + 2, channel_dim)
    a = slopes.reshape(-1)[flat]
    b = intercepts.reshape(-1)[flat]
    d = xc - channel_view(shift, x.dim(), channel_dim)
    y = torch.addcmul(b, a, d)
    y = torch.where(torch.isinf(d) & (a == 0), b, y)  # a flat piece maps ±inf (x or an overflowing x - shift) to b
    return y.to(x.dtype)


def npwlu_param_grads_from_histogram(
    hist: Tensor,
    points: Tensor,
    width_logits: Tensor,
    left_bound: Tensor,
    right_bound: Tensor,
    left_slope: Tensor,
    right_slope: Tensor,
    breakpoints: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Exact gradients of the six parameters (SPEC section 9) from per-region sums.

    Args:
        hist (Tensor[C, N+2, 2]): ``sum(g)`` and ``sum(g * r)`` per region (module docstring).
        points, width_logits, left_bound, right_bound, left_slope, right_slope: channel form.
        breakpoints (Tensor[C, N+1]): from :func:`npwlu_fold_tables`.

    Returns:
        ``(d_points, d_width_logits, d_left_bound, d_right_bound, d_left_slope, d_right_slope)``.
    """
    n = points.shape[-1] - 1
    sum_g, sum_r = hist[..., 0], hist[..., 1]
    inner_g = sum_g[:, 1 : n + 1]
    inner_t = sum_r[:, 1 : n + 1]
    d_points = torch.zeros_like(points)
    d_points[:, :n] += inner_g - inner_t  # dY[j] += sum g (1 - t)
    d_points[:, 1:] += inner_t  # dY[j+1] += sum g t
    d_points[:, 0] += sum_g[:, 0]
    d_points[:, n] += sum_g[:, n + 1]
    d_left_slope = sum_r[:, 0]  # sum g (x - B_L) over x < B_L
    d_right_slope = sum_r[:, n + 1]  # sum g (x - B_R) over x >= B_R
    # through the breakpoints: dy/db_j = -K_j (1 - t), dy/db_{j+1} = -K_j t (a floored width is a
    # constant: then dy/db_j = -K_j and nothing reaches b_{j+1})
    raw = breakpoints[:, 1:] - breakpoints[:, :-1]
    ok = raw >= MIN_INTERVAL_WIDTH
    widths = torch.where(ok, raw, torch.full_like(raw, MIN_INTERVAL_WIDTH))
    k_inner = (points[:, 1:] - points[:, :-1]) / widths
    zero = torch.zeros_like(inner_t)
    d_b = torch.zeros_like(points)
    d_b[:, :n] -= k_inner * torch.where(ok, inner_g - inner_t, inner_g)
    d_b[:, 1:] -= k_inner * torch.where(ok, inner_t, zero)
    d_b[:, 0] -= left_slope * sum_g[:, 0]
    d_b[:, n] -= right_slope * sum_g[:, n + 1]
    # b_j = B_L + W c_j (0 < j < N), W the effective range, c = cumsum(softmax(theta))
    omega = torch.softmax(width_logits, dim=-1)
    fractions = torch.cumsum(omega[:, :-1], dim=-1)
    d_inner = d_b[:, 1:n]
    d_left = d_b[:, 0] + (d_inner * (1 - fractions)).sum(-1)
    d_right_eff = d_b[:, n] + (d_inner * fractions).sum(-1)
    clamped = (right_bound - left_bound) < MIN_WIDTH
    width = torch.where(clamped, torch.full_like(left_bound, MIN_WIDTH), right_bound - left_bound)
    d_fractions = d_inner * width.unsqueeze(-1)
    # omega_m is in c_j for every j > m: d_omega_m = sum_{j > m} d_c_j; then the softmax's Jacobian
    d_omega = torch.zeros_like(omega)
    d_omega[:, : n - 1] = torch.flip(torch.cumsum(torch.flip(d_fractions, [-1]), -1), [-1])
    d_logits = omega * (d_omega - (omega * d_omega).sum(-1, keepdim=True))
    # a range below MIN_WIDTH: B_R_eff = B_L + MIN_WIDTH, the gradient goes to B_L
    d_left = d_left + torch.where(clamped, d_right_eff, torch.zeros_like(d_right_eff))
    d_right = torch.where(clamped, torch.zeros_like(d_right_eff), d_right_eff)
    return d_points, d_logits, d_left, d_right, d_left_slope, d_right_slope
