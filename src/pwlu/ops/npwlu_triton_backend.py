"""Triton backend of N-PWLU: fused forward and backward kernels for CUDA tensors.

The Protocol :class:`pwlu.ops.npwlu_backends.NPWLUBackend` on the tables of
:func:`pwlu.ops.npwlu_folding.npwlu_fold_tables`::

    forward(x, slopes, intercepts, breakpoints, shift, channel_dim) -> y
    backward(grad, x, slopes, breakpoints, inv_widths, channel_dim) -> (dx, hist)

Tiling, grids, the dense ``(outer, C, inner)`` view of the input (NCHW, channels-last and
``(B, T, C)`` without copies), the per-thread register histograms of the backward, the passes of
at most 64 regions and the deterministic ``.sum(0)`` of per-program partial histograms are
PWLU's (:mod:`pwlu.ops.triton_backend`, whose launch helpers this module reuses). What differs
is the region search: ``k = 1 + #{interior breakpoints b_1 .. b_{N-1} <= x}``, exact at the
breakpoints: ``N - 1`` comparisons with per-channel scalars up to :data:`LINEAR_SEARCH_MAX_N`
intervals, above it a branch-free binary search over the sorted breakpoints (``ceil(log2 N)``
gathered loads from the small table, so the registers do not grow with ``N``: the linear
search spilled at ``N = 64`` on sm_80/sm_90), and the backward's local
coordinate ``t = (x - b_{k-1}) * inv_widths[k-1]``. Runs under ``TRITON_INTERPRET=1`` on CPU
tensors (how CI tests it), see :mod:`pwlu.ops.triton_backend`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .triton_backend import (
    _REGIONS_PER_PASS,
    _REGIONS_PER_PASS_F64,
    _as_dense,
    _backward_blocks,
    _backward_grid,
    _device_guard,
    _forward_blocks,
    _forward_grid,
    _layout,
    _multiprocessors,
    _region_passes,
)
from .triton_backend import is_available as _pwlu_triton_available

#: Up to this N the region search compares x with every interior breakpoint; above it, a binary search.
LINEAR_SEARCH_MAX_N = 16


def _search_steps(n: int) -> int:
    """The kernels' ``SEARCH_STEPS``: 0 for the linear search, else the binary search's steps
    (``(N - 1).bit_length()``: the largest step is the largest power of 2 <= N - 1)."""
    return 0 if n <= LINEAR_SEARCH_MAX_N else (n - 1).bit_length()


@triton.jit
def _npwlu_region(x, bp_ptr, chan, chan_ok, N: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """Region k of x: 0 left of b_0, N+1 from b_N on, else 1 + the interior breakpoints <= x
    (NaN: 1); also the two outer masks and the outer bounds."""
    bp_row = bp_ptr + chan * (N + 1)
    left = tl.load(bp_row, mask=chan_ok, other=0.0)
    right = tl.load(bp_row + N, mask=chan_ok, other=1.0)
    if SEARCH_STEPS == 0:
        k = tl.full(x.shape, 1, tl.int32)
        for j in tl.static_range(1, N):
            # compare with interior breakpoint b_j (closed on the left: x == b_j is interval j)
            k += (x >= tl.load(bp_row + j, mask=chan_ok, other=0.0)).to(tl.int32)
    else:
        # the largest p in 0..N-1 with b_p <= x (b_1..b_{N-1} sorted, b_0 taken as -inf): binary
        # lifting, steps 2^(S-1), ..., 1; the same comparisons x >= b_j as above (NaN: p = 0)
        pos = tl.zeros(x.shape, tl.int32)
        for s in tl.static_range(SEARCH_STEPS):
            cand = pos + (1 << (SEARCH_STEPS - 1 - s))
            ok = cand < N
            b = tl.load(bp_row + cand, mask=chan_ok & ok, other=float("inf"))
            pos = tl.where(ok & (x >= b), cand, pos)
        k = pos + 1
    is_left = x < left
    is_right = x >= right
    k = tl.where(is_left, 0, tl.where(is_right, N + 1, k))
    return k, is_left, is_right, left, right


@triton.jit
def _npwlu_forward_kernel(
    x_ptr,
    y_ptr,
    slopes_ptr,
    intercepts_ptr,
    bp_ptr,
    shift_ptr,
    outer,
    num_channels,
    inner,
    N: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_O)
    cols = tl.arange(0, BLOCK_K)
    pid = tl.program_id(0)  # a 1-D grid of tiles, as PWLU's forward
    if CHANNELS_LAST:
        # one program per (outer-block, channel-block) tile of the (outer, C) matrix
        channel_blocks = tl.cdiv(num_channels, BLOCK_K)
        o0 = (pid // channel_blocks).to(tl.int64) * BLOCK_O
        c0 = (pid % channel_blocks) * BLOCK_K
        chan = (c0 + cols)[None, :]
        chan_ok = chan < num_channels
        mask = (rows[:, None] < tl.minimum(outer - o0, BLOCK_O).to(tl.int32)) & chan_ok
        base = o0 * num_channels + c0
        if BLOCK_O == 1:
            local = cols[None, :]
        else:
            local = rows[:, None] * num_channels + cols[None, :]
    else:
        # one program per (outer-block, inner-block) tile of channel c
        inner_blocks = tl.cdiv(inner, BLOCK_K)
        tiles = tl.cdiv(outer, BLOCK_O) * inner_blocks
        chan = pid // tiles
        chan_ok = chan < num_channels
        tile = pid % tiles
        o0 = (tile // inner_blocks).to(tl.int64) * BLOCK_O
        i0 = (tile % inner_blocks) * BLOCK_K
        mask = (rows[:, None] < tl.minimum(outer - o0, BLOCK_O).to(tl.int32)) & (cols[None, :] < inner - i0)
        base = (o0 * num_channels + chan) * inner + i0
        if BLOCK_O == 1:
            local = cols[None, :]
        else:
            local = rows[:, None] * (num_channels * inner) + cols[None, :]
    shift = tl.load(shift_ptr + chan, mask=chan_ok, other=0.0)
    x = tl.load(x_ptr + base + local, mask=mask, other=0.0).to(slopes_ptr.dtype.element_ty)
    k, is_left, is_right, left, right = _npwlu_region(x, bp_ptr, chan, chan_ok, N, SEARCH_STEPS)
    table = chan * (N + 2) + k
    a = tl.load(slopes_ptr + table, mask=mask, other=0.0)
    b = tl.load(intercepts_ptr + table, mask=mask, other=0.0)
    # y = a[k] * (x - shift) + b[k]; a flat outer piece maps ±inf (x, or an overflowing x - shift) to b
    d = x - shift
    y = a * d + b
    y = tl.where((tl.abs(d) == float("inf")) & (a == 0.0), b, y)
    tl.store(y_ptr + base + local, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _npwlu_backward_kernel(
    grad_ptr,
    x_ptr,
    dx_ptr,
    partial_ptr,
    slopes_ptr,
    bp_ptr,
    inv_w_ptr,
    outer,
    num_channels,
    inner,
    N: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
    REGIONS_PAD: tl.constexpr,
    SLOTS: tl.constexpr,
    REGION_LO: tl.constexpr,
    REGION_HI: tl.constexpr,
    STORE_DX: tl.constexpr,
):
    # PWLU's backward layout (pwlu.ops.triton_backend._pwlu_backward_kernel): SLOTS threads, each
    # with its own register histogram acc[region, slot] over regions [REGION_LO, REGION_HI)
    compute_ty = slopes_ptr.dtype.element_ty
    slot = tl.arange(0, SLOTS)
    regions = REGION_LO + tl.arange(0, REGIONS_PAD)[:, None]
    real = regions < REGION_HI
    if CHANNELS_LAST:
        # program (cb, p) loops over outer blocks p, p + P, ...
        c0 = tl.program_id(0) * BLOCK_K
        chan = c0 + slot % BLOCK_K
        chan_ok = chan < num_channels
        num_tiles = tl.cdiv(outer, BLOCK_O)
        row_stride = num_channels
        cols_left = num_channels - c0
    else:
        # program (c, p) loops over (outer, inner) tiles p, p + P, ... of channel c
        chan = tl.program_id(0)
        chan_ok = chan < num_channels
        inner_blocks = tl.cdiv(inner, BLOCK_K)
        num_tiles = tl.cdiv(outer, BLOCK_O) * inner_blocks
        row_stride = num_channels * inner
    acc_g = tl.zeros([REGIONS_PAD, SLOTS], dtype=compute_ty)
    acc_r = tl.zeros([REGIONS_PAD, SLOTS], dtype=compute_ty)

    zero = tl.program_id(1).to(tl.int64) * 0
    for tile_id in range(tl.program_id(1), num_tiles, tl.num_programs(1)):
        if CHANNELS_LAST:
            o0 = (zero + tile_id) * BLOCK_O
            base = o0 * num_channels + c0
        else:
            o0 = (zero + tile_id // inner_blocks) * BLOCK_O
            i0 = (tile_id % inner_blocks) * BLOCK_K
            base = (o0 * num_channels + chan) * inner + i0
            cols_left = inner - i0
        rows_left = tl.minimum(outer - o0, BLOCK_O).to(tl.int32)
        for e in tl.static_range(BLOCK_O * BLOCK_K // SLOTS):
            f = e * SLOTS + slot
            row = f // BLOCK_K
            col = f % BLOCK_K
            mask = (row < rows_left) & (col < cols_left)
            if BLOCK_O == 1:
                local = col
            else:
                local = row * row_stride + col
            x = tl.load(x_ptr + base + local, mask=mask, other=0.0).to(compute_ty)
            g = tl.load(grad_ptr + base + local, mask=mask, other=0.0).to(compute_ty)
            k, is_left, is_right, left, right = _npwlu_region(x, bp_ptr, chan, chan_ok, N, SEARCH_STEPS)
            if STORE_DX:
                # dy/dx = slope of region k
                a = tl.load(slopes_ptr + chan * (N + 2) + k, mask=mask, other=0.0)
                tl.store(dx_ptr + base + local, (g * a).to(dx_ptr.dtype.element_ty), mask=mask)
            # local coordinate r: x - B_L (left), x - B_R (right), t = (x - b_j) / w_j (interval j = k - 1)
            j = tl.minimum(tl.maximum(k - 1, 0), N - 1)
            b_j = tl.load(bp_ptr + chan * (N + 1) + j, mask=mask, other=0.0)
            inv_w = tl.load(inv_w_ptr + chan * N + j, mask=mask, other=0.0)
            r = tl.where(is_left, x - left, tl.where(is_right, x - right, (x - b_j) * inv_w))
            g = tl.where(mask, g, 0.0)
            gr = tl.where(mask, g * r, 0.0)
            hit = (regions == k[None, :]) & real
            acc_g = tl.where(hit, acc_g + g[None, :], acc_g)
            acc_r = tl.where(hit, acc_r + gr[None, :], acc_r)

    # partial[p, c, k, 0/1] = (sum g, sum g * r) over the elements of program p = program_id(1)
    row0 = tl.program_id(1).to(tl.int64) * num_channels
    if CHANNELS_LAST:
        if SLOTS == BLOCK_K:
            hist_g = acc_g
            hist_r = acc_r
        else:  # slots s, s + BLOCK_K, ... hold the same channel
            hist_g = tl.sum(tl.reshape(acc_g, [REGIONS_PAD, SLOTS // BLOCK_K, BLOCK_K]), axis=1)
            hist_r = tl.sum(tl.reshape(acc_r, [REGIONS_PAD, SLOTS // BLOCK_K, BLOCK_K]), axis=1)
        chans = c0 + tl.arange(0, BLOCK_K)[None, :]
        out = ((row0 + chans) * (N + 2) + regions) * 2
        out_mask = real & (chans < num_channels)
    else:
        hist_g = tl.sum(acc_g, axis=1)[:, None]
        hist_r = tl.sum(acc_r, axis=1)[:, None]
        out = ((row0 + chan) * (N + 2) + regions) * 2
        out_mask = real
    tl.store(partial_ptr + out, hist_g, mask=out_mask)
    tl.store(partial_ptr + out + 1, hist_r, mask=out_mask)


_INTERPRETED = isinstance(_npwlu_forward_kernel, InterpretedFunction)


def is_available(device: torch.device) -> bool:
    """As PWLU's Triton backend: CUDA tensors, CPU tensors under ``TRITON_INTERPRET=1``."""
    return _pwlu_triton_available(device)


def forward(x, slopes, intercepts, breakpoints, shift, channel_dim):
    n = slopes.shape[-1] - 2
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    x = _as_dense(x, y)
    outer, num_channels, inner = _layout(y, channel_dim)
    channels_last = inner == 1 and num_channels > 1
    aligned = x.data_ptr() % 16 == 0 and y.data_ptr() % 16 == 0
    block_o, block_k, num_warps = _forward_blocks(outer, num_channels, inner, aligned)
    grid = _forward_grid(outer, num_channels, inner, block_o, block_k)
    tables = [t.contiguous() for t in (slopes, intercepts, breakpoints, shift)]
    with _device_guard(x):
        _npwlu_forward_kernel[grid](
            x, y, *tables, outer, num_channels, inner,
            N=n, SEARCH_STEPS=_search_steps(n), CHANNELS_LAST=channels_last, BLOCK_O=block_o, BLOCK_K=block_k,
            num_warps=num_warps,
        )  # fmt: skip
    return y


def backward(grad, x, slopes, breakpoints, inv_widths, channel_dim):
    n = slopes.shape[-1] - 2
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx, torch.zeros(slopes.shape[0], n + 2, 2, dtype=slopes.dtype, device=x.device)
    x = _as_dense(x, dx)
    grad = _as_dense(grad.expand_as(x), dx)
    outer, num_channels, inner = _layout(dx, channel_dim)
    channels_last = inner == 1 and num_channels > 1
    block_o, block_k, slots = _backward_blocks(outer, num_channels, inner)
    grid = _backward_grid(outer, num_channels, inner, block_o, block_k, _multiprocessors(x))
    partial = torch.empty(grid[1], num_channels, n + 2, 2, dtype=slopes.dtype, device=x.device)
    tables = [t.contiguous() for t in (slopes, breakpoints, inv_widths)]
    per_pass = _REGIONS_PER_PASS_F64 if slopes.dtype == torch.float64 else _REGIONS_PER_PASS
    with _device_guard(x):
        for lo, hi in _region_passes(n, per_pass):
            _npwlu_backward_kernel[grid](
                grad, x, dx, partial, *tables, outer, num_channels, inner,
                N=n, SEARCH_STEPS=_search_steps(n), CHANNELS_LAST=channels_last, BLOCK_O=block_o, BLOCK_K=block_k,
                REGIONS_PAD=triton.next_power_of_2(hi - lo), SLOTS=slots, REGION_LO=lo, REGION_HI=hi,
                STORE_DX=lo == 0, num_warps=max(1, slots // 32),
            )  # fmt: skip
    return dx, partial.sum(0)


class NPWLUTritonBackend:
    """The Triton N-PWLU backend (:class:`pwlu.ops.npwlu_backends.NPWLUBackend`)."""

    name = "triton"
    forward = staticmethod(forward)
    backward = staticmethod(backward)
    is_available = staticmethod(is_available)
    make_plan = None


BACKEND = NPWLUTritonBackend()
