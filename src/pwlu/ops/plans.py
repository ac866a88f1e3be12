"""Inference plans: a gradient-free forward prepared once per parameter set and call geometry.

A backend that can prepare a call (the CPU kernel: folded tables and kernel arguments in a C
struct, see :mod:`pwlu.ops.cpu.plan`) declares ``make_plan`` in its Protocol; the plans it
makes are kept here, per parameter set (the tensors held by weak reference: a plan never keeps
a module's parameters alive), up to :data:`MAX_PLANS` per set, keyed on everything besides the
parameters that changes the result or how it is computed: the input's shape, strides and
dtype, the caller's ``channel_dim``, the backend setting and the thread count. Plans are made
only for ``nn.Parameter`` tensors (a module's parameters, reused call after call) and plain
tensors as input, after the arguments were validated; a later call with the same key needs no
validation again.

A plan has ``ptrs`` (the parameters' data pointers when it was made; a storage swapped by
``.data =`` changes them) and is called as ``plan(x) -> y | None``: ``None`` when the
parameters' values changed since it was made (an optimizer step, ``load_state_dict``, an
in-place write through ``.data``, which bumps no version counter). The caller then takes the
general path, which makes a new plan.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn

#: Plans kept per parameter set (one per call key); the oldest goes first.
MAX_PLANS = 8


class Plan(Protocol):
    ptrs: tuple[int, ...]

    def __call__(self, x: Tensor) -> Tensor | None: ...


class _ParamPlans:
    """The plans of one parameter set, by call key."""

    __slots__ = ("refs", "plans")

    def __init__(self, params: tuple[Tensor, ...]) -> None:
        self.refs = tuple(weakref.ref(p) for p in params)
        self.plans: dict[tuple, Plan] = {}

    def holds(self, params: tuple[Tensor, ...]) -> bool:
        return len(params) == len(self.refs) and all(r() is p for r, p in zip(self.refs, params))


#: ``id(first parameter) -> _ParamPlans``; an entry goes when that tensor is freed.
_CACHE: dict[int, _ParamPlans] = {}
_lock = threading.Lock()


def call_key(x: Tensor, channel_dim: int | None, setting: str) -> tuple:
    """Everything besides the parameters that a plan depends on."""
    return (x.shape, x.stride(), x.dtype, channel_dim, setting, torch.get_num_threads())


def run(x: Tensor, params: tuple[Tensor, Tensor, Tensor, Tensor, Tensor], channel_dim: int, setting: str) -> Tensor | None:
    """``y`` from the plan made earlier for exactly this call, else ``None``. Needs no validated
    arguments (``channel_dim`` is the caller's, as given); written out because in a model every
    call passes here."""
    p0, p1, p2, p3, p4 = params
    entry = _CACHE.get(id(p0))
    if entry is None or type(x) is not Tensor:  # subclasses (DTensor, Parameter...) take the general path
        return None
    plan = entry.plans.get((x.shape, x.stride(), x.dtype, channel_dim, setting, torch.get_num_threads()))
    if plan is None:
        return None
    r0, r1, r2, r3, r4 = entry.refs
    if (
        r0() is p0 and r1() is p1 and r2() is p2 and r3() is p3 and r4() is p4
        and plan.ptrs == (p0.data_ptr(), p1.data_ptr(), p2.data_ptr(), p3.data_ptr(), p4.data_ptr())
    ):  # fmt: skip
        return plan(x)
    return None


def make_and_run(
    make: Callable[[Tensor, tuple[Tensor, ...], int | None], Plan | None],
    x: Tensor,
    params: tuple[Tensor, ...],
    channel_dim: int,
    normalized_channel_dim: int | None,
    setting: str,
) -> Tensor | None:
    """After validation: a new plan from the backend's ``make`` where plans apply, kept under
    this call's key, and its ``y``; ``None`` where none applies."""
    if type(x) is not Tensor or not all(type(p) is nn.Parameter for p in params):
        return None
    plan = make(x, params, normalized_channel_dim)
    if plan is None:
        return None
    _remember(params, plan, call_key(x, channel_dim, setting))
    return plan(x)


def _remember(params: tuple[Tensor, ...], plan: Plan, key: tuple) -> None:
    with _lock:
        first = params[0]
        entry = _CACHE.get(id(first))
        if entry is None or not entry.holds(params):
            entry = _CACHE[id(first)] = _ParamPlans(params)
            weakref.finalize(first, _forget, id(first), entry)
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


def plans_for(params: tuple[Tensor, ...]) -> dict[tuple, Plan]:
    """The plans kept for these parameter tensors, by call key (for tests and debugging)."""
    entry = _CACHE.get(id(params[0]))
    return dict(entry.plans) if entry is not None and entry.holds(tuple(params)) else {}
