"""2-D PWLU backend: the compiled C kernels of ``cpu/csrc/pwlu2d_cpu.c`` (library ``pwlu2d_cpu``,
built on first use like the PWLU kernels, see :mod:`pwlu.ops.cpu.build`).

Semantics of :mod:`pwlu.ops.pwlu2d_torch_backend`. The inputs are read as dense
``(outer, C, inner)`` buffers in their own memory order (a non-dense input is copied once);
the outputs have the memory order of ``x``. Where the library cannot be built, dispatch
falls back to the torch backend.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from .cpu import build
from .cpu.backend import _in_order, _kernel_dtype, _layout, _like, _num_threads


def _declare(lib: ctypes.CDLL) -> None:
    """The ctypes signatures of ``csrc/pwlu2d_cpu.c``'s exports; each returns a ``PWLU_*`` code."""
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.pwlu2d_forward_f32c.argtypes = [p, p, p, i32, i64, i64, i64, p, p, i32, i32]
    lib.pwlu2d_forward_f64.argtypes = [p, p, p, i64, i64, i64, p, p, i32, i32]
    lib.pwlu2d_backward_f32c.argtypes = [p, p, p, p, p, i32, i64, i64, i64, p, p, i32, i32, p, p]
    lib.pwlu2d_backward_f64.argtypes = [p, p, p, p, p, i64, i64, i64, p, p, i32, i32, p, p]
    for name in ("pwlu2d_forward_f32c", "pwlu2d_forward_f64", "pwlu2d_backward_f32c", "pwlu2d_backward_f64"):
        getattr(lib, name).restype = i32
    lib.pwlu2d_cpu_abi_version.restype = i32
    lib.pwlu2d_cpu_has_f16.restype = i32


#: The 2-D PWLU kernels (``csrc/pwlu2d_cpu.c``).
PWLU2D_CPU = build.NativeLibrary("pwlu2d_cpu", "pwlu2d_cpu.c", declare=_declare)
build.LIBRARIES.append(PWLU2D_CPU)  # reset with the others by build._reset_for_tests


def _inputs(x: Tensor, others: tuple[Tensor, ...], channel_dim: int | None):
    """x dense, the others in x's memory order, the order and the ``(outer, C, inner)`` view."""
    x, order, geometry = _layout(x, channel_dim)
    return x, [_in_order(t.expand_as(x), order) for t in others], order, geometry


def _no_f16(lib, x: Tensor) -> bool:
    """fp16 data on a build without fp16 kernels (no ``_Float16``, no F16C): computed in fp32."""
    return x.dtype == torch.float16 and not lib.pwlu2d_cpu_has_f16()


def forward(x, y, values, geometry, channel_dim):
    lib = PWLU2D_CPU.get()
    if _no_f16(lib, x):
        return forward(x.float(), y.float(), values, geometry, channel_dim).half()
    x, (y,), order, (outer, c, inner) = _inputs(x, (y,), channel_dim)
    z = _like(x, order)
    n = values.shape[-1] - 1
    threads = _num_threads(x.numel())
    values, geometry = values.contiguous(), geometry.contiguous()
    if x.dtype == torch.float64:
        rc = lib.pwlu2d_forward_f64(
            x.data_ptr(),
            y.data_ptr(),
            z.data_ptr(),
            outer,
            c,
            inner,
            values.data_ptr(),
            geometry.data_ptr(),
            n,
            threads,
        )
    else:
        rc = lib.pwlu2d_forward_f32c(
            x.data_ptr(), y.data_ptr(), z.data_ptr(), _kernel_dtype(x), outer, c, inner,
            values.data_ptr(), geometry.data_ptr(), n, threads,
        )  # fmt: skip
    build.check(rc, "pwlu2d_forward")
    return z


def backward(grad, x, y, values, geometry, channel_dim):
    lib = PWLU2D_CPU.get()
    if _no_f16(lib, x):
        dx, dy, hist, sums = backward(grad.float(), x.float(), y.float(), values, geometry, channel_dim)
        return dx.half(), dy.half(), hist, sums
    x, (y, g), order, (outer, c, inner) = _inputs(x, (y, grad.to(x.dtype)), channel_dim)
    dx, dy = _like(x, order), _like(x, order)
    n = values.shape[-1] - 1
    hist = torch.empty(c, n, n, 2, 3, dtype=torch.float64)
    sums = torch.empty(c, 12, dtype=torch.float64)
    threads = _num_threads(x.numel())
    values, geometry = values.contiguous(), geometry.contiguous()
    ptrs = (g.data_ptr(), x.data_ptr(), y.data_ptr(), dx.data_ptr(), dy.data_ptr())
    if x.dtype == torch.float64:
        rc = lib.pwlu2d_backward_f64(
            *ptrs, outer, c, inner, values.data_ptr(), geometry.data_ptr(), n, threads, hist.data_ptr(), sums.data_ptr()
        )
    else:
        rc = lib.pwlu2d_backward_f32c(
            *ptrs, _kernel_dtype(x), outer, c, inner, values.data_ptr(), geometry.data_ptr(), n, threads,
            hist.data_ptr(), sums.data_ptr(),
        )  # fmt: skip
    build.check(rc, "pwlu2d_backward")
    return dx, dy, hist.to(values.dtype), sums.to(values.dtype)


class CPUBackend:
    """The compiled-C 2-D PWLU backend (:class:`pwlu.ops.dispatch.PWLU2DBackend`)."""

    name = "cpu"
    forward = staticmethod(forward)
    backward = staticmethod(backward)

    @staticmethod
    def is_available(device: torch.device) -> bool:
        return torch.device(device).type == "cpu" and PWLU2D_CPU.get() is not None


BACKEND = CPUBackend()
