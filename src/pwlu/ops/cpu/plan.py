"""Inference plans: a PWLU forward prepared once per input geometry (folded tables and kernel
arguments in a C struct), checked on every call."""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from .. import common
from .backend import _dense_order, _fused_ok, _kernel_dtype, _layout, _num_threads, _tables, fold_tables
from .build import library


class _PlanArgs(ctypes.Structure):
    """``pwlu_plan`` of ``csrc/pwlu_cpu.c``: the kernel arguments other than x and y."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("dt", "outer", "C", "inner", "n", "nthreads")),
        *((name, ctypes.c_void_p) for name in ("sl", "ic", "lo", "ro", "iv", "sh")),
        ("live", ctypes.c_void_p * 5),  # the five parameter tensors' data
        ("snap", ctypes.c_void_p * 5),  # the copies the tables were folded from
        ("bytes", ctypes.c_int64 * 5),
    ]


class InferencePlan:
    """One PWLU's forward for one input geometry, prepared once: the folded tables, the
    kernel's arguments in a C struct. Calling it costs one check that it still fits and one
    native call with three arguments, where the general path spends ~10 us of Python per call
    (validation, layout, dispatch, folding), which on the small feature maps of a MobileNet
    is as much as the kernel itself.

    It is only used where the general path would compute exactly the same thing: gradients
    disabled, the same parameter tensors (identity and storage, checked here) holding the same
    bytes as the snapshot the tables were folded from (compared in C before every call, so an
    optimizer step, ``load_state_dict``, ``.data =`` or an in-place write through ``.data``,
    which bumps no version counter, all rebuild it), the same input shape, strides, dtype and
    device, the same backend setting and thread count. ``__call__`` returns ``None`` when
    anything differs, and the caller takes the general path (which makes a new plan).
    """

    __slots__ = ("params", "key", "shape", "stride", "dtype", "backend", "threads", "run", "struct", "tables")

    def __init__(self, x: Tensor, params: tuple[Tensor, ...], run, struct: _PlanArgs, tables: list[Tensor], backend: str):
        self.params = params
        self.key = self._param_key(params)
        self.shape, self.stride, self.dtype = x.shape, x.stride(), x.dtype
        self.backend = backend
        self.threads = torch.get_num_threads()
        self.run, self.struct = run, ctypes.addressof(struct)
        self.tables = (tables, struct)  # keeps the tables and the struct the pointers point to alive

    @staticmethod
    def _param_key(params: tuple[Tensor, ...]) -> tuple:
        """Where the parameters' data lives (the C side reads it: never through a stale pointer)."""
        p0, p1, p2, p3, p4 = params
        return (p0.data_ptr(), p1.data_ptr(), p2.data_ptr(), p3.data_ptr(), p4.data_ptr())

    def __reduce__(self):  # native pointers: copying or pickling a module drops its plan
        return (_no_plan, ())

    def __call__(self, x: Tensor, params: tuple[Tensor, ...], backend: str) -> Tensor | None:
        """``y`` for input ``x``, or ``None`` when this plan does not fit the call."""
        mine = self.params
        if not (
            x.shape == self.shape and x.stride() == self.stride and x.dtype == self.dtype and x.is_cpu
            and params[0] is mine[0] and params[1] is mine[1] and params[2] is mine[2] and params[3] is mine[3]
            and params[4] is mine[4] and backend == self.backend and self._param_key(mine) == self.key
            and torch.get_num_threads() == self.threads
        ):  # fmt: skip
            return None
        y = torch.empty_like(x)
        if self.run(self.struct, x.data_ptr(), y.data_ptr()) != 0:
            return None  # the parameters' values changed since the tables were folded
        return y


def _no_plan() -> None:
    return None


def inference_plan(x, points, left_bound, right_bound, left_slope, right_slope, channel_dim, backend: str):
    """An :class:`InferencePlan` for this call (arguments as validated by
    :func:`pwlu.ops.validation.check_params`), or ``None`` where none applies (a layout that
    needs a copy, fp16 without F16C, an empty input, non-contiguous parameters)."""
    lib = library()
    if lib is None or not _fused_ok(x, lib) or x.numel() == 0:
        return None
    originals = (points, left_bound, right_bound, left_slope, right_slope)
    if not all(p.is_contiguous() for p in originals):
        return None  # compared byte for byte on every call: only dense parameters
    order = _dense_order(x)
    if order is None or torch.empty_like(x).stride() != x.stride():
        return None
    _, _, (outer, channels, inner) = _layout(x, channel_dim)
    n = points.shape[-1] - 1
    tables = _tables(*fold_tables(*common.channel_form(*originals, common.compute_dtype(x.dtype))))
    snapshots = [p.detach().clone() for p in originals]
    struct = _PlanArgs(
        _kernel_dtype(x, lib), outer, channels, inner, n, _num_threads(x.numel()), *(t.data_ptr() for t in tables),
        (ctypes.c_void_p * 5)(*(p.data_ptr() for p in originals)),
        (ctypes.c_void_p * 5)(*(p.data_ptr() for p in snapshots)),
        (ctypes.c_int64 * 5)(*(p.numel() * p.element_size() for p in originals)),
    )  # fmt: skip
    return InferencePlan(x, originals, lib.pwlu_forward_plan, struct, [*tables, *snapshots], backend)


