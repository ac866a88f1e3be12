"""Backend in vectorised torch ops: runs on any device, used where no faster kernel applies.

Every backend implements the same two functions on the folded tables (see ``folding.py`` and
the Protocol :class:`pwlu.ops.dispatch.PWLUBackend`):

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

from .folded import flat_index as _flat_index
from .folded import pwlu_from_tables
from .folded import regions as _regions


def forward(x, slopes, intercepts, left, right, inv_d, channel_dim, shift):
    # the exportable folded path (pwlu.ops.folded) is this backend's forward
    return pwlu_from_tables(x, slopes, intercepts, left, right, inv_d, shift, channel_dim)


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


class TorchBackend:
    """The vectorised-torch PWLU backend (:class:`pwlu.ops.dispatch.PWLUBackend`)."""

    name = "torch"
    forward = staticmethod(forward)
    backward = staticmethod(backward)
    fold = None
    forward_from_params = None
    backward_from_params = None
    make_plan = None

    @staticmethod
    def is_available(device: torch.device) -> bool:
        return True


BACKEND = TorchBackend()
