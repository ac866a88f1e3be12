"""Backend in vectorised torch ops: runs on any device, used where no faster kernel applies.

Every backend implements the same two functions on the folded tables (see ``common.py``):

``forward(x, slopes, intercepts, left, right, inv_d, channel_dim, shift) -> y``
``backward(grad, x, slopes, left, right, inv_d, channel_dim) -> (dx, hist)``

Per element of channel ``c``: region ``k`` is 0 if ``x < left``, ``N+1`` if ``x >= right``,
else ``i + 1`` with ``i = clamp(floor((x - left) * inv_d), 0, N-1)`` (NaN: ``i = 0``);
``y = slopes[k] * (x - shift) + intercepts[k]`` (``shift`` is per channel, see
``common.fold_tables``), except ``y = intercepts[k]`` where ``x`` is ±inf and ``slopes[k] == 0``.

Tables are in the compute dtype with a leading channel axis ``C`` (``C = 1`` and
``channel_dim = None`` for layer-wise); ``hist`` is ``Tensor[C, N+2, 2]``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _view(p: Tensor, ndim: int, channel_dim: int | None) -> Tensor:
    if channel_dim is None:
        return p.reshape(())
    shape = [1] * ndim
    shape[channel_dim] = p.shape[0]
    return p.reshape(shape)


def _regions(x: Tensor, left: Tensor, right: Tensor, inv_d: Tensor, n: int, channel_dim: int | None):
    """Region index k in 0..N+1 and local coordinate r of every element."""
    bl, br, inv = (_view(p, x.dim(), channel_dim) for p in (left, right, inv_d))
    u = (x - bl) * inv
    i = torch.nan_to_num(torch.floor(u), nan=0.0).clamp_(0, n - 1)
    is_left = x < bl
    is_right = x >= br
    k = torch.where(is_left, 0, torch.where(is_right, n + 1, i.long() + 1))
    return k, u, i, is_left, is_right, bl, br


def _flat_index(k: Tensor, num_channels: int, n: int, channel_dim: int | None) -> Tensor:
    if channel_dim is None:
        return k
    channel = torch.arange(num_channels, device=k.device)
    return k + _view(channel, k.dim(), channel_dim) * (n + 2)


def forward(x, slopes, intercepts, left, right, inv_d, channel_dim, shift):
    n = slopes.shape[-1] - 2
    xc = x.to(slopes.dtype)
    k, *_ = _regions(xc, left, right, inv_d, n, channel_dim)
    flat = _flat_index(k, slopes.shape[0], n, channel_dim)
    a = slopes.reshape(-1)[flat]
    b = intercepts.reshape(-1)[flat]
    # one multiply-add (on x - shift; shift is 0 whenever the range contains 0)
    y = torch.addcmul(b, a, xc - _view(shift, x.dim(), channel_dim))
    # inf * 0 would be NaN: a flat piece maps ±inf to its constant value
    y = torch.where(torch.isinf(xc) & (a == 0), b, y)
    return y.to(x.dtype)


def backward(grad, x, slopes, left, right, inv_d, channel_dim):
    n = slopes.shape[-1] - 2
    num_channels = slopes.shape[0]
    xc = x.to(slopes.dtype)
    g = grad.to(slopes.dtype)
    k, u, i, is_left, is_right, bl, br = _regions(xc, left, right, inv_d, n, channel_dim)
    flat = _flat_index(k, num_channels, n, channel_dim)
    dx = (g * slopes.reshape(-1)[flat]).to(x.dtype)
    r = torch.where(is_left, xc - bl, torch.where(is_right, xc - br, u - i))
    flat = flat.reshape(-1)
    hist = torch.zeros(num_channels * (n + 2), 2, dtype=slopes.dtype, device=x.device)
    g_flat = g.expand_as(xc).reshape(-1)
    hist[:, 0].index_add_(0, flat, g_flat)
    hist[:, 1].index_add_(0, flat, (g * r).reshape(-1))
    return dx, hist.reshape(num_channels, n + 2, 2)
