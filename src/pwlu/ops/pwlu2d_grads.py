"""Shared math for every 2-D PWLU backend: the packed per-channel geometry the kernels read,
and the exact parameter gradients from the kernels' per-triangle histograms.

Kernels see, per channel ``c`` (``C = 1`` layer-wise), in the compute dtype:

* ``values``: ``Tensor[C, N+1, N+1]``;
* ``geometry``: ``Tensor[C, 10]`` = ``(X_L, X_R, 1/dx, Y_L, Y_R, 1/dy, K_XL, K_XR, K_YL, K_YR)``
  with the effective right bounds (minimum width applied) and ``dx = (X_R - X_L) / N``.

Per element: ``u = 0`` if ``x < X_L``, ``N`` if ``x >= X_R``, else ``(x - X_L) / dx``;
``i = clamp(floor(u), 0, N-1)`` (0 for NaN), ``s = u - i``; likewise ``v, j, t`` for ``y``.
The lower triangle (``s >= t``) has the vertices ``V[i,j], V[i+1,j], V[i+1,j+1]`` with
barycentric weights ``1-s, s-t, t``; the upper one (``s < t``) ``V[i,j], V[i,j+1], V[i+1,j+1]``
with ``1-t, t-s, s``. ``a = dF/ds`` and ``b = dF/dt`` are the triangle's slopes in grid units.

A backward kernel returns ``dx``, ``dy`` and

* ``hist``: ``Tensor[C, N, N, 2, 3]``, per cell ``(i, j)`` and triangle (0 lower, 1 upper):
  ``sum(g)``, ``sum(g s)``, ``sum(g t)``;
* ``sums``: ``Tensor[C, 12]``: ``sum(g)`` and ``sum(g (x - X_L))`` over ``x < X_L``, the same
  over ``x >= X_R`` (with ``x - X_R``), the same four for ``y``, then ``sum(g a)`` and
  ``sum(g a u)`` over the elements with ``x`` inside its range, and ``sum(g b)``, ``sum(g b v)``
  over those with ``y`` inside.

:func:`pwlu2d_param_grads` turns them into the nine exact gradients (an ``O(C N^2)`` epilogue).
For float32 parameters on the CPU both functions run as one compiled call each (``pwlu2d_cpu``,
the gradients in float64 from the CPU backend's float64 histograms).
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from .folding import MIN_WIDTH, effective_bounds
from .validation import plain_f32_cpu

#: number of per-channel sums a backward kernel returns (see the module docstring)
NUM_SUMS = 12
#: number of entries of the packed per-channel geometry
NUM_GEOMETRY = 10


def _native(params: tuple[Tensor, ...], dtype: torch.dtype):
    """The compiled ``pwlu2d_cpu`` library, if loaded, where its one-call geometry and parameter
    gradients apply (float32 compute, the nine parameters plain dense float32 CPU tensors), else ``None``.
    Each replaces some twenty small torch ops, which cost more than the kernel on small inputs."""
    if dtype != torch.float32 or not plain_f32_cpu(params):
        return None
    from .pwlu2d_cpu_backend import PWLU2D_CPU  # here: that module imports this one

    return PWLU2D_CPU.loaded()  # never a build here: the backend's selection builds it


def _scalar_ptrs(params: tuple[Tensor, ...]):
    return (ctypes.c_void_p * 8)(*(p.data_ptr() for p in params[1:]))


def pwlu2d_geometry(params: tuple[Tensor, ...], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(values Tensor[C, N+1, N+1], geometry Tensor[C, 10])`` in ``dtype`` (not differentiated)."""
    values = params[0]
    n1 = values.shape[-1]
    n = n1 - 1
    lib = _native(params, dtype)
    if lib is not None:
        values = values.detach().reshape(-1, n1, n1)
        geometry = torch.empty(values.shape[0], NUM_GEOMETRY, dtype=dtype)
        lib.pwlu2d_geometry_f32(_scalar_ptrs(params), values.shape[0], n, MIN_WIDTH, geometry.data_ptr())
        return values, geometry
    with torch.no_grad():
        xl, xr, yl, yr, kxl, kxr, kyl, kyr = (p.detach().to(dtype).reshape(-1) for p in params[1:])
        xr_eff, _, inv_dx = effective_bounds(xl, xr, n)
        yr_eff, _, inv_dy = effective_bounds(yl, yr, n)
        geometry = torch.stack([xl, xr_eff, inv_dx, yl, yr_eff, inv_dy, kxl, kxr, kyl, kyr], -1)
        return values.detach().to(dtype).reshape(-1, n1, n1).contiguous(), geometry.contiguous()


def pwlu2d_param_grads(hist: Tensor, sums: Tensor, geometry: Tensor, params: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The nine parameter gradients (in the parameters' shapes and dtypes) from a backward
    kernel's ``hist`` and ``sums`` (module docstring); ``params`` are the original parameters."""
    n = hist.shape[1]
    lib = _native(params, geometry.dtype) if hist.dtype == torch.float64 and hist.is_cpu else None
    if lib is not None:
        c = hist.shape[0]
        hist, sums = hist.contiguous(), sums.contiguous()
        d_values = torch.empty(c, n + 1, n + 1, dtype=torch.float64)
        d_rest = torch.empty(c, 8, dtype=torch.float64)
        lib.pwlu2d_param_grads_f64(
            hist.data_ptr(), sums.data_ptr(), geometry.data_ptr(), _scalar_ptrs(params), c, n, MIN_WIDTH,
            d_values.data_ptr(), d_rest.data_ptr(),
        )  # fmt: skip
        grads = (d_values, *d_rest.unbind(-1))
        return tuple(gr.reshape(p.shape).to(p.dtype, copy=True) for gr, p in zip(grads, params))
    g, gs, gt = hist.unbind(-1)  # each [C, N, N, 2]
    d_values = torch.zeros(hist.shape[0], n + 1, n + 1, dtype=hist.dtype, device=hist.device)
    # lower triangle: weights 1-s, s-t, t on V[i,j], V[i+1,j], V[i+1,j+1]
    d_values[:, :-1, :-1] += g[..., 0] - gs[..., 0]
    d_values[:, 1:, :-1] += gs[..., 0] - gt[..., 0]
    d_values[:, 1:, 1:] += gt[..., 0]
    # upper triangle: weights 1-t, t-s, s on V[i,j], V[i,j+1], V[i+1,j+1]
    d_values[:, :-1, :-1] += g[..., 1] - gt[..., 1]
    d_values[:, :-1, 1:] += gt[..., 1] - gs[..., 1]
    d_values[:, 1:, 1:] += gs[..., 1]
    inv_dx, inv_dy = geometry[:, 2], geometry[:, 5]
    kxl, kxr, kyl, kyr = geometry[:, 6:].unbind(-1)
    gxl, rxl, gxr, rxr, gyl, ryl, gyr, ryr, ax, axu, by, byv = sums.unbind(-1)
    grads = []
    # du/dX_L = -(1 - u/N)/dx, du/dX_R = -(u/N)/dx inside the range; the outer terms add -K g
    for ga, gau, inv_d, k_left, g_left, k_right, g_right, left, right in (
        (ax, axu, inv_dx, kxl, gxl, kxr, gxr, params[1], params[2]),
        (by, byv, inv_dy, kyl, gyl, kyr, gyr, params[3], params[4]),
    ):
        d_left = -inv_d * (ga - gau / n) - k_left * g_left
        d_right_eff = -inv_d * gau / n - k_right * g_right
        # a range below MIN_WIDTH has X_R = X_L + MIN_WIDTH: its gradient goes to X_L
        clamped = (right.detach() - left.detach()).to(geometry.dtype).reshape(-1) < MIN_WIDTH
        grads += [torch.where(clamped, d_left + d_right_eff, d_left), torch.where(clamped, 0.0, d_right_eff)]
    grads += [rxl, rxr, ryl, ryr]
    # copy=True: the small gradients are views of one tensor and must not alias each other
    return tuple(gr.reshape(p.shape).to(p.dtype, copy=True) for gr, p in zip((d_values, *grads), params))
