"""Inference plans of N-PWLU (``pwlu.ops.plans``, made by ``pwlu.ops.npwlu_cpu_backend.make_plan``):
gradient-free calls with the same ``nn.Parameter`` tensors and input geometry reuse the folded
tables. The plan must give exactly what the general path gives, must really be taken, and every
change that must invalidate it does: any of the six parameters changed in place, through
``.data``, swapped or re-viewed; a backend switch; gradients; statistics collection."""

from __future__ import annotations

import pytest
import torch

import pwlu
from pwlu.ops import plans as plans_mod
from pwlu.ops.cpu.plan import InferencePlan
from pwlu.ops.npwlu_cpu_backend import NPWLU_CPU

pytestmark = pytest.mark.skipif(NPWLU_CPU.get() is None, reason="no C compiler")

NAMES = ("points", "width_logits", "left_bound", "right_bound", "left_slope", "right_slope")


def make_module(num_channels, channel_dim=1, n=4, dtype=torch.float32, seed=0):
    """A channel- or layer-wise N-PWLU moved away from its init in all six parameters."""
    m = pwlu.NPWLU(num_channels, num_intervals=n, channel_dim=channel_dim).to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params_of(m):
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype))
    return m


def params_of(m):
    return tuple(getattr(m, name) for name in NAMES)


def current_plan(m, x):
    return plans_mod.plans_for(params_of(m)).get(plans_mod.call_key(x, m.channel_dim, pwlu.get_backend_name()))


def general_path(m, x):
    """The functional API with plain tensors (no plan is made or used)."""
    with torch.no_grad():
        return pwlu.npwlu(x, *(p.detach().clone() for p in params_of(m)), channel_dim=m.channel_dim)


def planned(m, x):
    """Two gradient-free calls: the first makes the plan, the second must use it."""
    with torch.no_grad():
        first = m(x)
        assert isinstance(current_plan(m, x), InferencePlan), "no plan was made"
        second = m(x)
    assert torch.equal(first, second)
    return second


def spread(shape, dtype=torch.float32, seed=0):
    return (2.5 * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).to(dtype)


LAYOUTS = [
    ("nchw", (2, 6, 5, 7), 1, True),
    ("nchw-threads", (4, 16, 40, 40), 1, True),  # above the one-thread grain: split across threads
    ("channels-last", (2, 16, 5, 7), 1, True),
    ("btc", (2, 9, 24), -1, True),
    ("layer-wise", (3, 5, 41), 1, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,shape,channel_dim,channel_wise", LAYOUTS, ids=[case[0] for case in LAYOUTS])
def test_plan_equals_the_general_path(name, shape, channel_dim, channel_wise, dtype):
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    m = make_module(shape[channel_dim] if channel_wise else None, channel_dim, dtype=param_dtype)
    x = spread(shape, dtype)
    if name == "channels-last":
        x = x.to(memory_format=torch.channels_last)
    y = planned(m, x)
    assert y.dtype == x.dtype and y.stride() == x.stride()
    assert torch.equal(y, general_path(m, x)), "the plan differs from the general path"
    ref = pwlu.npwlu_reference(x.to(param_dtype), *params_of(m), channel_dim=channel_dim)
    tol = {torch.float32: 2e-5, torch.float64: 1e-12}.get(dtype, 2e-2)
    torch.testing.assert_close(y, ref.to(dtype), rtol=tol, atol=tol)


@pytest.mark.parametrize("which", NAMES)
def test_every_parameter_is_watched(which):
    m, x = make_module(8), spread((2, 8, 6, 6))
    before = planned(m, x)
    with torch.no_grad():
        p = getattr(m, which)  # an in-place write, as an optimizer step (not a constant: softmax ignores one)
        p.add_(torch.linspace(0.1, 0.5, p.numel()).reshape(p.shape))
        after = m(x)
    assert not torch.equal(after, before), which
    assert torch.equal(after, general_path(m, x)), which


@pytest.mark.parametrize("which", ["points", "width_logits", "right_slope"])
def test_writes_through_data_and_swapped_storage_are_seen(which):
    m, x = make_module(8), spread((2, 8, 6, 6))
    before = planned(m, x)
    getattr(m, which).data.mul_(0.5)  # bumps no version counter
    with torch.no_grad():
        after = m(x)
    assert not torch.equal(after, before) and torch.equal(after, general_path(m, x))
    getattr(m, which).data = getattr(m, which).data * 0.5 - 0.125
    with torch.no_grad():
        swapped = m(x)
    assert not torch.equal(swapped, after) and torch.equal(swapped, general_path(m, x))


def test_a_parameter_replaced_by_another_view_of_its_memory_is_seen():
    """width_logits of C = N channels is square: ``.data = .data.t()`` keeps address and bytes."""
    m, x = make_module(4, n=4), spread((2, 4, 6, 6))
    planned(m, x)
    m.width_logits.data = m.width_logits.data.t()
    with torch.no_grad():
        assert torch.equal(m(x), general_path(m, x))


def test_backend_switch_gradients_and_statistics_bypass_the_plan():
    m, x = make_module(8), spread((2, 8, 6, 6))
    planned(m, x)
    with pwlu.use_backend("reference"), torch.no_grad():
        assert torch.equal(m(x), pwlu.npwlu_reference(x, *params_of(m)))
    y = m(x)  # gradients enabled: autograd, not the plan
    assert y.requires_grad
    y.sum().backward()
    assert all(p.grad is not None for p in params_of(m)) and m.points.grad.abs().sum() > 0
    m.train()
    m.set_collecting(True)
    with torch.no_grad():
        m(x)
        m(x)
    assert int(m.num_batches_tracked) == 2, "a planned call skipped the statistics update"


def test_plain_tensors_get_no_plan():
    m, x = make_module(8), spread((2, 8, 6, 6))
    plain = tuple(p.detach().clone() for p in params_of(m))
    with torch.no_grad():
        pwlu.npwlu(x, *plain)
    assert plans_mod.plans_for(plain) == {}
