"""Compiled CPU backend of N-PWLU: ``csrc/npwlu_cpu.c``, its own :class:`~pwlu.ops.cpu.build.NativeLibrary`
(:data:`NPWLU_CPU`), built on first use like PWLU's kernels and sharing their build, cache,
headers (``pwlu_common.h``) and input layout handling (:mod:`pwlu.ops.cpu.backend`).

The Protocol :class:`pwlu.ops.npwlu_backends.NPWLUBackend`::

    forward(x, slopes, intercepts, breakpoints, shift, channel_dim) -> y
    backward(grad, x, slopes, breakpoints, inv_widths, channel_dim) -> (dx, hist)

One pass forward (read x, write y), one pass backward (read x and g, write dx; the per-region
histogram is accumulated on the way, in double across threads). With AVX-512 a 16-lane loop
finds the region with ``N - 1`` compares against the interior breakpoints (plus two for the
bounds) and looks slope and intercept up in registers (``vpermt2ps``, ``N + 2 <= 32``; gathered
beyond). Channels-fastest layouts and float64 use the portable scalar loop. In a training call
the folding and the gradient epilogue run in C too (``csrc/npwlu_fold.h``;
:func:`forward_from_params`, :func:`backward_from_params`), around two torch ops for the
softmax of the width logits: a call on a small tensor took about 0.8-1.2 ms of ~90 small torch
ops before, 0.35-0.7 ms after. Timings: the
``npwluN`` rows of ``benchmarks/bench_activation.py`` (``benchmarks/results/activation_latest.md``).
"""

from __future__ import annotations

import ctypes

import torch

from .cpu import build
from .cpu.backend import _in_order, _kernel_dtype, _layout, _like, _num_threads, _tables
from .cpu.build import NativeLibrary, check
from .cpu.plan import InferencePlan, plannable, snapshot
from .folding import MIN_WIDTH, compute_dtype
from .npwlu_folding import npwlu_channel_form
from .npwlu_reference import MIN_INTERVAL_WIDTH


def _declare(lib: ctypes.CDLL) -> None:
    """The ctypes signatures of ``csrc/npwlu_cpu.c``'s exports (each returns a ``PWLU_*`` code)."""
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name in ("npwlu_forward_f32c", "npwlu_forward_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [p, p, i32, i64, i64, i64, i64, p, p, p, p, i32]
        fn.restype = i32
    for name in ("npwlu_backward_f32c", "npwlu_backward_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [p, p, p, i32, i64, i64, i64, i64, p, p, p, i32, p]
        fn.restype = i32
    d = ctypes.c_double
    for name in ("npwlu_fold_tables_f32", "npwlu_fold_tables_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [p, p, p, p, p, p, i64, i64, d, d, p]
        fn.restype = i32
    for name in ("npwlu_param_grads_f32", "npwlu_param_grads_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [p, p, p, p, p, p, p, p, p, i64, i64, d, d, p, p, p, p, p, p]
        fn.restype = i32
    lib.npwlu_forward_plan.argtypes = [p, p, p]
    lib.npwlu_forward_plan.restype = i32
    lib.npwlu_cpu_has_avx512.restype = i32
    lib.npwlu_cpu_has_f16.restype = i32


#: The N-PWLU kernels (``csrc/npwlu_cpu.c``).
NPWLU_CPU = NativeLibrary("npwlu_cpu", "npwlu_cpu.c", declare=_declare)
if NPWLU_CPU not in build.LIBRARIES:
    build.LIBRARIES.append(NPWLU_CPU)  # reset with the others in tests


def _library():
    lib = NPWLU_CPU.get()
    if lib is None:
        raise RuntimeError("npwlu: the cpu backend was used while unavailable")
    return lib


def forward(x, slopes, intercepts, breakpoints, shift, channel_dim):
    lib = _library()
    if x.dtype == torch.float16 and not lib.npwlu_cpu_has_f16():  # no fp16 storage in this build
        return forward(x.float(), slopes, intercepts, breakpoints, shift, channel_dim).half()
    x, order, (outer, channels, inner) = _layout(x, channel_dim)
    y = _like(x, order)
    if x.numel() == 0:
        return y
    n = slopes.shape[-1] - 2
    slopes, intercepts, breakpoints, shift = _tables(slopes, intercepts, breakpoints, shift)
    fn = lib.npwlu_forward_f64 if x.dtype == torch.float64 else lib.npwlu_forward_f32c
    rc = fn(
        x.data_ptr(), y.data_ptr(), _kernel_dtype(x), outer, channels, inner, n,
        slopes.data_ptr(), intercepts.data_ptr(), breakpoints.data_ptr(), shift.data_ptr(), _num_threads(x.numel()),
    )  # fmt: skip
    check(rc, fn.__name__)
    return y


def backward(grad, x, slopes, breakpoints, inv_widths, channel_dim):
    dx, hist = _backward(grad, x, slopes, breakpoints, inv_widths, channel_dim)
    return dx, hist.to(slopes.dtype)


def _backward(grad, x, slopes, breakpoints, inv_widths, channel_dim):
    """``(dx, hist)``, the histogram in float64 as the kernel accumulates it."""
    lib = _library()
    if x.dtype == torch.float16 and not lib.npwlu_cpu_has_f16():
        dx, hist = _backward(grad.float(), x.float(), slopes, breakpoints, inv_widths, channel_dim)
        return dx.half(), hist
    n = slopes.shape[-1] - 2
    x, order, (outer, channels, inner) = _layout(x, channel_dim)
    grad = _in_order(grad.to(x.dtype).expand_as(x), order)
    dx = _like(x, order)
    hist = torch.zeros(slopes.shape[0], n + 2, 2, dtype=torch.float64)
    if x.numel() > 0:
        slopes, breakpoints, inv_widths = _tables(slopes, breakpoints, inv_widths)
        fn = lib.npwlu_backward_f64 if x.dtype == torch.float64 else lib.npwlu_backward_f32c
        rc = fn(
            grad.data_ptr(), x.data_ptr(), dx.data_ptr(), _kernel_dtype(x), outer, channels, inner, n,
            slopes.data_ptr(), breakpoints.data_ptr(), inv_widths.data_ptr(), _num_threads(x.numel()), hist.data_ptr(),
        )  # fmt: skip
        check(rc, fn.__name__)
    return dx, hist


def _fold_inputs(x, params):
    """The parameters in channel form and x's compute dtype, contiguous and detached, with
    ``omega = softmax(theta)`` and the interior fractions ``cumsum(omega)[:, :N-1]``: the same
    two torch ops as :func:`~pwlu.ops.npwlu_reference.npwlu_breakpoints`, so that the folded
    breakpoints equal the reference's bit for bit."""
    cf = [p.detach().contiguous() for p in npwlu_channel_form(*params, compute_dtype(x.dtype))]
    omega = torch.softmax(cf[1], dim=-1)
    fractions = torch.cumsum(omega[:, :-1], dim=-1)
    return cf, omega, fractions


def _fold(lib, cf, fractions):
    """``(slopes, intercepts, breakpoints, inv_widths, shift)`` folded in C (``csrc/npwlu_fold.h``)."""
    points, _, left, right, left_slope, right_slope = cf
    c, n = points.shape[0], points.shape[1] - 1
    sizes = (c * (n + 2), c * (n + 2), c * (n + 1), c * n, c)
    out = torch.empty(sum(sizes), dtype=points.dtype)
    fn = lib.npwlu_fold_tables_f64 if points.dtype == torch.float64 else lib.npwlu_fold_tables_f32
    rc = fn(
        points.data_ptr(), fractions.data_ptr(), left.data_ptr(), right.data_ptr(), left_slope.data_ptr(),
        right_slope.data_ptr(), c, n, MIN_WIDTH, MIN_INTERVAL_WIDTH, out.data_ptr(),
    )  # fmt: skip
    check(rc, fn.__name__)
    slopes, intercepts, breakpoints, inv_widths, shift = out.split(sizes)
    return slopes.view(c, n + 2), intercepts.view(c, n + 2), breakpoints.view(c, n + 1), inv_widths.view(c, n), shift


def forward_from_params(x, points, width_logits, left_bound, right_bound, left_slope, right_slope, channel_dim):
    """Fold in C and run the forward (validated arguments); ``None`` without the library."""
    lib = NPWLU_CPU.get()
    if lib is None:
        return None
    cf, _, fractions = _fold_inputs(x, (points, width_logits, left_bound, right_bound, left_slope, right_slope))
    slopes, intercepts, breakpoints, _, shift = _fold(lib, cf, fractions)
    return forward(x, slopes, intercepts, breakpoints, shift, channel_dim)


def backward_from_params(grad, x, points, width_logits, left_bound, right_bound, left_slope, right_slope, channel_dim):
    """``(dx, (d_points, d_width_logits, d_left_bound, d_right_bound, d_left_slope, d_right_slope))``:
    fold in C, the backward kernel, then the gradient epilogue in C in double (from the float64
    histogram, not rounded to float first); ``None`` without the library."""
    lib = NPWLU_CPU.get()
    if lib is None:
        return None
    originals = (points, width_logits, left_bound, right_bound, left_slope, right_slope)
    cf, omega, fractions = _fold_inputs(x, originals)
    slopes, _, breakpoints, inv_widths, _ = _fold(lib, cf, fractions)
    dx, hist = _backward(grad, x, slopes, breakpoints, inv_widths, channel_dim)
    grads = [torch.empty(p.shape, dtype=p.dtype) for p in cf]  # each its own tensor: no aliasing
    c, n = cf[0].shape[0], cf[0].shape[1] - 1
    fn = lib.npwlu_param_grads_f64 if cf[0].dtype == torch.float64 else lib.npwlu_param_grads_f32
    rc = fn(
        hist.data_ptr(), cf[0].data_ptr(), omega.data_ptr(), fractions.data_ptr(), *(p.data_ptr() for p in cf[2:]),
        breakpoints.data_ptr(), c, n, MIN_WIDTH, MIN_INTERVAL_WIDTH, *(g.data_ptr() for g in grads),
    )  # fmt: skip
    check(rc, fn.__name__)
    return dx, tuple(g.reshape(p.shape).to(p.dtype) for g, p in zip(grads, originals))


class _PlanArgs(ctypes.Structure):
    """``npwlu_plan`` of ``csrc/npwlu_cpu.c``: the kernel arguments other than x and y."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("dt", "outer", "C", "inner", "n", "nthreads")),
        *((name, ctypes.c_void_p) for name in ("slopes", "intercepts", "bp", "shift")),
        ("live", ctypes.c_void_p * 6),  # the six parameter tensors' data
        ("snap", ctypes.c_void_p * 6),  # the copies the tables were folded from
        ("bytes", ctypes.c_int64 * 6),
    ]


def make_plan(x, params, channel_dim):
    """An inference plan for this gradient-free call (:mod:`pwlu.ops.plans`; arguments
    validated, ``channel_dim`` normalised), or ``None`` where none applies: a layout that needs a
    copy, fp16 without fp16 kernels, an empty input, non-contiguous parameters."""
    lib = NPWLU_CPU.get()
    if lib is None or not plannable(x, params) or (x.dtype == torch.float16 and not lib.npwlu_cpu_has_f16()):
        return None
    _, _, (outer, channels, inner) = _layout(x, channel_dim)
    cf, _, fractions = _fold_inputs(x, params)
    slopes, intercepts, breakpoints, _, shift = _fold(lib, cf, fractions)
    tables = _tables(slopes, intercepts, breakpoints, shift)
    *fields, snapshots = snapshot(params)
    struct = _PlanArgs(
        _kernel_dtype(x), outer, channels, inner, slopes.shape[-1] - 2, _num_threads(x.numel()),
        *(t.data_ptr() for t in tables), *fields,
    )  # fmt: skip
    return InferencePlan(params, lib.npwlu_forward_plan, struct, [*tables, *snapshots])


def is_available(device: torch.device) -> bool:
    """CPU tensors, where the kernel library builds."""
    return torch.device(device).type == "cpu" and NPWLU_CPU.get() is not None


class NPWLUCPUBackend:
    """The C/AVX-512 N-PWLU backend (:class:`pwlu.ops.npwlu_backends.NPWLUBackend`)."""

    name = "cpu"
    forward = staticmethod(forward)
    backward = staticmethod(backward)
    is_available = staticmethod(is_available)
    make_plan = staticmethod(make_plan)
    forward_from_params = staticmethod(forward_from_params)
    backward_from_params = staticmethod(backward_from_params)


BACKEND = NPWLUCPUBackend()
