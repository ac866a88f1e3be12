"""Folded PWLU forward in plain, exportable torch ops (SPEC section 5).

This is the forward of the vectorised torch backend (``torch_backend.forward`` is
:func:`pwlu_from_tables`) and the path a :class:`pwlu.PWLU` takes while it is being
scripted (``torch.jit.script``), traced (``torch.jit.trace``) or exported to ONNX, where
the custom op ``torch.ops.pwlu.pwlu`` and its compiled kernels cannot go. Every function
here is TorchScript-compatible and lowers to standard ONNX operators only (``Sub``,
``Mul``, ``Add``, ``Floor``, ``Clip``/``Max``/``Min``, ``Cast``, ``Less``,
``GreaterOrEqual``, ``Where``, ``Gather``, ``IsInf``, ``IsNaN``, ``Equal``, ``And``,
``Reshape``, ``Concat``...), so an exported model runs in any ONNX runtime.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .folding import compute_dtype, fold_tables


def channel_view(p: Tensor, ndim: int, channel_dim: int | None) -> Tensor:
    """A ``Tensor[C]`` viewed to broadcast against an ``ndim``-D input along ``channel_dim``."""
    if channel_dim is None:
        return p.reshape([])
    shape: list[int] = [1] * ndim
    shape[channel_dim] = p.shape[0]
    return p.reshape(shape)


def regions(
    x: Tensor, left: Tensor, right: Tensor, inv_d: Tensor, n: int, channel_dim: int | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Region index ``k`` in ``0..N+1`` of every element, with the intermediates of the backward.

    Returns ``(k, u, i, is_left, is_right, bl, br)``: ``u = (x - B_L) / d``, ``i`` the interval
    (``clamp(floor(u), 0, N-1)``, 0 for NaN), the two outer masks and the broadcast bounds.
    """
    bl = channel_view(left, x.dim(), channel_dim)
    br = channel_view(right, x.dim(), channel_dim)
    inv = channel_view(inv_d, x.dim(), channel_dim)
    u = (x - bl) * inv
    i = torch.clamp(torch.nan_to_num(torch.floor(u), nan=0.0), 0, n - 1)
    is_left = x < bl
    is_right = x >= br
    inner = i.long() + 1
    k = torch.where(is_left, torch.zeros_like(inner), torch.where(is_right, torch.full_like(inner, n + 1), inner))
    return k, u, i, is_left, is_right, bl, br


def flat_index(k: Tensor, num_channels: int, n: int, channel_dim: int | None) -> Tensor:
    """Index of every element's table entry in the flattened ``Tensor[C * (N+2)]`` tables."""
    if channel_dim is None:
        return k
    channel = torch.arange(num_channels, device=k.device)
    return k + channel_view(channel, k.dim(), channel_dim) * (n + 2)


def pwlu_from_tables(
    x: Tensor,
    slopes: Tensor,
    intercepts: Tensor,
    left: Tensor,
    right: Tensor,
    inv_d: Tensor,
    shift: Tensor,
    channel_dim: int | None,
) -> Tensor:
    """PWLU from folded tables: ``y = slopes[k] * (x - shift) + intercepts[k]`` (SPEC section 5).

    Args:
        x (Tensor[...]): input, any floating dtype (computed in the tables' dtype, returned in
            ``x.dtype``).
        slopes, intercepts (Tensor[C, N+2]): tables from :func:`pwlu.ops.fold_tables`
            (``C = 1`` layer-wise).
        left, right, inv_d, shift (Tensor[C]): ``B_L``, the effective ``B_R``, ``1 / d`` and the
            per-channel shift.
        channel_dim (int, optional): non-negative channel axis of ``x``; ``None`` layer-wise.

    Returns:
        Tensor: same shape and dtype as ``x``. ``±inf`` on a flat piece gives that piece's
        constant value (as does a finite ``x`` whose ``x - shift`` overflows), NaN gives NaN.
    """
    n = slopes.shape[-1] - 2
    xc = x.to(slopes.dtype)
    k, _, _, _, _, _, _ = regions(xc, left, right, inv_d, n, channel_dim)
    flat = flat_index(k, slopes.shape[0], n, channel_dim)
    a = slopes.reshape(-1)[flat]
    b = intercepts.reshape(-1)[flat]
    # one multiply-add (on x - shift; shift is 0 whenever the range contains 0)
    d = xc - channel_view(shift, x.dim(), channel_dim)
    y = torch.addcmul(b, a, d)
    # inf * 0 would be NaN: a flat piece maps ±inf to its constant value, and so a finite x
    # whose x - shift overflows (a range near the dtype's limit, x far on the other side)
    y = torch.where(torch.isinf(d) & (a == 0), b, y)
    return y.to(x.dtype)


def pwlu_folded(
    x: Tensor,
    points: Tensor,
    left_bound: Tensor,
    right_bound: Tensor,
    left_slope: Tensor,
    right_slope: Tensor,
    channel_dim: int | None,
) -> Tensor:
    """PWLU from its parameters through :func:`fold_tables` and :func:`pwlu_from_tables`.

    Same arguments as :func:`pwlu.pwlu`, except that ``channel_dim`` must already be
    non-negative (or ``None`` for layer-wise parameters). Forward only: autograd
    differentiates it, but training should use :func:`pwlu.pwlu` (exact, memory-lean backward).
    """
    dtype = compute_dtype(x.dtype)
    n1 = points.shape[-1]
    tables = fold_tables(
        points.to(dtype).reshape(-1, n1),
        left_bound.to(dtype).reshape(-1),
        right_bound.to(dtype).reshape(-1),
        left_slope.to(dtype).reshape(-1),
        right_slope.to(dtype).reshape(-1),
    )
    slopes, intercepts, left, right, inv_d, shift = tables
    return pwlu_from_tables(x, slopes, intercepts, left, right, inv_d, shift, channel_dim)
