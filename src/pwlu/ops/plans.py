"""Inference plans: a gradient-free forward prepared once per parameter set and call geometry.

A backend that can prepare a call (the CPU kernel: folded tables and kernel arguments in a C
struct, see :mod:`pwlu.ops.cpu.plan`) declares ``make_plan`` in its Protocol; the plans it
makes are kept here, per parameter set (the tensors held by weak reference: a plan never keeps
a module's parameters alive), up to :data:`MAX_PLANS` per set, keyed on everything besides the
parameters that changes the result or how it is computed: the input's shape, strides, dtype
and device, the caller's ``channel_dim`` (an ``int``), the backend setting and the thread count. Plans are made
only for ``nn.Parameter`` tensors (a module's parameters, reused call after call) and plain
tensors as input, after the arguments were validated; a later call with the same key needs no
validation again.

A plan has ``ptrs`` (the parameters' :func:`layout`, address, shape, strides and dtype, when
it was made; a storage swapped or re-viewed by ``.data =`` changes them) and is called as
``plan(x) -> y | None``: ``None`` when the parameters' values changed since it was made (an optimizer step, ``load_state_dict``, an
in-place write through ``.data``, which bumps no version counter). The caller then takes the
general path, which makes a new plan.
"""

from __future__ import annotations

import operator
import threading
import weakref
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn

from .registration import in_transform

_deref = weakref.ref.__call__


def layout(p: Tensor) -> tuple:
    """What a plan checks of each parameter besides its bytes: its address, shape, strides and
    dtype (``param.data = param.data.t()`` keeps the address and the bytes of a square tensor)."""
    return (p.data_ptr(), p.shape, p.stride(), p.dtype)


#: Plans kept per parameter set (one per call key); the oldest goes first.
MAX_PLANS = 8


class Plan(Protocol):
    ptrs: tuple[tuple, ...]  # the parameters' layout() when the plan was made

    def __call__(self, x: Tensor, *others: Tensor) -> Tensor | None: ...


class _ParamPlans:
    """The plans of one parameter set (any number of tensors), by call key."""

    __slots__ = ("refs", "plans")

    def __init__(self, params: tuple[Tensor, ...]) -> None:
        self.refs = tuple(weakref.ref(p) for p in params)
        self.plans: dict[tuple, Plan] = {}

    def holds(self, params: tuple[Tensor, ...]) -> bool:
        return all(map(operator.is_, map(_deref, self.refs), params))


#: ``tuple of the parameters' ids -> _ParamPlans``; an entry goes when its first tensor is
#: freed (a reused id of another freed tensor is caught by the weak references).
_CACHE: dict[tuple[int, ...], _ParamPlans] = {}
#: Re-entrant: a finalizer (``_forget``) can run inside ``_remember`` when an allocation
#: there starts the cycle collector, on the same thread.
_lock = threading.RLock()


def gradient_free(tensors) -> bool:
    """Whether a call may use a plan: no graph is recorded (no input or parameter of
    ``tensors`` requires grad, or grad mode is off), nothing is being compiled and no
    ``torch.func`` transform or forward-mode level is active."""
    if torch.compiler.is_compiling() or in_transform():
        return False
    if not torch.is_grad_enabled():
        return True
    try:
        return not any(t.requires_grad for t in tensors)
    except AttributeError:  # not tensors: validation names the culprit
        return False


def call_key(x: Tensor, channel_dim: int, setting: str, *others: Tensor) -> tuple:
    """Everything besides the parameters that a plan depends on (``others``: the further inputs
    of a multi-input op, as the 2-D PWLU's ``y``)."""
    key = (x.shape, x.stride(), x.dtype, x.device, channel_dim, setting, torch.get_num_threads())
    for t in others:
        key += (t.shape, t.stride(), t.dtype, t.device)
    return key


def run(x: Tensor, params: tuple[Tensor, ...], channel_dim: int, setting: str, *others: Tensor) -> Tensor | None:
    """``plan(x, *others)`` from the plan made earlier for exactly this call, else ``None``.
    Needs no validated arguments (``channel_dim`` is the caller's, as given; only an ``int``
    can match); the one-input key is written out because in a model every call passes here."""
    entry = _CACHE.get(tuple(map(id, params)))
    if entry is None or type(x) is not Tensor or type(channel_dim) is not int:
        return None  # tensor subclasses (DTensor, Parameter...) take the general path
    if others:
        if any(type(t) is not Tensor for t in others):
            return None
        key = call_key(x, channel_dim, setting, *others)
    else:
        key = (x.shape, x.stride(), x.dtype, x.device, channel_dim, setting, torch.get_num_threads())
    plan = entry.plans.get(key)
    if plan is not None and entry.holds(params) and plan.ptrs == tuple(map(layout, params)):
        return plan(x, *others)
    return None


def make_and_run(
    make: Callable[..., Plan | None],
    x: Tensor,
    params: tuple[Tensor, ...],
    channel_dim: int,
    normalized_channel_dim: int | None,
    setting: str,
    *others: Tensor,
) -> Tensor | None:
    """After validation: a new plan from the backend's ``make(x, *others, params,
    normalized_channel_dim)`` where plans apply, kept under this call's key, and its result;
    ``None`` where none applies."""
    if type(x) is not Tensor or any(type(t) is not Tensor for t in others):
        return None
    if not all(type(p) is nn.Parameter for p in params):
        return None
    plan = make(x, *others, params, normalized_channel_dim)
    if plan is None:
        return None
    _remember(params, plan, call_key(x, channel_dim, setting, *others))
    return plan(x, *others)


def _remember(params: tuple[Tensor, ...], plan: Plan, key: tuple) -> None:
    ids = tuple(map(id, params))
    with _lock:
        entry = _CACHE.get(ids)
        if entry is None or not entry.holds(params):
            entry = _CACHE[ids] = _ParamPlans(params)
            weakref.finalize(params[0], _forget, ids, entry)
        entry.plans.pop(key, None)
        if len(entry.plans) >= MAX_PLANS:
            entry.plans.pop(next(iter(entry.plans)))
        entry.plans[key] = plan


def _forget(ids: tuple[int, ...], entry: _ParamPlans) -> None:
    with _lock:
        if _CACHE.get(ids) is entry:
            del _CACHE[ids]


def plans_for(params: tuple[Tensor, ...]) -> dict[tuple, Plan]:
    """The plans kept for these parameter tensors, by call key (for tests and debugging)."""
    entry = _CACHE.get(tuple(map(id, params)))
    return dict(entry.plans) if entry is not None and entry.holds(tuple(params)) else {}
