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
from .cpu.plan import InferencePlan, plannable, snapshot
from .folding import compute_dtype
from .pwlu2d_grads import pwlu2d_geometry


def _declare(lib: ctypes.CDLL) -> None:
    """The ctypes signatures of ``csrc/pwlu2d_cpu.c``'s exports; each returns a ``PWLU_*`` code."""
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.pwlu2d_forward_f32c.argtypes = [p, p, p, i32, i64, i64, i64, p, p, i32, i32]
    lib.pwlu2d_forward_f64.argtypes = [p, p, p, i64, i64, i64, p, p, i32, i32]
    lib.pwlu2d_backward_f32c.argtypes = [p, p, p, p, p, i32, i64, i64, i64, p, p, i32, i32, p, p]
    lib.pwlu2d_backward_f64.argtypes = [p, p, p, p, p, i64, i64, i64, p, p, i32, i32, p, p]
    for name in ("pwlu2d_forward_f32c", "pwlu2d_forward_f64", "pwlu2d_backward_f32c", "pwlu2d_backward_f64"):
        getattr(lib, name).restype = i32
    lib.pwlu2d_forward_plan.argtypes = [p, p, p, p]
    lib.pwlu2d_forward_plan.restype = i32
    lib.pwlu2d_tables_size.argtypes = [i64, i64, i64, i32]
    lib.pwlu2d_tables_size.restype = i64
    lib.pwlu2d_tables.argtypes = [p, i64, i32, p]
    lib.pwlu2d_tables.restype = i32
    lib.pwlu2d_geometry_f32.argtypes = [p, i64, i32, ctypes.c_float, p]
    lib.pwlu2d_geometry_f32.restype = i32
    lib.pwlu2d_param_summary_f32.argtypes = [p, p, i32, p, i32, ctypes.c_float, p]
    lib.pwlu2d_param_summary_f32.restype = i32
    lib.pwlu2d_param_grads_f64.argtypes = [p, p, p, p, i64, i32, ctypes.c_float, p, p]
    lib.pwlu2d_param_grads_f64.restype = i32
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
    return dx, dy, hist, sums  # float64: pwlu2d_param_grads computes in it


class _PlanArgs(ctypes.Structure):
    """``pwlu2d_plan`` of ``csrc/pwlu2d_cpu.c``: the kernel arguments other than x, y and z."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("dt", "outer", "C", "inner", "n", "nthreads")),
        ("values", ctypes.c_void_p),
        ("geometry", ctypes.c_void_p),
        ("tables", ctypes.c_void_p),  # the vector path's tables (pwlu2d_tables), or NULL
        ("live", ctypes.c_void_p * 9),  # the nine parameter tensors' data
        ("snap", ctypes.c_void_p * 9),  # the copies the values and geometry were made from
        ("bytes", ctypes.c_int64 * 9),
    ]


class InferencePlan2D(InferencePlan):
    """One 2-D PWLU forward for one call geometry (:mod:`pwlu.ops.plans`): the packed values and
    geometry made once, the parameters compared with their snapshot in C on every call."""

    __slots__ = ()

    def __call__(self, x: Tensor, y: Tensor) -> Tensor | None:  # type: ignore[override]
        """``z``, or ``None`` when the parameters' bytes differ from the snapshot."""
        z = torch.empty_like(x)
        rc = self.run(self.struct, x.data_ptr(), y.data_ptr(), z.data_ptr())
        if rc != build.OK:
            if rc == build.PLAN_STALE:
                return None
            build.check(rc, "pwlu2d_forward_plan")
        return z


def make_plan(x: Tensor, y: Tensor, params: tuple[Tensor, ...], channel_dim: int | None) -> InferencePlan2D | None:
    """A plan for this gradient-free call (arguments validated, ``channel_dim`` normalised), or
    ``None`` where none applies: x not dense, y not laid out as x, an output that would not be,
    fp16 without fp16 kernels, an empty input, non-contiguous parameters."""
    lib = PWLU2D_CPU.get()
    if lib is None or not plannable(x, params, y) or _no_f16(lib, x):
        return None
    _, _, (outer, c, inner) = _layout(x, channel_dim)
    values, geometry = pwlu2d_geometry(params, compute_dtype(x.dtype))
    n = values.shape[-1] - 1
    size = lib.pwlu2d_tables_size(outer, c, inner, n) if x.dtype != torch.float64 else 0
    tables = torch.empty(size, dtype=torch.float32)
    if size:
        build.check(lib.pwlu2d_tables(values.data_ptr(), c, n, tables.data_ptr()), "pwlu2d_tables")
    *fields, snapshots = snapshot(params)
    struct = _PlanArgs(
        build._DTYPE_CODES[x.dtype], outer, c, inner, n, _num_threads(x.numel()), values.data_ptr(),
        geometry.data_ptr(), tables.data_ptr() if size else None, *fields,
    )  # fmt: skip
    return InferencePlan2D(params, lib.pwlu2d_forward_plan, struct, [values, geometry, tables, *snapshots])


class CPUBackend:
    """The compiled-C 2-D PWLU backend (:class:`pwlu.ops.dispatch.PWLU2DBackend`)."""

    name = "cpu"
    forward = staticmethod(forward)
    backward = staticmethod(backward)
    make_plan = staticmethod(make_plan)

    @staticmethod
    def is_available(device: torch.device) -> bool:
        return torch.device(device).type == "cpu" and PWLU2D_CPU.get() is not None


BACKEND = CPUBackend()
