"""Compiled CPU backend: a small plain-C kernel (``csrc/``, entry ``pwlu_cpu.c``) built on first use.

Same interface as ``torch_backend.py`` (which defines the semantics)::

    forward(x, slopes, intercepts, left, right, inv_d, channel_dim, shift) -> y
    backward(grad, x, slopes, left, right, inv_d, channel_dim) -> (dx, hist)

plus the entry points :mod:`pwlu.ops.autograd` prefers, which take the raw parameters and do
the folding (and, backward, the exact parameter gradients from the histogram, in double) in
the same C call, because on small tensors the ~20 torch ops of folding and the ~30 of the
gradient epilogue cost more than the kernel::

    forward_from_params(x, points, left_bound, right_bound, left_slope, right_slope, channel_dim) -> y
    backward_from_params(grad, x, points, ..., channel_dim) -> (dx, (d_points, d_left_bound, ...))

How it works. On the first call the C sources are compiled with the system C compiler and
cached (:mod:`pwlu.ops.cpu.build`: compiler, flags, cache, loading; ctypes releases the GIL
during the call). Where no compiler exists or the build fails, :func:`is_available` returns
``False`` after one warning, and dispatch falls back to the torch backend, so
``pip install pwlu`` never needs a compiler. Every kernel returns a code that
:func:`pwlu.ops.cpu.build.check` turns into an exception (``MemoryError`` when a scratch
buffer could not be allocated).

The kernel views x as ``(outer, C, inner)`` in memory order (any dense layout: NCHW,
channels-last, ``(B, T, C)`` with ``channel_dim=-1``; other strides are copied once with
``.contiguous()``), and returns ``y``/``dx`` with x's memory format. One pass forward
(read x, write y) and one pass backward (read x and g, write dx), the same traffic as
ReLU. With AVX-512 the 16-lane loop finds the region with one subtract, one multiply and
two compares and looks the slope and intercept up in registers (``vpermt2ps`` over the
``N + 2 <= 32`` entries of the channel; a gather beyond that); fp16/bf16 are loaded and
stored in their dtype and computed in fp32 (F16C conversion; bf16 by bit shifts, round to
nearest even). The parameter-gradient histogram uses lane-private accumulators, one
compare and two masked adds per region and 16 elements (float for at most ``LANE_TERMS``
terms per lane, then double), per thread over a static partition, reduced in a fixed order: the
parameter gradients are bit-identical run to run for a fixed thread count
(``torch.get_num_threads()``, or one thread below :data:`GRAIN_SIZE` elements). Where the
channels are the fastest axis (channels-last, ``(B, T, C)``) lanes are channels: the
histogram is the same lane-private one; the forward transposes 16x16 tiles (16 rows x 16
channels) in registers so that it can use the in-register lookup, and the backward looks dx's
slope up on the transposed tile of the regions (any C and row count: partial tiles at the
edges; each tile prefetches its channel block's lines of the next 16 rows, which the hardware
prefetcher misses; a gather where ``N + 2 > 32``). Rows shorter than ``SHORT_SEG`` elements
(small feature maps) go channel by channel, each channel's tables loaded once for all its rows
(forward: under ``SHORT_ROW``), and the
backward adds each element's region, g and g*r into that channel's double bins, from one
thread per channel (no partial histograms). Without AVX-512 but with AVX2, FMA and F16C (AMD
Zen 2/3, most Intel client cores) 8-lane kernels do the same (``csrc/pwlu_avx2.h``: tables in
up to four registers, ``vpermps``; 8x8 tiles where the channels are fastest; the histogram
scattered into double bins); elsewhere, and for fp64, a portable scalar loop is used. (The
constants named here are in ``csrc/pwlu_common.h``.)

Gradient-free calls with ``nn.Parameter`` tensors go through an inference plan
(:class:`pwlu.ops.cpu.plan.InferencePlan`, kept by :mod:`pwlu.ops.plans`): folded tables and
kernel arguments prepared once per call geometry; before each call the C side compares the parameters byte for byte with
the snapshot the tables were folded from, so a plan can never run with stale tables.

The alternatives measured against this kernel (the eager vectorised-torch backend,
``torch.compile`` of the same code, scalar scatter histograms into double bins) and the
timings behind these choices are in ``benchmarks/results/cpu_backend_choice.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import folding
from .build import _DTYPE_CODES, GRAIN_SIZE, check, is_available, library

__all__ = ["backward", "backward_from_params", "fold_tables", "forward", "forward_from_params", "is_available"]


def _dense_order(x: Tensor) -> list[int] | None:
    """A permutation ``p`` with ``x.permute(p)`` contiguous (memory order, outermost first), else ``None``."""
    if x.is_contiguous():
        return list(range(x.dim()))
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))
    return order if x.permute(order).is_contiguous() else None


def _layout(x: Tensor, channel_dim: int | None) -> tuple[Tensor, list[int], tuple[int, int, int]]:
    """x (made dense if needed), its memory order and its ``(outer, C, inner)`` view."""
    order = _dense_order(x)
    if order is None:
        x = x.contiguous()
        order = list(range(x.dim()))
    if channel_dim is None:
        return x, order, (1, 1, x.numel())
    sizes = [x.shape[d] for d in order]
    pos = order.index(channel_dim)
    outer = 1
    for s in sizes[:pos]:
        outer *= s
    inner = 1
    for s in sizes[pos + 1 :]:
        inner *= s
    return x, order, (outer, sizes[pos], inner)


def _like(x: Tensor, order: list[int]) -> Tensor:
    """An uninitialised tensor shaped like x with the same memory order."""
    out = torch.empty_like(x)
    if not (out.is_contiguous() if order == sorted(order) else out.permute(order).is_contiguous()):
        perm_shape = [x.shape[d] for d in order]
        out = torch.empty(perm_shape, dtype=x.dtype, device=x.device).permute(_inverse(order))
    return out


def _inverse(order: list[int]) -> list[int]:
    inv = [0] * len(order)
    for i, d in enumerate(order):
        inv[d] = i
    return inv


def _in_order(t: Tensor, order: list[int]) -> Tensor:
    """``t`` laid out in ``order`` (a copy only when it is not already)."""
    if t.permute(order).is_contiguous():
        return t
    return t.permute(order).contiguous().permute(_inverse(order))


def _num_threads(numel: int) -> int:
    return 1 if numel < GRAIN_SIZE else torch.get_num_threads()


def _tables(*tables: Tensor) -> list[Tensor]:
    return [t.detach().contiguous() for t in tables]


def _kernel_dtype(x: Tensor) -> int:
    if x.dtype not in _DTYPE_CODES:
        raise TypeError(f"pwlu cpu backend: unsupported dtype {x.dtype}")
    return _DTYPE_CODES[x.dtype]


def fold_tables(points, left_bound, right_bound, left_slope, right_slope):
    """:func:`pwlu.ops.folding.fold_tables` in C (not differentiable): one call instead of ~20
    small torch ops, which dominate the cost of a PWLU on small tensors."""
    if points.dtype not in (torch.float32, torch.float64):
        return folding.fold_tables(points, left_bound, right_bound, left_slope, right_slope)
    lib = library()
    num_channels, n = points.shape[0], points.shape[1] - 1
    params = [t.detach().contiguous() for t in (points, left_bound, right_bound, left_slope, right_slope)]
    out = torch.empty(2 * num_channels * (n + 2) + 4 * num_channels, dtype=points.dtype)
    fn = lib.pwlu_fold_f64 if points.dtype == torch.float64 else lib.pwlu_fold_f32
    check(fn(*(t.data_ptr() for t in params), num_channels, n, folding.MIN_WIDTH, out.data_ptr()), fn.__name__)
    size = num_channels * (n + 2)
    rest = out[2 * size :].view(4, num_channels)
    return out[:size].view(num_channels, n + 2), out[size : 2 * size].view(num_channels, n + 2), *rest.unbind(0)


def _available_library():
    lib = library()
    if lib is None:
        raise RuntimeError("pwlu: the cpu backend was used while unavailable")
    return lib


def forward(x, slopes, intercepts, left, right, inv_d, channel_dim, shift):
    lib = _available_library()
    if x.dtype == torch.float16 and not lib.pwlu_cpu_has_f16():
        return forward(x.float(), slopes, intercepts, left, right, inv_d, channel_dim, shift).half()
    x, order, (outer, channels, inner) = _layout(x, channel_dim)
    y = _like(x, order)
    if x.numel() == 0:
        return y
    n = slopes.shape[-1] - 2
    slopes, intercepts, left, right, inv_d, shift = _tables(slopes, intercepts, left, right, inv_d, shift)
    fn = lib.pwlu_forward_f64 if x.dtype == torch.float64 else lib.pwlu_forward_f32c
    if slopes.dtype != (torch.float64 if x.dtype == torch.float64 else torch.float32):
        raise TypeError(f"pwlu cpu backend: {slopes.dtype} tables for a {x.dtype} input")
    rc = fn(
        x.data_ptr(), y.data_ptr(), _kernel_dtype(x), outer, channels, inner,
        slopes.data_ptr(), intercepts.data_ptr(), left.data_ptr(), right.data_ptr(), inv_d.data_ptr(),
        shift.data_ptr(), n, _num_threads(x.numel()),
    )  # fmt: skip
    check(rc, fn.__name__)
    return y


def _raw_params(x: Tensor, params) -> list[Tensor]:
    """The five parameters in x's compute dtype, contiguous (no copy when they already are)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return [p if p.dtype == dtype and p.is_contiguous() else p.detach().to(dtype).contiguous() for p in params]


def _fused_ok(x: Tensor, lib) -> bool:
    return x.dtype != torch.float16 or bool(lib.pwlu_cpu_has_f16())


def forward_from_params(x, points, left_bound, right_bound, left_slope, right_slope, channel_dim):
    """Fold and forward in one C call, from the parameters (shapes as validated by
    :func:`pwlu.ops.validation.check_params`); ``None`` where this path does not apply."""
    lib = library()
    if lib is None or not _fused_ok(x, lib):
        return None
    params = _raw_params(x, (points, left_bound, right_bound, left_slope, right_slope))
    x, order, (outer, channels, inner) = _layout(x, channel_dim)
    y = _like(x, order)
    if x.numel() == 0:
        return y
    fn = lib.pwlu_fold_forward_f64 if x.dtype == torch.float64 else lib.pwlu_fold_forward_f32c
    rc = fn(
        *(t.data_ptr() for t in params), folding.MIN_WIDTH, x.data_ptr(), y.data_ptr(), _kernel_dtype(x),
        outer, channels, inner, points.shape[-1] - 1, _num_threads(x.numel()),
    )  # fmt: skip
    check(rc, fn.__name__)
    return y


def backward_from_params(grad, x, points, left_bound, right_bound, left_slope, right_slope, channel_dim):
    """``(dx, (d_points, d_left_bound, d_right_bound, d_left_slope, d_right_slope))`` in one C
    call (fold, kernel, gradient epilogue in double); ``None`` where this path does not apply."""
    lib = library()
    if lib is None or not _fused_ok(x, lib):
        return None
    originals = (points, left_bound, right_bound, left_slope, right_slope)
    params = _raw_params(x, originals)
    n = points.shape[-1] - 1
    x, order, (outer, channels, inner) = _layout(x, channel_dim)
    grad = _in_order(grad.to(x.dtype).expand_as(x), order)
    dx = _like(x, order)
    # each gradient in its own tensor, written by the kernel (in the compute dtype)
    grads = [torch.empty(p.shape, dtype=params[0].dtype) for p in originals]
    fn = lib.pwlu_fold_backward_f64 if x.dtype == torch.float64 else lib.pwlu_fold_backward_f32c
    rc = fn(
        *(t.data_ptr() for t in params), folding.MIN_WIDTH, grad.data_ptr(), x.data_ptr(), dx.data_ptr(),
        _kernel_dtype(x), outer, channels, inner, n, _num_threads(x.numel()), *(g.data_ptr() for g in grads),
    )  # fmt: skip
    check(rc, fn.__name__)
    return dx, tuple(g if g.dtype == p.dtype else g.to(p.dtype) for g, p in zip(grads, originals))


def backward(grad, x, slopes, left, right, inv_d, channel_dim):
    lib = _available_library()
    if x.dtype == torch.float16 and not lib.pwlu_cpu_has_f16():
        dx, hist = backward(grad.float(), x.float(), slopes, left, right, inv_d, channel_dim)
        return dx.half(), hist
    n = slopes.shape[-1] - 2
    num_channels = slopes.shape[0]
    x, order, (outer, channels, inner) = _layout(x, channel_dim)
    grad = _in_order(grad.to(x.dtype).expand_as(x), order)
    dx = _like(x, order)
    hist = torch.zeros(num_channels, n + 2, 2, dtype=torch.float64)
    if x.numel() > 0:
        slopes, left, right, inv_d = _tables(slopes, left, right, inv_d)
        fn = lib.pwlu_backward_f64 if x.dtype == torch.float64 else lib.pwlu_backward_f32c
        rc = fn(
            grad.data_ptr(), x.data_ptr(), dx.data_ptr(), _kernel_dtype(x), outer, channels, inner,
            slopes.data_ptr(), left.data_ptr(), right.data_ptr(), inv_d.data_ptr(),
            n, _num_threads(x.numel()), hist.data_ptr(),
        )  # fmt: skip
        check(rc, fn.__name__)
    return dx, hist.to(slopes.dtype)
