"""2-D PWLU backend in vectorised torch ops: any device, the fallback where no kernel applies.

Same semantics as every 2-D backend (:class:`pwlu.ops.dispatch.PWLU2DBackend`, the packed
geometry and histograms of :mod:`pwlu.ops.pwlu2d_grads`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _view(p: Tensor, ndim: int, channel_dim: int | None) -> Tensor:
    if channel_dim is None:
        return p.reshape([])
    shape = [1] * ndim
    shape[channel_dim] = p.shape[0]
    return p.reshape(shape)


def _locate(a: Tensor, lo: Tensor, hi: Tensor, inv: Tensor, n: int):
    """``(u, i, frac, is_left, is_right)`` of one input (see :mod:`pwlu.ops.pwlu2d_grads`)."""
    is_left = a < lo
    is_right = a >= hi
    u = torch.where(is_left, 0.0, torch.where(is_right, float(n), (a - lo) * inv))
    i = torch.nan_to_num(torch.floor(u), nan=0.0).clamp(0, n - 1)
    return u, i, u - i, is_left, is_right


def _cells(x: Tensor, y: Tensor, values: Tensor, geometry: Tensor, channel_dim: int | None):
    n = values.shape[-1] - 1
    dt = values.dtype
    xc, yc = x.to(dt), y.to(dt)
    geo = [_view(geometry[:, k], x.dim(), channel_dim) for k in range(geometry.shape[1])]
    u, i, s, x_left, x_right = _locate(xc, geo[0], geo[1], geo[2], n)
    v, j, t, y_left, y_right = _locate(yc, geo[3], geo[4], geo[5], n)
    lower = s >= t
    base = (i * (n + 1) + j).long()
    channel = None
    if channel_dim is not None:
        channel = _view(torch.arange(values.shape[0], device=x.device), x.dim(), channel_dim)
        base = base + channel * (n + 1) ** 2
    flat = values.reshape(-1)
    v00 = flat[base]
    v11 = flat[base + (n + 2)]
    v_mid = flat[torch.where(lower, base + (n + 1), base + 1)]  # V[i+1,j] (lower) or V[i,j+1] (upper)
    # dF/ds and dF/dt of the triangle
    a = torch.where(lower, v_mid - v00, v11 - v_mid)
    b = torch.where(lower, v11 - v_mid, v_mid - v00)
    return xc, yc, geo, (u, i, s, x_left, x_right), (v, j, t, y_left, y_right), lower, channel, v00, a, b


def _outer(selected: Tensor, a: Tensor, bound: Tensor, slope: Tensor) -> Tensor:
    # K (a - B) where selected; 0 elsewhere and on a flat piece (so ±inf * 0 gives no NaN)
    return torch.where(selected & (slope != 0), slope * (a - bound), 0.0)


def forward(x, y, values, geometry, channel_dim):
    xc, yc, geo, (_, _, s, xl_m, xr_m), (_, _, t, yl_m, yr_m), _, _, v00, a, b = _cells(
        x, y, values, geometry, channel_dim
    )
    z = v00 + s * a + t * b
    z = z + _outer(xl_m, xc, geo[0], geo[6]) + _outer(xr_m, xc, geo[1], geo[7])
    z = z + _outer(yl_m, yc, geo[3], geo[8]) + _outer(yr_m, yc, geo[4], geo[9])
    return z.to(x.dtype)


def backward(grad, x, y, values, geometry, channel_dim):
    n = values.shape[-1] - 1
    num_channels = values.shape[0]
    xc, yc, geo, (u, i, s, xl_m, xr_m), (v, j, t, yl_m, yr_m), lower, channel, _, a, b = _cells(
        x, y, values, geometry, channel_dim
    )
    g = grad.to(values.dtype).expand_as(xc)
    x_in = ~(xl_m | xr_m)
    y_in = ~(yl_m | yr_m)
    dx = g * torch.where(xl_m, geo[6], torch.where(xr_m, geo[7], a * geo[2]))
    dy = g * torch.where(yl_m, geo[8], torch.where(yr_m, geo[9], b * geo[5]))
    cell = ((i * n + j) * 2 + (~lower).to(i.dtype)).long()
    if channel is not None:
        cell = cell + channel * (2 * n * n)
    hist = torch.zeros(num_channels * n * n * 2, 3, dtype=values.dtype, device=x.device)
    hist.index_add_(0, cell.reshape(-1), torch.stack([g, g * s, g * t], -1).reshape(-1, 3))
    zero = torch.zeros_like(g)
    ga = torch.where(x_in, g * a, zero)
    gb = torch.where(y_in, g * b, zero)
    per_element = torch.stack(
        [
            torch.where(xl_m, g, zero),
            torch.where(xl_m, g * (xc - geo[0]), zero),
            torch.where(xr_m, g, zero),
            torch.where(xr_m, g * (xc - geo[1]), zero),
            torch.where(yl_m, g, zero),
            torch.where(yl_m, g * (yc - geo[3]), zero),
            torch.where(yr_m, g, zero),
            torch.where(yr_m, g * (yc - geo[4]), zero),
            ga,
            ga * u,
            gb,
            gb * v,
        ],
        -1,
    )
    sums = torch.zeros(num_channels, 12, dtype=values.dtype, device=x.device)
    index = (channel if channel is not None else torch.zeros((), dtype=torch.long, device=x.device)).expand_as(xc)
    sums.index_add_(0, index.reshape(-1), per_element.reshape(-1, 12))
    return dx.to(x.dtype), dy.to(x.dtype), hist.reshape(num_channels, n, n, 2, 3), sums


class TorchBackend:
    """The vectorised-torch 2-D PWLU backend (:class:`pwlu.ops.dispatch.PWLU2DBackend`)."""

    name = "torch"
    forward = staticmethod(forward)
    backward = staticmethod(backward)
    make_plan = None

    @staticmethod
    def is_available(device: torch.device) -> bool:
        return True


BACKEND = TorchBackend()
