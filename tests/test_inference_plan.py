"""The eval-time shortcut: inference plans (``pwlu.ops.plans``, made by ``pwlu.ops.cpu.plan``).

Gradient-free calls with the same parameter tensors and a repeated input geometry reuse
prepared tables and kernel arguments. These tests check that the shortcut gives exactly what the general path gives,
that it is really taken (so the comparisons are not vacuous), and that every change that
must invalidate it does: parameters changed in place (also through ``.data``) or swapped,
a new input geometry, a new channel axis, a backend switch, gradients, statistics collection.
"""

from __future__ import annotations

import copy
import io
import pickle
from pathlib import Path

import pytest
import torch

import pwlu
from helpers import random_params
from pwlu.ops import plans as plans_mod
from pwlu.ops.cpu import backend as cpu_backend
from pwlu.ops.cpu import plan as cpu_plan

pytestmark = pytest.mark.skipif(not cpu_backend.is_available(torch.device("cpu")), reason="no C compiler")


def params_of(m):
    return (m.points, m.left_bound, m.right_bound, m.left_slope, m.right_slope)


def plans(m):
    return plans_mod.plans_for(params_of(m))


def current_plan(m, x):
    """The plan that a call of ``m`` on ``x`` would use now (``None`` if there is none)."""
    key = plans_mod.call_key(x, m.channel_dim, pwlu.get_backend_name())
    return plans(m).get(key)


def make_module(num_channels, channel_dim=1, n=16, seed=0, dtype=torch.float32):
    m = pwlu.PWLU(num_channels, num_intervals=n, channel_dim=channel_dim).to(dtype).eval()
    with torch.no_grad():
        for p, v in zip(params_of(m), random_params(num_channels, n, dtype=dtype, seed=seed)):
            p.copy_(v)
    return m


def general_path(m, x):
    """The same forward through the functional API (validation, layout, fused fold + kernel); plain
    tensors, not ``nn.Parameter``, so no plan is made or used."""
    with torch.no_grad():
        plain = [p.detach().clone() for p in params_of(m)]
        return pwlu.pwlu(x, *plain, channel_dim=m.channel_dim)


def planned(m, x):
    """Two gradient-free calls: the first builds the plan, the second must use it."""
    with torch.no_grad():
        first = m(x)
        assert isinstance(current_plan(m, x), cpu_plan.InferencePlan), "no plan was built"
        second = m(x)
    assert torch.equal(first, second)
    return second


def spread(shape, dtype=torch.float32, seed=0):
    return (3 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


LAYOUTS = [
    ("nchw", (2, 16, 5, 7), 1, True),
    ("nchw-4x4", (3, 32, 4, 4), 1, True),
    ("nchw-threads", (8, 288, 6, 6), 1, True),  # above the one-thread grain: channels split across threads
    ("channels-last", (2, 32, 3, 5), 1, True),
    ("btc", (2, 9, 24), -1, True),
    ("layer-wise", (3, 5, 11), 1, False),
    ("1-d", (37,), 0, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,shape,channel_dim,channel_wise", LAYOUTS, ids=[case[0] for case in LAYOUTS])
def test_plan_equals_the_general_path(name, shape, channel_dim, channel_wise, dtype):
    num_channels = shape[channel_dim] if channel_wise else None
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    m = make_module(num_channels, channel_dim, dtype=param_dtype)
    x = spread(shape, dtype)
    if name == "channels-last":
        x = x.to(memory_format=torch.channels_last)
    y = planned(m, x)
    assert y.dtype == x.dtype and y.stride() == x.stride()
    assert torch.equal(y, general_path(m, x)), "the plan differs from the general path"
    ref = pwlu.pwlu_reference(x.to(param_dtype), *params_of(m), channel_dim=channel_dim).to(dtype)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 1e-2)
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)


def test_in_place_parameter_changes_are_seen():
    m, x = make_module(8), spread((2, 8, 6, 6))
    before = planned(m, x)
    with torch.no_grad():
        m.points.mul_(-1.0)  # what an optimizer step or load_state_dict does: an in-place write
        after = m(x)
    assert not torch.equal(after, before)
    assert torch.equal(after, general_path(m, x))


@pytest.mark.parametrize("which", ["points", "left_bound", "right_bound", "left_slope", "right_slope"])
def test_every_parameter_is_watched(which):
    m, x = make_module(8), spread((2, 8, 6, 6))
    before = planned(m, x)
    with torch.no_grad():
        getattr(m, which).add_(0.25)
        after = m(x)
    assert not torch.equal(after, before), which
    assert torch.equal(after, general_path(m, x)), which


def test_swapped_parameter_storage_is_seen():
    """``param.data = ...`` (as ``Module._apply`` does) bumps no version counter."""
    m, x = make_module(8), spread((2, 8, 6, 6))
    before = planned(m, x)
    m.points.data = m.points.data * 0.5 + 1.0
    with torch.no_grad():
        after = m(x)
    assert not torch.equal(after, before)
    assert torch.equal(after, general_path(m, x))


@pytest.mark.parametrize("which", ["points", "left_bound", "right_bound", "left_slope", "right_slope"])
def test_writes_through_data_are_seen(which):
    """``param.data.add_(...)`` (old-style weight clipping, custom inits) bumps no version
    counter: the plan compares the parameters' bytes with its snapshot instead."""
    m, x = make_module(8), spread((2, 8, 6, 6))
    before = planned(m, x)
    version = getattr(m, which)._version
    getattr(m, which).data.add_(0.25)
    assert getattr(m, which)._version == version  # the case this test is about
    with torch.no_grad():
        after = m(x)
    assert not torch.equal(after, before), which
    assert torch.equal(after, general_path(m, x)), which


def test_load_state_dict_and_training_steps_are_seen():
    m, x = make_module(8), spread((2, 8, 6, 6))
    planned(m, x)
    other = make_module(8, seed=3)
    m.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(m(x), general_path(other, x))
    # a training step between two evaluations
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m.train()
    m(x).square().sum().backward()
    opt.step()
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), general_path(m, x))
        assert not torch.equal(m(x), general_path(other, x))


def test_new_input_geometry_gets_a_new_plan():
    m = make_module(8)
    planned(m, spread((2, 8, 6, 6)))
    for x in (
        spread((3, 8, 5, 5), seed=1),
        spread((2, 8, 6, 6), seed=2).to(memory_format=torch.channels_last),
        spread((2, 8, 6, 6), torch.bfloat16, seed=3),
        spread((2, 8, 12, 12), seed=4)[:, :, ::2, ::2],  # not dense: the general path copies
        spread((2, 8, 0, 6), seed=5),
    ):
        with torch.no_grad():
            y = m(x)
        assert torch.equal(y, general_path(m, x)), tuple(x.shape)


def test_alternating_geometries_keep_their_plans():
    m = make_module(8)
    a, b = spread((2, 8, 6, 6)), spread((3, 8, 5, 5), seed=1)
    planned(m, a)
    planned(m, b)
    plan_a, plan_b = current_plan(m, a), current_plan(m, b)
    assert plan_a is not None and plan_b is not None and plan_a is not plan_b
    with torch.no_grad():
        assert torch.equal(m(a), general_path(m, a))
        assert torch.equal(m(b), general_path(m, b))
        assert current_plan(m, a) is plan_a and current_plan(m, b) is plan_b, "a plan was rebuilt instead of reused"
        m.points.data.mul_(0.5)  # a stored plan must see the change too
        assert torch.equal(m(a), general_path(m, a))
        assert current_plan(m, a) is not plan_a


def test_at_most_max_plans_per_parameter_set():
    m = make_module(8)
    with torch.no_grad():
        for size in range(3, 4 + plans_mod.MAX_PLANS):
            x = spread((1, 8, size, size), seed=size)
            assert torch.equal(m(x), general_path(m, x))
    assert len(plans(m)) == plans_mod.MAX_PLANS


def test_changed_channel_dim_is_seen():
    """The plan is keyed on ``channel_dim``: moving the channel axis of an eval module gives the
    new axis's result, not the old plan's."""
    m = make_module(8, channel_dim=1)
    x = spread((2, 8, 5, 8))  # 8 channels on axis 1 and on axis 3
    before = planned(m, x)
    m.channel_dim = -1
    with torch.no_grad():
        after = m(x)
    assert torch.equal(after, general_path(m, x))
    assert (after - before).abs().max() > 0.1, "the old axis's result was returned"
    m.channel_dim = 3  # the same axis written differently: the same values
    with torch.no_grad():
        assert torch.equal(m(x), after)


def test_functional_calls_with_parameters_use_plans_and_plain_tensors_do_not():
    m, x = make_module(8), spread((2, 8, 6, 6))
    with torch.no_grad():
        y = pwlu.pwlu(x, *params_of(m), channel_dim=1)
        assert current_plan(m, x) is not None
        assert torch.equal(pwlu.pwlu(x, *params_of(m), channel_dim=1), y)
    plain = [p.detach().clone() for p in params_of(m)]
    with torch.no_grad():
        assert torch.equal(pwlu.pwlu(x, *plain, channel_dim=1), y)
    assert plans_mod.plans_for(tuple(plain)) == {}


def test_plans_do_not_keep_parameters_alive():
    import gc
    import weakref

    m, x = make_module(8), spread((2, 8, 6, 6))
    planned(m, x)
    ref = weakref.ref(m.points)
    del m
    gc.collect()
    assert ref() is None, "the plan cache kept a parameter alive"


def test_backend_switch_bypasses_the_plan():
    m, x = make_module(8), spread((2, 8, 6, 6))
    planned(m, x)
    with pwlu.use_backend("reference"), torch.no_grad():
        y = m(x)
    assert torch.equal(y, pwlu.pwlu_reference(x, *params_of(m), channel_dim=1))


def test_gradients_and_statistics_bypass_the_plan():
    m, x = make_module(8), spread((2, 8, 6, 6))
    planned(m, x)
    y = m(x)  # gradients enabled: autograd, not the plan
    assert y.requires_grad
    y.sum().backward()
    assert m.points.grad is not None and m.points.grad.abs().sum() > 0
    m.train()
    m.set_collecting(True)
    with torch.no_grad():
        m(x)
        m(x)
    assert int(m.num_batches_tracked) == 2, "a planned call skipped the statistics update"


def test_thread_count_change_and_inference_mode():
    m, x = make_module(16), spread((4, 16, 32, 32))  # above the one-thread grain size
    want = planned(m, x)
    plan_now = current_plan(m, x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads != 1 else 2)
        with torch.no_grad():
            assert torch.equal(m(x), want)
            other = current_plan(m, x)
    finally:
        torch.set_num_threads(threads)
    assert other is not None and other is not plan_now, "no plan of its own for the other thread count"
    with torch.inference_mode():
        assert torch.equal(m(x), want)
        assert torch.equal(m(x), want)


def test_copies_and_pickles_drop_the_plan():
    m, x = make_module(8), spread((2, 8, 6, 6))
    want = planned(m, x)
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m)), torch.load(buffer, weights_only=False)):
        assert plans(other) == {}
        with torch.no_grad():
            assert torch.equal(other(x), want)
        with torch.no_grad():
            other.points.zero_()  # the copy has its own parameters: the original's plan is unaffected
    with torch.no_grad():
        assert torch.equal(m(x), want)


def test_modules_pickled_by_older_versions_still_run():
    m, x = make_module(8), spread((2, 8, 6, 6))
    m.__dict__.update(_inference_plan=None, _other_plans={})  # what older versions stored on the module
    with torch.no_grad():
        assert torch.equal(m(x), general_path(m, x))
        assert torch.equal(m(x), general_path(m, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape,channel_dim",
    # NCHW rows; channels fastest with 16-row tiles and leftover rows (34 and 40 rows of 32 channels)
    [((2, 32, 3, 4), 1), ((2, 17, 32), -1), ((40, 32), 1)],
)
def test_relu_init_keeps_nan_and_infinities(shape, channel_dim, dtype):
    """A ReLU-initialised PWLU: NaN stays NaN although its region is flat, -inf gives 0 (a flat
    piece times infinity is not NaN), +inf gives +inf; the expectation is torch.relu."""
    m = pwlu.PWLU(32, channel_dim=channel_dim).eval()
    if dtype == torch.float64:
        m = m.double()
    x = spread(shape, torch.float64, seed=9)
    flat = x.view(-1)
    flat[0::5] = float("nan")
    flat[1::5] = float("inf")
    flat[2::5] = -float("inf")
    x = x.to(dtype)
    with torch.no_grad():
        for y in (m(x), m(x)):
            torch.testing.assert_close(y, torch.relu(x), rtol=1e-6, atol=1e-6, equal_nan=True)


def test_modules_pickled_by_pwlu_0_1_with_a_plan_still_load():
    """A module saved whole (``torch.save(model)``) by pwlu 0.1 after an eval call: its pickled
    plan refers to ``pwlu.ops.cpu_backend._no_plan``, which must still exist."""
    path = Path(__file__).parent / "fixtures" / "pwlu_0_1_module_with_plan.pkl"
    m = torch.load(path, weights_only=False)
    x = spread((2, 4, 3, 3))
    with torch.no_grad():
        assert torch.equal(m(x), general_path(m, x))
        assert torch.equal(m(x), general_path(m, x))


def test_another_device_is_not_served_by_a_cpu_plan():
    """The device is part of the key: a meta (or CUDA) input of the same shape gets the general
    path's clear error, not the CPU plan (which would read its data pointer)."""
    m, x = make_module(4), spread((2, 4, 8, 8))
    planned(m, x)
    with torch.no_grad(), pytest.raises(ValueError, match="points is on cpu but x is on meta"):
        m(torch.empty(2, 4, 8, 8, device="meta"))


def test_channel_dim_must_still_be_an_int_after_a_plan_hit():
    m, x = make_module(4), spread((2, 4, 8, 8))
    planned(m, x)
    for bad in (True, 1.0):
        with torch.no_grad(), pytest.raises(TypeError, match="channel_dim must be an int"):
            pwlu.pwlu(x, *params_of(m), channel_dim=bad)


def test_tied_parameters_keep_one_entry_each():
    """Two modules sharing ``points`` (tied weights) but not the rest: each keeps its own
    plans, reused call after call, and the cache does not grow."""
    a, b = make_module(4, seed=1), make_module(4, seed=2)
    b.points = a.points
    x = spread((2, 4, 8, 8))
    with torch.no_grad():
        a(x), b(x)
        plan_a, plan_b = current_plan(a, x), current_plan(b, x)
        size = len(plans_mod._CACHE)
        for _ in range(50):
            assert torch.equal(a(x), general_path(a, x))
            assert torch.equal(b(x), general_path(b, x))
    assert plan_a is not None and plan_b is not None and plan_a is not plan_b
    assert current_plan(a, x) is plan_a and current_plan(b, x) is plan_b, "plans were rebuilt"
    assert len(plans_mod._CACHE) == size


def test_a_finalizer_inside_remember_does_not_deadlock():
    """An allocation inside ``_remember`` (which holds the lock) can run the cycle collector,
    which can run a parameter's finalizer, ``_forget``, on the same thread."""
    import threading

    def forget_while_holding_the_lock():
        with plans_mod._lock:
            plans_mod._forget((0,), object())

    worker = threading.Thread(target=forget_while_holding_the_lock, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "deadlock: _forget waits for the lock its own thread holds"


def test_error_codes_of_the_plan_call_raise():
    """Only 'stale' means 'take the general path'; other C error codes raise."""
    from pwlu.ops.cpu import build

    m, x = make_module(4), spread((2, 4, 8, 8))
    planned(m, x)
    plan = current_plan(m, x)
    original = plan.run
    try:
        plan.run = lambda *args: build.ERR_NOMEM
        with pytest.raises(MemoryError):
            plan(x)
        plan.run = lambda *args: build.PLAN_STALE
        assert plan(x) is None
    finally:
        plan.run = original


def test_a_parameter_replaced_by_another_view_of_its_memory_is_seen():
    """``points.data = points.data.t()`` for C = N + 1 (square points) keeps the data pointer
    and the bytes: only its strides tell."""
    m, x = make_module(17, n=16), spread((2, 17, 5, 5))
    planned(m, x)
    m.points.data = m.points.data.t()
    with torch.no_grad():
        y = m(x)
    assert torch.equal(y, general_path(m, x))
