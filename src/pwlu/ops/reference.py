"""The plain-PyTorch reference: SPEC section 2 written out, differentiated by autograd."""

from __future__ import annotations

import torch
from torch import Tensor

from .folding import compute_dtype, effective_bounds
from .validation import check_params


def _channel_view(p: Tensor, ndim: int, channel_dim: int | None) -> Tensor:
    """Reshape a per-channel tensor ``(C, ...)`` so it broadcasts against x."""
    if channel_dim is None:
        return p
    shape = [1] * ndim
    shape[channel_dim] = p.shape[0]
    return p.reshape(shape + list(p.shape[1:]))


def pwlu_reference(
    x: Tensor,
    points: Tensor,
    left_bound: Tensor,
    right_bound: Tensor,
    left_slope: Tensor,
    right_slope: Tensor,
    channel_dim: int = 1,
) -> Tensor:
    """Piecewise Linear Unit, reference implementation (plain differentiable torch ops).

    Paper: https://arxiv.org/abs/2104.03693 (Zhou, Zhu, Zhong, 2021), Eq. 1-4.

    ``N`` uniform intervals of length ``d = (B_R - B_L) / N`` on ``[B_L, B_R]``::

        x <  B_L:            Y[0] + (x - B_L) * K_L
        B_L <= x < B_R:      (1 - t) * Y[i] + t * Y[i+1],  u = (x - B_L) / d, i = floor(u), t = u - i
        x >= B_R:            Y[N] + (x - B_R) * K_R

    Intervals are closed on the left: at a breakpoint exactly the interval to its right is
    used, and ``x = B_R`` belongs to the right outer region. A width ``B_R - B_L`` below
    :data:`pwlu.MIN_WIDTH` is raised to it (the right boundary moves). ±inf inputs map to
    the function's limits; NaN maps to NaN.

    Args:
        x (Tensor[...]): input of any floating dtype (float16/bfloat16 compute in float32).
        points (Tensor[N+1] or Tensor[C, N+1]): y values ``Y_P`` at the ``N+1`` breakpoints.
        left_bound, right_bound (Tensor[] or Tensor[C]): ``B_L`` and ``B_R``.
        left_slope, right_slope (Tensor[] or Tensor[C]): ``K_L`` and ``K_R``.
        channel_dim (int): axis of x holding the ``C`` channels (channel-wise only).

    Returns:
        Tensor: same shape and dtype as x.
    """
    cd = check_params(x, points, left_bound, right_bound, left_slope, right_slope, channel_dim)
    out_dtype = x.dtype
    dt = compute_dtype(x.dtype)
    xc = x.to(dt)
    pts, bl, br, kl, kr = (p.to(dt) for p in (points, left_bound, right_bound, left_slope, right_slope))
    n = pts.shape[-1] - 1
    br, _, inv_d = effective_bounds(bl, br, n)
    view = lambda p: _channel_view(p, x.dim(), cd)  # noqa: E731
    bl_v, br_v, kl_v, kr_v, inv_d_v = (view(p) for p in (bl, br, kl, kr, inv_d))

    is_left = xc < bl_v
    is_right = xc >= br_v
    # Each piece is evaluated only where it is selected and at the boundary elsewhere, so an
    # unselected piece never sees ±inf: its zero gradient stays zero (not 0 * inf = NaN).
    x_inner = torch.where(is_left | is_right, bl_v, xc)
    # nan_one is 1, or NaN for a NaN input: such an element's gradients to the parameters are
    # NaN, as in the kernels (its dx is its interval's slope, as there)
    nan_one = x_inner.detach() * 0 + 1
    u = (x_inner - bl_v * nan_one) * inv_d_v
    # interval index; NaN goes to interval 0 (the output stays NaN through t)
    i = torch.nan_to_num(torch.floor(u.detach()), nan=0.0).clamp(0, n - 1).long()
    t = u - i.to(dt)
    if cd is None:
        y_lo, y_hi = pts[i], pts[i + 1]
    else:
        channel = torch.arange(pts.shape[0], device=x.device)
        base = _channel_view(channel, x.dim(), cd) * (n + 1)
        flat = pts.reshape(-1)
        y_lo, y_hi = flat[base + i], flat[base + i + 1]
    inner = (1 - t) * y_lo + t * y_hi

    def outer(selected: Tensor, y_edge: Tensor, bound: Tensor, slope: Tensor) -> Tensor:
        # y_edge + K (x - B); a flat piece maps ±inf to its constant value (not inf * 0 = NaN)
        return y_edge + _OuterTerm.apply(slope, torch.where(selected, xc, bound) - bound)

    y0 = view(pts[..., 0])
    yn = view(pts[..., n])
    out = torch.where(is_left, outer(is_left, y0, bl_v, kl_v), torch.where(is_right, outer(is_right, yn, br_v, kr_v), inner))
    return out.to(out_dtype)


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    return t.sum_to_size(shape) if t.shape != shape else t


class _OuterTerm(torch.autograd.Function):
    """``K * d`` of an outer piece (``d = x - B``), with the limit of a flat piece: 0 where
    ``K == 0`` and ``d`` is ±inf. Derivatives ``g * d`` and ``g * K`` everywhere, so at an
    infinite input ``dK = g * (x - B)`` is ±inf as in the kernels' histograms, and ``dB`` is
    ``-g * K`` (finite). Plain torch inside; vmap, jvp and higher orders are supported."""

    generate_vmap_rule = True

    @staticmethod
    def forward(slope: Tensor, d: Tensor) -> Tensor:
        return torch.where((slope == 0) & torch.isinf(d), torch.zeros_like(d), slope * d)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        slope, d = ctx.saved_tensors
        return _sum_to(grad * d, slope.shape), _sum_to(grad * slope, d.shape)

    @staticmethod
    def jvp(ctx, slope_t: Tensor | None, d_t: Tensor | None) -> Tensor:
        slope, d = ctx.saved_tensors
        out = torch.zeros_like(d)
        if slope_t is not None:  # a zero tangent on a flat piece at infinity moves nothing
            out = out + torch.where(slope_t == 0, torch.zeros_like(d), slope_t * d)
        if d_t is not None:
            out = out + slope * d_t
        return out
