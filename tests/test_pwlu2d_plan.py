"""Inference plans of the 2-D PWLU (``pwlu.ops.plans.run`` with ``y`` as a further input, made by
``pwlu.ops.pwlu2d_cpu_backend.make_plan``): gradient-free calls with the same ``nn.Parameter``
tensors and a repeated geometry of both inputs reuse the packed values, geometry and vector
tables. The plan must give exactly what the general path gives, must really be taken, and
every change that must invalidate it does: any of the nine parameters changed in place, through
``.data`` or swapped; another layout of ``y``; a backend switch; gradients."""

from __future__ import annotations

import pytest
import torch

import pwlu
from pwlu.ops import plans as plans_mod
from pwlu.ops.pwlu2d_cpu_backend import PWLU2D_CPU, InferencePlan2D
from pwlu.ops.pwlu2d_reference import PWLU2D_PARAMETER_NAMES

pytestmark = pytest.mark.skipif(PWLU2D_CPU.get() is None, reason="no C compiler")

NAMES = PWLU2D_PARAMETER_NAMES


def make_merge(num_channels, channel_dim=1, n=8, dtype=torch.float32, seed=0):
    """A channel- or layer-wise merge, moved away from addition in all nine parameters."""
    m = pwlu.PWLU2D(num_channels, num_intervals=n, channel_dim=channel_dim, bound=2.0).to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params_of(m):
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype))
    return m


def params_of(m):
    return tuple(getattr(m, name) for name in NAMES)


def current_plan(m, x, y):
    key = plans_mod.call_key(x, m.channel_dim, pwlu.get_backend_name(), y)
    return plans_mod.plans_for(params_of(m)).get(key)


def general_path(m, x, y):
    """The functional API with plain tensors (no plan is made or used)."""
    with torch.no_grad():
        plain = [p.detach().clone() for p in params_of(m)]
        return pwlu.pwlu2d(x, y, *plain, channel_dim=m.channel_dim)


def planned(m, x, y):
    """Two gradient-free calls: the first makes the plan, the second must use it."""
    with torch.no_grad():
        first = m(x, y)
        assert isinstance(current_plan(m, x, y), InferencePlan2D), "no plan was made"
        second = m(x, y)
    assert torch.equal(first.nan_to_num(), second.nan_to_num())
    return second


def inputs(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, y = (2.5 * torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
    return x.to(dtype), y.to(dtype)


LAYOUTS = [
    ("nchw-short-rows", (2, 6, 3, 5), 1, True),  # rows under the vector path's 16 elements
    ("nchw", (2, 4, 9, 9), 1, True),
    ("nchw-threads", (4, 16, 40, 40), 1, True),  # above the one-thread grain: split across threads
    ("channels-last", (2, 8, 5, 7), 1, True),
    ("btc", (2, 9, 24), -1, True),
    ("btc-long", (2, 40, 24), -1, True),  # enough rows for the per-lane-channel vector path
    ("layer-wise", (3, 5, 41), 1, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,shape,channel_dim,channel_wise", LAYOUTS, ids=[case[0] for case in LAYOUTS])
def test_plan_equals_the_general_path(name, shape, channel_dim, channel_wise, dtype):
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    m = make_merge(shape[channel_dim] if channel_wise else None, channel_dim, dtype=param_dtype)
    x, y = inputs(shape, dtype)
    if name == "channels-last":
        x, y = x.to(memory_format=torch.channels_last), y.to(memory_format=torch.channels_last)
    z = planned(m, x, y)
    assert z.dtype == x.dtype and z.stride() == x.stride()
    assert torch.equal(z, general_path(m, x, y)), "the plan differs from the general path"
    ref = pwlu.pwlu2d_reference(x.to(param_dtype), y.to(param_dtype), *params_of(m), channel_dim=channel_dim)
    tol = {torch.float32: 2e-5, torch.float64: 1e-12}.get(dtype, 2e-2)
    torch.testing.assert_close(z, ref.to(dtype), rtol=tol, atol=tol)


def test_nan_and_infinities_through_the_plan():
    m = make_merge(4)
    with torch.no_grad():
        m.y_right_slope[1] = 0.0  # a flat piece: +inf in y maps to its limit there
    x, y = inputs((2, 4, 5, 6))
    x[0, :, 0, 0], y[0, :, 0, 1], x[1, :, 2, 3], y[1, :, 4, 5] = float("nan"), float("nan"), float("inf"), float("inf")
    z = planned(m, x, y)
    torch.testing.assert_close(z, general_path(m, x, y), rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(z[0, :, 0, :2]).all() and torch.isfinite(z[1, 1, 4, 5])


@pytest.mark.parametrize("which", NAMES)
def test_every_parameter_is_watched(which):
    m, (x, y) = make_merge(4), inputs((2, 4, 6, 6))
    before = planned(m, x, y)
    with torch.no_grad():
        getattr(m, which).add_(0.25)  # an in-place write, as an optimizer step
        after = m(x, y)
    assert not torch.equal(after, before), which
    assert torch.equal(after, general_path(m, x, y)), which


@pytest.mark.parametrize("which", ["values", "x_right_bound", "y_left_slope"])
def test_writes_through_data_and_swapped_storage_are_seen(which):
    """``param.data.add_`` and ``param.data = ...`` bump no version counter."""
    m, (x, y) = make_merge(4), inputs((2, 4, 6, 6))
    before = planned(m, x, y)
    getattr(m, which).data.mul_(0.5)
    with torch.no_grad():
        after = m(x, y)
    assert not torch.equal(after, before) and torch.equal(after, general_path(m, x, y))
    getattr(m, which).data = getattr(m, which).data * 0.5 - 0.125
    with torch.no_grad():
        swapped = m(x, y)
    assert not torch.equal(swapped, after) and torch.equal(swapped, general_path(m, x, y))


def test_another_layout_of_y_gets_its_own_plan_or_none():
    m, (x, y) = make_merge(4), inputs((2, 4, 6, 6))
    planned(m, x, y)
    y_cl = y.to(memory_format=torch.channels_last)
    y_bc = y[:1].expand_as(x)  # a stride-0 (broadcast) y: no plan, the general path
    for other in (y_cl, y_bc):
        with torch.no_grad():
            z = m(x, other)
        assert torch.equal(z, general_path(m, x, other))
        assert current_plan(m, x, other) is None
    assert len(plans_mod.plans_for(params_of(m))) == 1


def test_backend_switch_and_gradients_bypass_the_plan():
    m, (x, y) = make_merge(4), inputs((2, 4, 6, 6))
    planned(m, x, y)
    with pwlu.use_backend("reference"), torch.no_grad():
        assert torch.equal(m(x, y), pwlu.pwlu2d_reference(x, y, *params_of(m)))
    z = m(x, y)  # gradients enabled: autograd, not the plan
    assert z.requires_grad
    z.sum().backward()
    assert all(p.grad is not None for p in params_of(m)) and m.values.grad.abs().sum() > 0


def test_plain_tensors_get_no_plan():
    m, (x, y) = make_merge(4), inputs((2, 4, 6, 6))
    plain = [p.detach().clone() for p in params_of(m)]
    with torch.no_grad():
        pwlu.pwlu2d(x, y, *plain)
    assert plans_mod.plans_for(tuple(plain)) == {}


def test_a_parameter_replaced_by_another_view_of_its_memory_is_seen():
    """``values.data = values.data.transpose(-1, -2)`` keeps the data pointer and the bytes (a
    square matrix): only its strides tell; a smaller view at the same address changes the shape."""
    m, (x, y) = make_merge(4), inputs((2, 4, 6, 6))
    planned(m, x, y)
    m.values.data = m.values.data.transpose(-1, -2)
    with torch.no_grad():
        z = m(x, y)
    assert torch.equal(z, general_path(m, x, y))
    m.x_left_bound.data = m.x_left_bound.data[:1]  # now inconsistent with the others: an error, not a plan
    with torch.no_grad(), pytest.raises(ValueError, match="x_left_bound must have shape"):
        m(x, y)
