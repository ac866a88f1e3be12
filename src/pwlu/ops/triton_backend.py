"""Triton backend: fused PWLU kernels for CUDA tensors.

Implements the backend interface of ``torch_backend.py`` on the folded tables::

    forward(x, slopes, intercepts, left, right, inv_d, channel_dim, shift) -> y
    backward(grad, x, slopes, left, right, inv_d, channel_dim) -> (dx, hist)

The input is treated as a dense ``(outer, C, inner)`` buffer read through its own memory
layout, so NCHW, channels-last and ``(B, T, C)`` inputs are processed without copies (a
non-dense input is copied once into the layout ``torch.empty_like`` gives it); outputs have
the memory format of ``x``. float16/bfloat16 are loaded and stored in their dtype and
computed in float32; float32 and float64 compute in their own dtype.

The backward writes ``dx`` and, per program, a partial histogram of ``sum(g)`` and
``sum(g * r)`` over the ``N + 2`` regions of each channel it covers into a buffer
``[programs, C, N + 2, 2]`` (compute dtype), which is then summed with ``.sum(0)``: no
atomics, so parameter gradients are bit-identical run to run (Liger-Kernel's DyT pattern).

With ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors in the Triton interpreter
(how CI tests them). Triton fixes the mode when a ``@triton.jit`` function is defined, its
own library included, so the variable must be set before ``triton`` is first imported in
the process; setting it later has no effect (see :func:`is_available`).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

_FORWARD_TILE = 2048  # elements per forward program
_BACKWARD_TILE = 1024  # elements per backward loop iteration (more live registers)
_MAX_CHANNEL_BLOCK = 64  # channels per tile when the channel axis is the innermost one
_PROGRAMS_PER_SM = 4  # backward programs per streaming multiprocessor


@triton.jit
def _pwlu_forward_kernel(
    x_ptr,
    y_ptr,
    slopes_ptr,
    intercepts_ptr,
    left_ptr,
    right_ptr,
    inv_d_ptr,
    shift_ptr,
    outer,
    num_channels,
    inner,
    N: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_O)
    cols = tl.arange(0, BLOCK_K)
    if CHANNELS_LAST:
        # inner == 1: one program per (outer-block, channel-block) tile of the (outer, C) matrix
        o = tl.program_id(0).to(tl.int64) * BLOCK_O + rows
        chan = tl.program_id(1) * BLOCK_K + cols
        mask = (o[:, None] < outer) & (chan[None, :] < num_channels)
        offs = o[:, None] * num_channels + chan[None, :]
        chan_ok = chan < num_channels
        left = tl.load(left_ptr + chan, mask=chan_ok, other=0.0)[None, :]
        right = tl.load(right_ptr + chan, mask=chan_ok, other=1.0)[None, :]
        inv_d = tl.load(inv_d_ptr + chan, mask=chan_ok, other=1.0)[None, :]
        shift = tl.load(shift_ptr + chan, mask=chan_ok, other=0.0)[None, :]
        chan = chan[None, :]
    else:
        # one program per (outer-block, inner-block) tile of channel c = program_id(1)
        chan = tl.program_id(1)
        inner_blocks = tl.cdiv(inner, BLOCK_K)
        o = (tl.program_id(0) // inner_blocks).to(tl.int64) * BLOCK_O + rows
        i = (tl.program_id(0) % inner_blocks).to(tl.int64) * BLOCK_K + cols
        mask = (o[:, None] < outer) & (i[None, :] < inner)
        offs = (o[:, None] * num_channels + chan) * inner + i[None, :]
        left = tl.load(left_ptr + chan)
        right = tl.load(right_ptr + chan)
        inv_d = tl.load(inv_d_ptr + chan)
        shift = tl.load(shift_ptr + chan)

    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(slopes_ptr.dtype.element_ty)
    # u = (x - B_L) / d, computed as in the reference so regions agree at breakpoints
    u = (x - left) * inv_d
    # interval i = clamp(floor(u), 0, N-1); NaN goes to interval 0 (its output stays NaN)
    i_f = tl.floor(u)
    i_f = tl.where(i_f == i_f, i_f, 0.0)
    i_f = tl.minimum(tl.maximum(i_f, 0.0), N - 1.0)
    # region k: 0 left of B_L, N+1 from B_R on, else interval i + 1
    k = tl.where(x < left, 0, tl.where(x >= right, N + 1, i_f.to(tl.int32) + 1))
    table = chan * (N + 2) + k
    a = tl.load(slopes_ptr + table, mask=mask, other=0.0)
    b = tl.load(intercepts_ptr + table, mask=mask, other=0.0)
    # y = a[k] * (x - shift) + b[k]; a flat outer piece maps ±inf to its constant (not inf * 0 = NaN)
    y = a * (x - shift) + b
    y = tl.where((tl.abs(x) == float("inf")) & (a == 0.0), b, y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pwlu_backward_kernel(
    grad_ptr,
    x_ptr,
    dx_ptr,
    partial_ptr,
    slopes_ptr,
    left_ptr,
    right_ptr,
    inv_d_ptr,
    outer,
    num_channels,
    inner,
    N: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
    REGIONS_PAD: tl.constexpr,
):
    compute_ty = slopes_ptr.dtype.element_ty
    rows = tl.arange(0, BLOCK_O)
    cols = tl.arange(0, BLOCK_K)
    regions = tl.arange(0, REGIONS_PAD)
    if CHANNELS_LAST:
        # grid (P, channel blocks): program (p, cb) loops over outer blocks p, p + P, ...
        chan = tl.program_id(1) * BLOCK_K + cols
        chan_ok = chan < num_channels
        num_tiles = tl.cdiv(outer, BLOCK_O)
        left = tl.load(left_ptr + chan, mask=chan_ok, other=0.0)[None, :]
        right = tl.load(right_ptr + chan, mask=chan_ok, other=1.0)[None, :]
        inv_d = tl.load(inv_d_ptr + chan, mask=chan_ok, other=1.0)[None, :]
        table_base = chan[None, :] * (N + 2)
        # per-column partial sums, one row per region
        acc_g = tl.zeros([REGIONS_PAD, BLOCK_K], dtype=compute_ty)
        acc_r = tl.zeros([REGIONS_PAD, BLOCK_K], dtype=compute_ty)
    else:
        # grid (P, C): program (p, c) loops over (outer, inner) tiles p, p + P, ... of channel c
        chan = tl.program_id(1)
        inner_blocks = tl.cdiv(inner, BLOCK_K)
        num_tiles = tl.cdiv(outer, BLOCK_O) * inner_blocks
        left = tl.load(left_ptr + chan)
        right = tl.load(right_ptr + chan)
        inv_d = tl.load(inv_d_ptr + chan)
        table_base = chan * (N + 2)
        acc_g = tl.zeros([REGIONS_PAD], dtype=compute_ty)
        acc_r = tl.zeros([REGIONS_PAD], dtype=compute_ty)

    zero = tl.program_id(0).to(tl.int64) * 0
    for tile_id in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        tile = zero + tile_id  # int64 offsets from here on
        if CHANNELS_LAST:
            o = tile * BLOCK_O + rows
            mask = (o[:, None] < outer) & chan_ok[None, :]
            offs = o[:, None] * num_channels + chan[None, :]
        else:
            o = (tile // inner_blocks) * BLOCK_O + rows
            i = (tile % inner_blocks) * BLOCK_K + cols
            mask = (o[:, None] < outer) & (i[None, :] < inner)
            offs = (o[:, None] * num_channels + chan) * inner + i[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(compute_ty)
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(compute_ty)
        # region k exactly as in the forward kernel
        u = (x - left) * inv_d
        i_f = tl.floor(u)
        i_f = tl.where(i_f == i_f, i_f, 0.0)
        i_f = tl.minimum(tl.maximum(i_f, 0.0), N - 1.0)
        is_left = x < left
        is_right = x >= right
        k = tl.where(is_left, 0, tl.where(is_right, N + 1, i_f.to(tl.int32) + 1))
        a = tl.load(slopes_ptr + table_base + k, mask=mask, other=0.0)
        # dy/dx = slope of region k
        tl.store(dx_ptr + offs, (g * a).to(dx_ptr.dtype.element_ty), mask=mask)
        # local coordinate r: x - B_L (left), x - B_R (right), t = u - i (inner intervals)
        r = tl.where(is_left, x - left, tl.where(is_right, x - right, u - i_f))
        g = tl.where(mask, g, 0.0)
        gr = tl.where(mask, g * r, 0.0)
        # histogram over regions: masked column sums, accumulated into row j
        for j in range(N + 2):
            in_j = k == j
            sum_g = tl.sum(tl.where(in_j, g, 0.0), axis=0)
            sum_r = tl.sum(tl.where(in_j, gr, 0.0), axis=0)
            if CHANNELS_LAST:
                acc_g = tl.where(regions[:, None] == j, acc_g + sum_g[None, :], acc_g)
                acc_r = tl.where(regions[:, None] == j, acc_r + sum_r[None, :], acc_r)
            else:
                acc_g = tl.where(regions == j, acc_g + tl.sum(sum_g, axis=0), acc_g)
                acc_r = tl.where(regions == j, acc_r + tl.sum(sum_r, axis=0), acc_r)

    # partial[program_id(0), c, k, 0/1] = (sum g, sum g * r) over this program's elements
    row = tl.program_id(0).to(tl.int64) * num_channels
    if CHANNELS_LAST:
        out = (((row + chan[None, :]) * (N + 2)) + regions[:, None]) * 2
        out_mask = (regions[:, None] < N + 2) & chan_ok[None, :]
    else:
        out = ((row + chan) * (N + 2) + regions) * 2
        out_mask = regions < N + 2
    tl.store(partial_ptr + out, acc_g, mask=out_mask)
    tl.store(partial_ptr + out + 1, acc_r, mask=out_mask)


# Triton decides interpreted vs compiled when it decorates a kernel (its own library kernels
# such as tl.cdiv at `import triton`): both must have been made in the same mode.
_INTERPRETED = isinstance(_pwlu_forward_kernel, InterpretedFunction)
_CONSISTENT = _INTERPRETED == isinstance(tl.standard.cdiv, InterpretedFunction)


def is_available(device: torch.device) -> bool:
    """CUDA tensors; CPU tensors too when the interpreter is on (``TRITON_INTERPRET=1``
    set before ``triton`` was first imported in this process)."""
    return _CONSISTENT and (device.type == "cuda" or _INTERPRETED)


def _as_dense(t: Tensor, like: Tensor) -> Tensor:
    """``t`` in the memory layout of ``like`` (a tensor made by ``torch.empty_like``)."""
    return t if t.stride() == like.stride() else torch.empty_like(like).copy_(t)


def _layout(y: Tensor, channel_dim: int | None) -> tuple[int, int, int]:
    """``(outer, C, inner)`` of a dense tensor ``y``: channel of offset p is ``p // inner % C``."""
    if channel_dim is None or y.shape[channel_dim] == 1:
        return 1, 1, y.numel()
    num_channels = y.shape[channel_dim]
    # dense: the dims stored inside the channel axis span exactly its stride
    inner = y.stride(channel_dim)
    return y.numel() // (num_channels * inner), num_channels, inner


def _blocks(outer: int, num_channels: int, inner: int, tile: int) -> tuple[int, int]:
    """``(BLOCK_O, BLOCK_K)``: rows of outer indices times channels (inner == 1) or inner indices."""
    if inner == 1:
        block_k = min(triton.next_power_of_2(num_channels), _MAX_CHANNEL_BLOCK)
    else:
        block_k = min(triton.next_power_of_2(inner), 1024)
        # halve while more than 1/8 of the last inner block would be masked off
        while block_k > 128 and (-inner % block_k) * 8 > inner:
            block_k //= 2
    block_o = max(1, min(tile // block_k, triton.next_power_of_2(outer)))
    return block_o, block_k


def _device_guard(x: Tensor):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def forward(x, slopes, intercepts, left, right, inv_d, channel_dim, shift):
    n = slopes.shape[-1] - 2
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    x = _as_dense(x, y)
    outer, num_channels, inner = _layout(y, channel_dim)
    channels_last = inner == 1 and num_channels > 1
    block_o, block_k = _blocks(outer, num_channels, inner, _FORWARD_TILE)
    if channels_last:
        grid = (triton.cdiv(outer, block_o), triton.cdiv(num_channels, block_k))
    else:
        grid = (triton.cdiv(outer, block_o) * triton.cdiv(inner, block_k), num_channels)
    tables = [t.contiguous() for t in (slopes, intercepts, left, right, inv_d, shift)]
    with _device_guard(x):
        _pwlu_forward_kernel[grid](
            x, y, *tables, outer, num_channels, inner,
            N=n, CHANNELS_LAST=channels_last, BLOCK_O=block_o, BLOCK_K=block_k,
        )  # fmt: skip
    return y


def _backward_programs(x: Tensor, num_tiles: int, columns: int) -> int:
    """Programs along the tile axis: enough to fill the GPU, each looping over several tiles."""
    if x.device.type == "cuda":
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        target = triton.cdiv(_PROGRAMS_PER_SM * sms, columns)
    else:
        target = 2  # interpreter: programs run one after another; two still test the reduction
    return max(1, min(num_tiles, target))


def backward(grad, x, slopes, left, right, inv_d, channel_dim):
    n = slopes.shape[-1] - 2
    dx = torch.empty_like(x)
    if x.numel() == 0:
        hist = torch.zeros(slopes.shape[0], n + 2, 2, dtype=slopes.dtype, device=x.device)
        return dx, hist
    x = _as_dense(x, dx)
    grad = _as_dense(grad.expand_as(x), dx)
    outer, num_channels, inner = _layout(dx, channel_dim)
    channels_last = inner == 1 and num_channels > 1
    block_o, block_k = _blocks(outer, num_channels, inner, _BACKWARD_TILE)
    if channels_last:
        num_tiles, columns = triton.cdiv(outer, block_o), triton.cdiv(num_channels, block_k)
    else:
        num_tiles, columns = triton.cdiv(outer, block_o) * triton.cdiv(inner, block_k), num_channels
    programs = _backward_programs(x, num_tiles, columns)
    # one row of partial histograms per program along the tile axis, summed below
    partial = torch.empty(programs, num_channels, n + 2, 2, dtype=slopes.dtype, device=x.device)
    tables = [t.contiguous() for t in (slopes, left, right, inv_d)]
    with _device_guard(x):
        _pwlu_backward_kernel[(programs, columns)](
            grad, x, dx, partial, *tables, outer, num_channels, inner,
            N=n, CHANNELS_LAST=channels_last, BLOCK_O=block_o, BLOCK_K=block_k,
            REGIONS_PAD=triton.next_power_of_2(n + 2),
        )  # fmt: skip
    return dx, partial.sum(0)


class TritonBackend:
    """The Triton PWLU backend (:class:`pwlu.ops.dispatch.PWLUBackend`)."""

    name = "triton"
    forward = staticmethod(forward)
    backward = staticmethod(backward)
    is_available = staticmethod(is_available)
    fold = None
    forward_from_params = None
    backward_from_params = None
    make_plan = None


BACKEND = TritonBackend()
