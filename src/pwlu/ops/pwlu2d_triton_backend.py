"""2-D PWLU backend: Triton kernels (forward, backward) for CUDA tensors.

Semantics of :mod:`pwlu.ops.pwlu2d_torch_backend`, on the packed ``values`` and ``geometry``
of :mod:`pwlu.ops.pwlu2d_grads`. The inputs are read as contiguous ``(outer, C, inner)``
buffers; one program covers ``BLOCK`` elements of one row ``(o, c)`` (a 1-D grid of
``rows * blocks_per_row`` programs), so its channel's parameters are scalars. An input whose
channel axis is (nearly) innermost (channels-last, ``(B, T, C)``) is first copied with the
channel axis moved to the front, so that rows are long.

The backward writes ``dx``, ``dy``; each program adds its elements' ``(g, g s, g t)`` into the
per-triangle histogram by atomics and its 12 per-channel sums (block reductions) by 12
scalar atomics, into one of ``_SLOTS`` partial buffers (``pid % _SLOTS``, fewer collisions),
summed afterwards. Float atomics make the parameter gradients' last bits depend on the order
of the additions (``dx`` and ``dy`` are deterministic).

With ``TRITON_INTERPRET=1`` (set before ``triton`` is first imported) the same kernels run on
CPU tensors in the Triton interpreter, which is how the tests run them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from .pwlu2d_grads import NUM_SUMS

_BLOCK = 1024  # elements per program
_SLOTS = 32  # partial histogram buffers of the backward
_MIN_ROW = 256  # rows shorter than this: the channel axis is moved to the front first


@triton.jit
def _locate(a, lo, hi, inv_d, N: tl.constexpr):
    """u (0 left of the range, N right of it), cell index (0 for NaN) and fraction of one input."""
    is_left = a < lo
    is_right = a >= hi
    u = tl.where(is_left, 0.0, tl.where(is_right, N * 1.0, (a - lo) * inv_d))
    fi = tl.floor(u)
    fi = tl.where(fi == fi, fi, 0.0)  # NaN -> cell 0
    fi = tl.minimum(tl.maximum(fi, 0.0), N - 1.0)
    return u, fi.to(tl.int32), u - fi, is_left, is_right


@triton.jit
def _triangle(values_ptr, chan, i, j, s, t, mask, N: tl.constexpr):
    """V[i,j] and the triangle's slopes a = dF/ds, b = dF/dt (lower triangle: s >= t)."""
    lower = s >= t
    base = chan * (N + 1) * (N + 1) + i * (N + 1) + j
    v00 = tl.load(values_ptr + base, mask=mask, other=0.0)
    v11 = tl.load(values_ptr + base + (N + 2), mask=mask, other=0.0)
    vm = tl.load(values_ptr + base + tl.where(lower, N + 1, 1), mask=mask, other=0.0)
    a = tl.where(lower, vm - v00, v11 - vm)
    b = tl.where(lower, v11 - vm, vm - v00)
    return lower, v00, a, b


@triton.jit
def _pwlu2d_forward_kernel(
    x_ptr, y_ptr, z_ptr, values_ptr, geo_ptr, num_channels, inner, N: tl.constexpr, BLOCK: tl.constexpr
):
    # program pid: row pid // blocks (channel row % C), block pid % blocks of that row
    pid = tl.program_id(0)
    blocks = tl.cdiv(inner, BLOCK)
    row = pid // blocks
    chan = row % num_channels
    cols = (pid % blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inner
    offs = row.to(tl.int64) * inner + cols
    dt = values_ptr.dtype.element_ty
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(dt)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(dt)
    g = geo_ptr + chan * 10
    xl, xr, ix = tl.load(g), tl.load(g + 1), tl.load(g + 2)
    yl, yr, iy = tl.load(g + 3), tl.load(g + 4), tl.load(g + 5)
    kxl, kxr, kyl, kyr = tl.load(g + 6), tl.load(g + 7), tl.load(g + 8), tl.load(g + 9)
    _, i, s, x_left, x_right = _locate(x, xl, xr, ix, N)
    _, j, t, y_left, y_right = _locate(y, yl, yr, iy, N)
    _, v00, a, b = _triangle(values_ptr, chan, i, j, s, t, mask, N)
    z = v00 + s * a + t * b
    # outer terms K (x - B) on the selected side; a flat piece maps ±inf to 0
    kx = tl.where(x_left, kxl, kxr)
    ky = tl.where(y_left, kyl, kyr)
    z += tl.where((x_left | x_right) & (kx != 0.0), kx * (x - tl.where(x_left, xl, xr)), 0.0)
    z += tl.where((y_left | y_right) & (ky != 0.0), ky * (y - tl.where(y_left, yl, yr)), 0.0)
    tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pwlu2d_backward_kernel(
    g_ptr,
    x_ptr,
    y_ptr,
    dx_ptr,
    dy_ptr,
    hist_ptr,
    sums_ptr,
    values_ptr,
    geo_ptr,
    num_channels,
    inner,
    N: tl.constexpr,
    NUM_SUMS: tl.constexpr,
    SLOTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    blocks = tl.cdiv(inner, BLOCK)
    row = pid // blocks
    chan = row % num_channels
    cols = (pid % blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inner
    offs = row.to(tl.int64) * inner + cols
    dt = values_ptr.dtype.element_ty
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(dt)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(dt)
    gr = tl.load(g_ptr + offs, mask=mask, other=0.0).to(dt)
    gp = geo_ptr + chan * 10
    xl, xr, ix = tl.load(gp), tl.load(gp + 1), tl.load(gp + 2)
    yl, yr, iy = tl.load(gp + 3), tl.load(gp + 4), tl.load(gp + 5)
    kxl, kxr, kyl, kyr = tl.load(gp + 6), tl.load(gp + 7), tl.load(gp + 8), tl.load(gp + 9)
    u, i, s, x_left, x_right = _locate(x, xl, xr, ix, N)
    v, j, t, y_left, y_right = _locate(y, yl, yr, iy, N)
    lower, _, a, b = _triangle(values_ptr, chan, i, j, s, t, mask, N)
    # dz/dx: K_XL / K_XR outside the range, the triangle's slope a / dx inside (likewise y)
    dx = gr * tl.where(x_left, kxl, tl.where(x_right, kxr, a * ix))
    dy = gr * tl.where(y_left, kyl, tl.where(y_right, kyr, b * iy))
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dy_ptr + offs, dy.to(dy_ptr.dtype.element_ty), mask=mask)
    # histogram [slot, C, N, N, 2, 3]: (g, g s, g t) per cell and triangle
    slot = pid % SLOTS
    cell = ((slot * num_channels + chan) * (N * N) + i * N + j) * 2 + tl.where(lower, 0, 1)
    hp = hist_ptr + cell * 3
    tl.atomic_add(hp, gr, mask=mask)
    tl.atomic_add(hp + 1, gr * s, mask=mask)
    tl.atomic_add(hp + 2, gr * t, mask=mask)
    # the 12 per-channel sums (pwlu2d_grads.py), reduced over the block
    zero = tl.zeros_like(gr)
    x_in = ~(x_left | x_right)
    y_in = ~(y_left | y_right)
    ga = tl.where(x_in & mask, gr * a, zero)
    gb = tl.where(y_in & mask, gr * b, zero)
    sp = sums_ptr + (slot * num_channels + chan) * NUM_SUMS
    tl.atomic_add(sp + 0, tl.sum(tl.where(x_left, gr, zero)))
    tl.atomic_add(sp + 1, tl.sum(tl.where(x_left, gr * (x - xl), zero)))
    tl.atomic_add(sp + 2, tl.sum(tl.where(x_right, gr, zero)))
    tl.atomic_add(sp + 3, tl.sum(tl.where(x_right, gr * (x - xr), zero)))
    tl.atomic_add(sp + 4, tl.sum(tl.where(y_left, gr, zero)))
    tl.atomic_add(sp + 5, tl.sum(tl.where(y_left, gr * (y - yl), zero)))
    tl.atomic_add(sp + 6, tl.sum(tl.where(y_right, gr, zero)))
    tl.atomic_add(sp + 7, tl.sum(tl.where(y_right, gr * (y - yr), zero)))
    tl.atomic_add(sp + 8, tl.sum(ga))
    tl.atomic_add(sp + 9, tl.sum(ga * u))
    tl.atomic_add(sp + 10, tl.sum(gb))
    tl.atomic_add(sp + 11, tl.sum(gb * v))


_INTERPRETED = isinstance(_pwlu2d_forward_kernel, InterpretedFunction)


def is_available(device: torch.device) -> bool:
    """CUDA tensors; CPU tensors too when the interpreter is on."""
    return device.type == "cuda" or _INTERPRETED


def _rows(ts: tuple[Tensor, ...], channel_dim: int | None) -> tuple[list[Tensor], tuple[int, int, int], bool]:
    """The tensors as contiguous ``(outer, C, inner)`` buffers (channel axis moved to the front
    when rows would be short), their view and whether they were moved."""
    x = ts[0]
    if channel_dim is None:
        return [t.contiguous() for t in ts], (1, 1, x.numel()), False
    c = x.shape[channel_dim]
    inner = math.prod(x.shape[channel_dim + 1 :])
    outer = x.numel() // max(c * inner, 1)
    if inner >= _MIN_ROW or outer == 1:
        return [t.contiguous() for t in ts], (outer, c, inner), False
    return [t.movedim(channel_dim, 0).contiguous() for t in ts], (1, c, x.numel() // max(c, 1)), True


def forward(x, y, values, geometry, channel_dim):
    (xs, ys), (outer, c, inner), moved = _rows((x, y), channel_dim)
    z = torch.empty_like(xs)
    n = values.shape[-1] - 1
    if z.numel():
        grid = (outer * c * triton.cdiv(inner, _BLOCK),)
        _pwlu2d_forward_kernel[grid](xs, ys, z, values, geometry, c, inner, N=n, BLOCK=_BLOCK)
    return z.movedim(0, channel_dim) if moved else z.view(x.shape)


def backward(grad, x, y, values, geometry, channel_dim):
    (gs, xs, ys), (outer, c, inner), moved = _rows((grad.to(x.dtype).expand_as(x), x, y), channel_dim)
    dx, dy = torch.empty_like(xs), torch.empty_like(xs)
    n = values.shape[-1] - 1
    hist = torch.zeros(_SLOTS, c, n, n, 2, 3, dtype=values.dtype, device=x.device)
    sums = torch.zeros(_SLOTS, c, NUM_SUMS, dtype=values.dtype, device=x.device)
    if xs.numel():
        grid = (outer * c * triton.cdiv(inner, _BLOCK),)
        _pwlu2d_backward_kernel[grid](
            gs,
            xs,
            ys,
            dx,
            dy,
            hist,
            sums,
            values,
            geometry,
            c,
            inner,
            N=n,
            NUM_SUMS=NUM_SUMS,
            SLOTS=_SLOTS,
            BLOCK=_BLOCK,
        )
    if moved:
        dx, dy = dx.movedim(0, channel_dim), dy.movedim(0, channel_dim)
    else:
        dx, dy = dx.view(x.shape), dy.view(x.shape)
    return dx, dy, hist.sum(0), sums.sum(0)


class TritonBackend:
    """The Triton 2-D PWLU backend (:class:`pwlu.ops.dispatch.PWLU2DBackend`)."""

    name = "triton"
    forward = staticmethod(forward)
    backward = staticmethod(backward)
    make_plan = None
    is_available = staticmethod(is_available)


BACKEND = TritonBackend()
