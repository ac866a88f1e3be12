"""Inference plans of the CPU kernel: a PWLU forward prepared once per call geometry.

A plan holds the folded tables and the kernel's arguments in a C struct. Calling it costs one
native call with three arguments, where the general path spends several microseconds of
Python per call (validation, layout, dispatch, folding): on the small feature maps of a
MobileNet that is as much as the kernel itself. Before every call the C side compares the
parameters byte for byte with the snapshot the tables were folded from, so an optimizer step,
``load_state_dict`` or an in-place write through ``.data`` (which bumps no version counter)
makes the call fall back to the general path. The plans are kept, and looked up, by
:mod:`pwlu.ops.plans`.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from .. import folding, plans
from .backend import _dense_order, _fused_ok, _layout, _num_threads, _tables, fold_tables
from .build import _DTYPE_CODES, OK, PLAN_STALE, check, library


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
    """One PWLU forward for one call geometry, prepared once (see the module docstring)."""

    __slots__ = ("ptrs", "run", "struct", "keep")

    def __init__(self, params: tuple[Tensor, ...], run, struct: _PlanArgs, keep: list[Tensor]) -> None:
        self.ptrs = tuple(map(plans.layout, params))
        self.run, self.struct = run, ctypes.addressof(struct)
        self.keep = (keep, struct)  # the tables, snapshots and struct the pointers point to

    def __reduce__(self):  # native pointers: never copied or pickled
        raise TypeError("an InferencePlan holds native pointers and cannot be copied or pickled")

    def __call__(self, x: Tensor) -> Tensor | None:
        """``y``, or ``None`` when the parameters' bytes differ from the snapshot."""
        y = torch.empty_like(x)
        rc = self.run(self.struct, x.data_ptr(), y.data_ptr())
        if rc != OK:
            if rc == PLAN_STALE:
                return None
            check(rc, "pwlu_forward_plan")
        return y


def plannable(x: Tensor, params: tuple[Tensor, ...], *others: Tensor) -> bool:
    """Whether a plan can serve this call as it is (the checks every CPU ``make_plan`` shares):
    a non-empty CPU ``x`` dense in its own memory order, an output ``empty_like(x)`` laid out as
    ``x``, further inputs laid out as ``x`` and dense parameters (compared byte for byte on every
    call)."""
    if not x.is_cpu or x.numel() == 0 or not all(p.is_contiguous() for p in params):
        return False
    if _dense_order(x) is None or torch.empty_like(x).stride() != x.stride():
        return False
    return all(t.stride() == x.stride() for t in others)


def snapshot(params: tuple[Tensor, ...]) -> tuple[ctypes.Array, ctypes.Array, ctypes.Array, list[Tensor]]:
    """The ``live``, ``snap`` and ``bytes`` fields of a plan struct (C's ``plan_stale``), and the
    snapshot copies the plan must keep alive."""
    k = len(params)
    copies = [p.detach().clone() for p in params]
    return (
        (ctypes.c_void_p * k)(*(p.data_ptr() for p in params)),
        (ctypes.c_void_p * k)(*(p.data_ptr() for p in copies)),
        (ctypes.c_int64 * k)(*(p.numel() * p.element_size() for p in params)),
        copies,
    )


def make_plan(x: Tensor, params: tuple[Tensor, ...], channel_dim: int | None) -> InferencePlan | None:
    """A plan for this call (arguments validated, ``channel_dim`` normalised), or ``None`` where
    none applies (a layout that needs a copy, fp16 without F16C, an empty input, non-contiguous
    parameters)."""
    lib = library()
    if lib is None or not plannable(x, params) or not _fused_ok(x, lib):
        return None
    _, _, (outer, channels, inner) = _layout(x, channel_dim)
    n = params[0].shape[-1] - 1
    tables = _tables(*fold_tables(*folding.channel_form(*params, folding.compute_dtype(x.dtype))))
    *fields, snapshots = snapshot(params)
    struct = _PlanArgs(
        _DTYPE_CODES[x.dtype], outer, channels, inner, n, _num_threads(x.numel()), *(t.data_ptr() for t in tables),
        *fields,
    )  # fmt: skip
    return InferencePlan(params, lib.pwlu_forward_plan, struct, [*tables, *snapshots])
