"""N-PWLU backend in vectorised torch ops: runs on any device, the fallback where no faster
kernel applies. Semantics of the Protocol :class:`pwlu.ops.npwlu_backends.NPWLUBackend`::

    forward(x, slopes, intercepts, breakpoints, shift, channel_dim) -> y
    backward(grad, x, slopes, breakpoints, inv_widths, channel_dim) -> (dx, hist)

Region ``k`` of an element as in :mod:`pwlu.ops.npwlu_folding`; ``y = slopes[k] * (x - shift) +
intercepts[k]`` (``intercepts[k]`` where ``x`` is ±inf and ``slopes[k] == 0``); ``dx = g *
slopes[k]``; ``hist[c, k] = (sum g, sum g * r)`` with ``r = x - b_0`` (left), ``x - b_N`` (right),
``(x - b_{k-1}) * inv_widths[k-1]`` (inner).
"""

from __future__ import annotations

import torch

from .folded import channel_view
from .npwlu_folding import _flat_index, npwlu_from_tables, npwlu_regions


def forward(x, slopes, intercepts, breakpoints, shift, channel_dim):
    return npwlu_from_tables(x, slopes, intercepts, breakpoints, shift, channel_dim)


def backward(grad, x, slopes, breakpoints, inv_widths, channel_dim):
    n = slopes.shape[-1] - 2
    num_channels = slopes.shape[0]
    xc = x.to(slopes.dtype)
    g = grad.to(slopes.dtype).expand_as(xc)
    k, is_left, is_right = npwlu_regions(xc, breakpoints, channel_dim)
    flat = _flat_index(k, num_channels, n + 2, channel_dim)
    dx = (g * slopes.reshape(-1)[flat]).to(x.dtype)  # dy/dx = slope of region k
    j = (k - 1).clamp(0, n - 1)  # the interval of an inner element
    b_lo = breakpoints.reshape(-1)[_flat_index(j, num_channels, n + 1, channel_dim)]
    inv_w = inv_widths.reshape(-1)[_flat_index(j, num_channels, n, channel_dim)]
    bl = channel_view(breakpoints[:, 0], x.dim(), channel_dim)
    br = channel_view(breakpoints[:, n], x.dim(), channel_dim)
    r = torch.where(is_left, xc - bl, torch.where(is_right, xc - br, (xc - b_lo) * inv_w))
    hist = torch.zeros(num_channels * (n + 2), 2, dtype=slopes.dtype, device=x.device)
    flat = flat.reshape(-1)
    hist[:, 0].index_add_(0, flat, g.reshape(-1))
    hist[:, 1].index_add_(0, flat, (g * r).reshape(-1))
    return dx, hist.reshape(num_channels, n + 2, 2)


class NPWLUTorchBackend:
    """The vectorised-torch N-PWLU backend (:class:`pwlu.ops.npwlu_backends.NPWLUBackend`)."""

    name = "torch"
    forward = staticmethod(forward)
    backward = staticmethod(backward)
    make_plan = None

    @staticmethod
    def is_available(device: torch.device) -> bool:
        return True


BACKEND = NPWLUTorchBackend()
