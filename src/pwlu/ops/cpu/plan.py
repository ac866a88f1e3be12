"""Inference plans: a PWLU forward prepared once per call geometry, and the cache that keeps them.

A plan holds the folded tables and the kernel's arguments in a C struct. Calling it costs one
check that it still fits and one native call with three arguments, where the general path
spends several microseconds of Python per call (validation, layout, dispatch, folding): on
the small feature maps of a MobileNet that is as much as the kernel itself.

Plans are kept per parameter set (the five tensors, held by weak reference: a plan never
keeps a module's parameters alive), up to :data:`MAX_PLANS` per set, keyed on everything that
changes the result: the input's shape, strides, dtype and device, ``channel_dim``, the backend
setting and the thread count. A plan is only made for ``nn.Parameter`` tensors (a module's
parameters, reused call after call) and plain CPU tensors as input. Before every call the C
side compares the parameters byte for byte with the snapshot the tables were folded from, so
an optimizer step, ``load_state_dict``, ``.data =`` or an in-place write through ``.data``
(which bumps no version counter) all make the caller fall back to the general path, which
makes a new plan.
"""

from __future__ import annotations

import ctypes
import threading
import weakref

import torch
from torch import Tensor, nn

from .. import folding
from .backend import _dense_order, _fused_ok, _layout, _num_threads, _tables, fold_tables
from .build import _DTYPE_CODES, library

#: Plans kept per parameter set (one per input geometry); the oldest goes first.
MAX_PLANS = 8


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
        self.ptrs = _data_ptrs(params)
        self.run, self.struct = run, ctypes.addressof(struct)
        self.keep = (keep, struct)  # the tables, snapshots and struct the pointers point to

    def __reduce__(self):  # native pointers: never copied or pickled
        raise TypeError("an InferencePlan holds native pointers and cannot be copied or pickled")

    def __call__(self, x: Tensor, params: tuple[Tensor, ...]) -> Tensor | None:
        """``y``, or ``None`` when the parameters moved or changed since the tables were folded."""
        if _data_ptrs(params) != self.ptrs:
            return None
        y = torch.empty_like(x)
        if self.run(self.struct, x.data_ptr(), y.data_ptr()) != 0:
            return None  # the parameters' bytes differ from the snapshot
        return y


def _data_ptrs(params: tuple[Tensor, ...]) -> tuple[int, ...]:
    p0, p1, p2, p3, p4 = params
    return (p0.data_ptr(), p1.data_ptr(), p2.data_ptr(), p3.data_ptr(), p4.data_ptr())


class _ParamPlans:
    """The plans of one parameter set, by call key."""

    __slots__ = ("refs", "plans")

    def __init__(self, params: tuple[Tensor, ...]) -> None:
        self.refs = tuple(weakref.ref(p) for p in params)
        self.plans: dict[tuple, InferencePlan] = {}

    def holds(self, params: tuple[Tensor, ...]) -> bool:
        r0, r1, r2, r3, r4 = self.refs
        p0, p1, p2, p3, p4 = params
        return r0() is p0 and r1() is p1 and r2() is p2 and r3() is p3 and r4() is p4


#: ``id(points) -> _ParamPlans``; an entry goes when its ``points`` tensor is freed.
_CACHE: dict[int, _ParamPlans] = {}
_lock = threading.Lock()


def _key(x: Tensor, channel_dim: int | None, setting: str) -> tuple:
    # everything besides the parameters that changes what the plan computes or how (threads);
    # the device is always the CPU (plans are only made for CPU tensors)
    return (x.shape, x.stride(), x.dtype, channel_dim, setting, torch.get_num_threads())


def planned_forward(
    x: Tensor,
    params: tuple[Tensor, ...],
    channel_dim: int,
    setting: str,
    create: bool = False,
    normalized_channel_dim: int | None = None,
) -> Tensor | None:
    """The forward through a cached plan, or ``None`` (see :class:`pwlu.ops.dispatch.PWLUBackend`).

    ``channel_dim`` is the caller's, as given (with x's shape it fixes the normalised axis).
    ``create=False``: answer only from an existing plan for these exact parameter tensors (it
    was made from validated arguments with the same key, so none need validating again).
    ``create=True``: the arguments are validated and ``normalized_channel_dim`` is what
    :func:`pwlu.ops.validation.check_params` returned; make a plan if none fits.
    """
    entry = _CACHE.get(id(params[0]))
    if entry is not None and type(x) is Tensor:  # subclasses (DTensor, Parameter...) take the general path
        plan = entry.plans.get((x.shape, x.stride(), x.dtype, channel_dim, setting, torch.get_num_threads()))
        if plan is not None and entry.holds(params):
            y = plan(x, params)
            if y is not None:
                return y
    if not create or type(x) is not Tensor or not x.is_cpu:
        return None
    if not all(type(p) is nn.Parameter for p in params):
        return None
    plan = _make_plan(x, params, normalized_channel_dim)
    if plan is None:
        return None
    _remember(params, plan, _key(x, channel_dim, setting))
    return plan(x, params)


def _remember(params: tuple[Tensor, ...], plan: InferencePlan, key: tuple) -> None:
    with _lock:
        points = params[0]
        entry = _CACHE.get(id(points))
        if entry is None or not entry.holds(params):
            entry = _CACHE[id(points)] = _ParamPlans(params)
            weakref.finalize(points, _forget, id(points), entry)
        entry.plans.pop(key, None)
        if len(entry.plans) >= MAX_PLANS:
            entry.plans.pop(next(iter(entry.plans)))
        entry.plans[key] = plan


def _forget(key: int, entry: _ParamPlans) -> None:
    with _lock:
        if _CACHE.get(key) is entry:
            del _CACHE[key]


def clear() -> None:
    """Drop every cached plan."""
    with _lock:
        _CACHE.clear()


def _make_plan(x: Tensor, params: tuple[Tensor, ...], channel_dim: int | None) -> InferencePlan | None:
    """A plan for this call, or ``None`` where none applies (a layout that needs a copy, fp16
    without F16C, an empty input, non-contiguous parameters)."""
    lib = library()
    if lib is None or not x.is_cpu or not _fused_ok(x, lib) or x.numel() == 0:
        return None
    if not all(p.is_contiguous() for p in params):
        return None  # compared byte for byte on every call: only dense parameters
    order = _dense_order(x)
    if order is None or torch.empty_like(x).stride() != x.stride():
        return None
    _, _, (outer, channels, inner) = _layout(x, channel_dim)
    n = params[0].shape[-1] - 1
    tables = _tables(*fold_tables(*folding.channel_form(*params, folding.compute_dtype(x.dtype))))
    snapshots = [p.detach().clone() for p in params]
    struct = _PlanArgs(
        _DTYPE_CODES[x.dtype], outer, channels, inner, n, _num_threads(x.numel()), *(t.data_ptr() for t in tables),
        (ctypes.c_void_p * 5)(*(p.data_ptr() for p in params)),
        (ctypes.c_void_p * 5)(*(p.data_ptr() for p in snapshots)),
        (ctypes.c_int64 * 5)(*(p.numel() * p.element_size() for p in params)),
    )  # fmt: skip
    return InferencePlan(params, lib.pwlu_forward_plan, struct, [*tables, *snapshots])


def plans_for(params: tuple[Tensor, ...]) -> dict[tuple, InferencePlan]:
    """The plans cached for these five parameter tensors, by call key (for tests and debugging)."""
    entry = _CACHE.get(id(params[0]))
    return dict(entry.plans) if entry is not None and entry.holds(tuple(params)) else {}
