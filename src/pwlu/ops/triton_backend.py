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
Inside a program every thread keeps its own histogram in registers (a region test and two
predicated adds per element and region, no cross-thread reduction until the end); past
N = 64 the regions are histogrammed in several launches. Registers, spills and the cost per
element of both kernels compiled for sm_80/sm_90: ``benchmarks/results/triton_resources.md``
and ``benchmarks/results/triton_cost_model.md``.

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

_FORWARD_TILE = 2048  # elements per forward program (channels-last: half)
_BACKWARD_PER_THREAD = 8  # backward elements per thread and loop iteration
_BACKWARD_SLOTS = 128  # backward threads per program, each with its own histogram
_REGIONS_PER_PASS = 64  # backward: at most this many histogram regions per launch
_REGIONS_PER_PASS_F64 = 24  # the same for float64 accumulators (two registers each)
_MAX_CHANNEL_BLOCK = 64  # channels per tile when the channel axis is the innermost one
_PROGRAMS_PER_SM = 4  # backward programs per streaming multiprocessor
_GRID_LIMITS = (2**31 - 1, 65535, 65535)  # CUDA's limits on grid axes 0, 1 and 2


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
    # a 1-D grid (see _forward_grid): CUDA allows 2**31 - 1 programs on axis 0, 65535 on axes 1 and 2
    pid = tl.program_id(0)
    # offsets: an int64 tile base plus int32 offsets inside the tile (the launcher keeps those
    # below 2**31, see _launch_blocks); fewer registers and instructions than int64 per element
    if CHANNELS_LAST:
        # inner == 1: one program per (outer-block, channel-block) tile of the (outer, C) matrix,
        # program ob * channel_blocks + cb
        channel_blocks = tl.cdiv(num_channels, BLOCK_K)
        o0 = (pid // channel_blocks).to(tl.int64) * BLOCK_O
        c0 = (pid % channel_blocks) * BLOCK_K
        chan = c0 + cols
        chan_ok = chan < num_channels
        mask = (rows[:, None] < tl.minimum(outer - o0, BLOCK_O).to(tl.int32)) & chan_ok[None, :]
        base = o0 * num_channels + c0
        if BLOCK_O == 1:
            local = cols[None, :]
        else:
            local = rows[:, None] * num_channels + cols[None, :]
        left = tl.load(left_ptr + chan, mask=chan_ok, other=0.0)[None, :]
        right = tl.load(right_ptr + chan, mask=chan_ok, other=1.0)[None, :]
        inv_d = tl.load(inv_d_ptr + chan, mask=chan_ok, other=1.0)[None, :]
        shift = tl.load(shift_ptr + chan, mask=chan_ok, other=0.0)[None, :]
        chan = chan[None, :]
    else:
        # one program per (outer-block, inner-block) tile t of channel c: program c * tiles + t
        inner_blocks = tl.cdiv(inner, BLOCK_K)
        tiles = tl.cdiv(outer, BLOCK_O) * inner_blocks
        chan = pid // tiles
        tile = pid % tiles
        o0 = (tile // inner_blocks).to(tl.int64) * BLOCK_O
        i0 = (tile % inner_blocks) * BLOCK_K
        mask = (rows[:, None] < tl.minimum(outer - o0, BLOCK_O).to(tl.int32)) & (cols[None, :] < inner - i0)
        base = (o0 * num_channels + chan) * inner + i0
        if BLOCK_O == 1:
            local = cols[None, :]
        else:
            local = rows[:, None] * (num_channels * inner) + cols[None, :]
        left = tl.load(left_ptr + chan)
        right = tl.load(right_ptr + chan)
        inv_d = tl.load(inv_d_ptr + chan)
        shift = tl.load(shift_ptr + chan)

    x = tl.load(x_ptr + base + local, mask=mask, other=0.0).to(slopes_ptr.dtype.element_ty)
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
    # y = a[k] * (x - shift) + b[k]; a flat outer piece maps ±inf to its constant (not inf * 0 = NaN),
    # also where a finite x - shift overflows
    d = x - shift
    y = a * d + b
    y = tl.where((tl.abs(d) == float("inf")) & (a == 0.0), b, y)
    tl.store(y_ptr + base + local, y.to(y_ptr.dtype.element_ty), mask=mask)


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
    SLOTS: tl.constexpr,
    REGION_LO: tl.constexpr,
    REGION_HI: tl.constexpr,
    STORE_DX: tl.constexpr,
):
    # A BLOCK_O x BLOCK_K tile is walked as rows of SLOTS elements, one element per thread
    # (flat tile index f = e * SLOTS + slot). Each thread keeps its own histogram over the
    # regions, acc[region, slot], held in its registers: a region test and two predicated adds
    # per element and region, no cross-thread reduction until the program's last tile. For
    # channels-last SLOTS is a multiple of BLOCK_K, so a slot always sees the same channel.
    # A launch histograms regions [REGION_LO, REGION_HI): the launcher makes passes of at most
    # 64 regions (2 x 64 accumulators per thread; more would spill), only the first storing dx.
    compute_ty = slopes_ptr.dtype.element_ty
    slot = tl.arange(0, SLOTS)
    regions = REGION_LO + tl.arange(0, REGIONS_PAD)[:, None]
    real = regions < REGION_HI  # padding rows: never hit, folded away by the compiler
    # grid (columns, P), see _backward_grid: column = channel block (channels-last) or channel
    if CHANNELS_LAST:
        # program (cb, p) loops over outer blocks p, p + P, ...
        c0 = tl.program_id(0) * BLOCK_K
        chan = c0 + slot % BLOCK_K
        chan_ok = chan < num_channels
        num_tiles = tl.cdiv(outer, BLOCK_O)
        left = tl.load(left_ptr + chan, mask=chan_ok, other=0.0)
        right = tl.load(right_ptr + chan, mask=chan_ok, other=1.0)
        inv_d = tl.load(inv_d_ptr + chan, mask=chan_ok, other=1.0)
        row_stride = num_channels
        cols_left = num_channels - c0
    else:
        # program (c, p) loops over (outer, inner) tiles p, p + P, ... of channel c
        chan = tl.program_id(0)
        inner_blocks = tl.cdiv(inner, BLOCK_K)
        num_tiles = tl.cdiv(outer, BLOCK_O) * inner_blocks
        left = tl.load(left_ptr + chan)
        right = tl.load(right_ptr + chan)
        inv_d = tl.load(inv_d_ptr + chan)
        row_stride = num_channels * inner  # used only when BLOCK_O > 1 (then < 2**31)
    table_base = chan * (N + 2)
    acc_g = tl.zeros([REGIONS_PAD, SLOTS], dtype=compute_ty)
    acc_r = tl.zeros([REGIONS_PAD, SLOTS], dtype=compute_ty)

    zero = tl.program_id(1).to(tl.int64) * 0
    for tile_id in range(tl.program_id(1), num_tiles, tl.num_programs(1)):
        # int64 tile base, int32 offsets inside the tile (see _launch_blocks)
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
            # region k exactly as in the forward kernel
            u = (x - left) * inv_d
            i_f = tl.floor(u)
            i_f = tl.where(i_f == i_f, i_f, 0.0)
            i_f = tl.minimum(tl.maximum(i_f, 0.0), N - 1.0)
            is_left = x < left
            is_right = x >= right
            k = tl.where(is_left, 0, tl.where(is_right, N + 1, i_f.to(tl.int32) + 1))
            if STORE_DX:
                # dy/dx = slope of region k
                a = tl.load(slopes_ptr + table_base + k, mask=mask, other=0.0)
                tl.store(dx_ptr + base + local, (g * a).to(dx_ptr.dtype.element_ty), mask=mask)
            # local coordinate r: x - B_L (left), x - B_R (right), t = u - i (inner intervals)
            r = tl.where(is_left, x - left, tl.where(is_right, x - right, u - i_f))
            g = tl.where(mask, g, 0.0)
            gr = tl.where(mask, g * r, 0.0)
            # this thread's histogram: add g and g * r into row k of its slot
            hit = (regions == k[None, :]) & real
            acc_g = tl.where(hit, acc_g + g[None, :], acc_g)
            acc_r = tl.where(hit, acc_r + gr[None, :], acc_r)

    # partial[p, c, k, 0/1] = (sum g, sum g * r) over the elements of program p = program_id(1)
    row0 = tl.program_id(1).to(tl.int64) * num_channels
    if CHANNELS_LAST:
        if SLOTS == BLOCK_K:  # a thread per channel: its histogram is the channel's
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
        block_k = min(triton.next_power_of_2(inner), 1024, tile)
        # halve while more than 1/8 of the last inner block would be masked off
        while block_k > 128 and (-inner % block_k) * 8 > inner:
            block_k //= 2
    block_o = max(1, min(tile // block_k, triton.next_power_of_2(outer)))
    return block_o, block_k


def _launch_blocks(outer: int, num_channels: int, inner: int, tile: int) -> tuple[int, int]:
    """:func:`_blocks` as launched: at least 32 elements per tile (a warp's worth), and
    ``BLOCK_O = 1`` where the int32 offsets inside a tile would reach 2**31."""
    block_o, block_k = _blocks(outer, num_channels, inner, tile)
    if block_o * block_k < 32:
        block_o = 32 // block_k
    row_stride = num_channels if inner == 1 and num_channels > 1 else num_channels * inner
    if (block_o - 1) * row_stride + block_k >= 2**31:
        block_o = 1
    return block_o, block_k


def _forward_blocks(outer: int, num_channels: int, inner: int, aligned: bool = True) -> tuple[int, int, int]:
    """``(BLOCK_O, BLOCK_K, num_warps)`` of the forward. A thread's setup (decoding its tile,
    loading the channel's parameters: ~130 instructions) is spread over 16 elements when its
    rows are 16-element aligned (``aligned``: the input's address and its row length, ``inner``
    or, channels-last, ``C``, divisible by 16; accesses are then 16-byte vectors); otherwise
    over 8 (channels-last 4), as every element then needs its own mask predicate and at 16
    ptxas spills on sm_90 (benchmarks/results/triton_resources.md)."""
    channels_last = inner == 1 and num_channels > 1
    if aligned and (num_channels if channels_last else inner) % 16 == 0:
        tile, per_thread = _FORWARD_TILE, 16
    elif channels_last:
        tile, per_thread = _FORWARD_TILE // 2, 4
    else:
        tile, per_thread = _FORWARD_TILE, 8
    block_o, block_k = _launch_blocks(outer, num_channels, inner, tile)
    return block_o, block_k, min(8, max(4, block_o * block_k // (32 * per_thread)))


def _backward_blocks(outer: int, num_channels: int, inner: int) -> tuple[int, int, int]:
    """``(BLOCK_O, BLOCK_K, SLOTS)`` of the backward: SLOTS = 128 threads (4 warps) that each
    keep a histogram in registers, _BACKWARD_PER_THREAD elements per thread and tile (ptxas
    keeps a tile's loads in flight at once). Channels-last: BLOCK_K <= 64 divides SLOTS, so a
    thread always sees one channel and the SLOTS / BLOCK_K threads of a channel are summed at
    the end of the program."""
    block_o, block_k = _launch_blocks(outer, num_channels, inner, _BACKWARD_SLOTS * _BACKWARD_PER_THREAD)
    return block_o, block_k, min(_BACKWARD_SLOTS, block_o * block_k)


def _region_passes(n: int, per_pass: int = _REGIONS_PER_PASS) -> list[tuple[int, int]]:
    """Region ranges ``[lo, hi)`` of the backward's launches: the N + 2 regions in equal passes
    of at most ``per_pass`` (64: one up to N = 62, two for N = 64; float64 accumulators take
    two registers: 24); each further pass reads x and the gradient again, as a thread's
    histogram of more regions would spill its registers."""
    passes = triton.cdiv(n + 2, per_pass)
    size = triton.cdiv(n + 2, passes)
    return [(lo, min(lo + size, n + 2)) for lo in range(0, n + 2, size)]


def _tiles(outer: int, num_channels: int, inner: int, block_o: int, block_k: int) -> tuple[int, int]:
    """``(tiles, columns)``: tiles per column and columns, a column being a channel block
    (channels-last: ``inner == 1`` and ``C > 1``) or a channel (otherwise)."""
    if inner == 1 and num_channels > 1:
        return triton.cdiv(outer, block_o), triton.cdiv(num_channels, block_k)
    return triton.cdiv(outer, block_o) * triton.cdiv(inner, block_k), num_channels


def _check_grid(grid: tuple[int, ...]) -> tuple[int, ...]:
    if any(n > limit for n, limit in zip(grid, _GRID_LIMITS)):
        raise ValueError(f"pwlu triton backend: launch grid {grid} exceeds CUDA's limits {_GRID_LIMITS}")
    return grid


def _forward_grid(outer: int, num_channels: int, inner: int, block_o: int, block_k: int) -> tuple[int]:
    """The forward's grid: one program per tile, all on axis 0 (2**31 - 1 allowed there; the
    channel count on axis 1 would be capped at 65535)."""
    tiles, columns = _tiles(outer, num_channels, inner, block_o, block_k)
    return _check_grid((tiles * columns,))


def _backward_grid(
    outer: int, num_channels: int, inner: int, block_o: int, block_k: int, sms: int | None
) -> tuple[int, int]:
    """The backward's grid ``(columns, P)``: P programs per column, each looping over tiles p,
    p + P, ..., enough programs to fill ``sms`` streaming multiprocessors (``None``: the
    interpreter, two programs, which still test the reduction). Columns go on axis 0 (2**31 - 1
    allowed); P <= _PROGRAMS_PER_SM * sms stays far below axis 1's 65535."""
    tiles, columns = _tiles(outer, num_channels, inner, block_o, block_k)
    target = 2 if sms is None else triton.cdiv(_PROGRAMS_PER_SM * sms, columns)
    return _check_grid((columns, max(1, min(tiles, target))))


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
    aligned = x.data_ptr() % 16 == 0 and y.data_ptr() % 16 == 0
    block_o, block_k, num_warps = _forward_blocks(outer, num_channels, inner, aligned)
    grid = _forward_grid(outer, num_channels, inner, block_o, block_k)
    tables = [t.contiguous() for t in (slopes, intercepts, left, right, inv_d, shift)]
    with _device_guard(x):
        _pwlu_forward_kernel[grid](
            x, y, *tables, outer, num_channels, inner,
            N=n, CHANNELS_LAST=channels_last, BLOCK_O=block_o, BLOCK_K=block_k, num_warps=num_warps,
        )  # fmt: skip
    return y


def _multiprocessors(x: Tensor) -> int | None:
    """Streaming multiprocessors of ``x``'s GPU; ``None`` in the interpreter (CPU tensors)."""
    return torch.cuda.get_device_properties(x.device).multi_processor_count if x.device.type == "cuda" else None


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
    block_o, block_k, slots = _backward_blocks(outer, num_channels, inner)
    grid = _backward_grid(outer, num_channels, inner, block_o, block_k, _multiprocessors(x))
    programs = grid[1]
    # one row of partial histograms per program along the tile axis, summed below
    partial = torch.empty(programs, num_channels, n + 2, 2, dtype=slopes.dtype, device=x.device)
    tables = [t.contiguous() for t in (slopes, left, right, inv_d)]
    with _device_guard(x):
        per_pass = _REGIONS_PER_PASS_F64 if slopes.dtype == torch.float64 else _REGIONS_PER_PASS
        for lo, hi in _region_passes(n, per_pass):
            _pwlu_backward_kernel[grid](
                grad, x, dx, partial, *tables, outer, num_channels, inner,
                N=n, CHANNELS_LAST=channels_last, BLOCK_O=block_o, BLOCK_K=block_k,
                REGIONS_PAD=triton.next_power_of_2(hi - lo), SLOTS=slots, REGION_LO=lo, REGION_HI=hi,
                STORE_DX=lo == 0, num_warps=max(1, slots // 32),
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
