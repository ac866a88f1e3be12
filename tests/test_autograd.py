"""Derivatives beyond the first-order backward, in every backend, against the reference.

Second order (``create_graph=True``, ``gradgradcheck``, a gradient penalty), forward mode
(``torch.autograd.forward_ad``, ``torch.func.jvp``, ``torch.autograd.functional.jvp``),
``torch.func`` (``vmap``, ``grad``, ``jacrev``, ``jacfwd``, ``hessian``), the reference's own
gradients at ±inf inputs, and ``torch.utils.checkpoint`` around a collecting PWLU.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.utils.checkpoint import checkpoint

import pwlu
from helpers import PARAM_NAMES, random_params
from pwlu.ops import dispatch

CPU = torch.device("cpu")
BACKENDS = [b for b in ("torch", "cpu", "triton") if dispatch.is_available(b, CPU)] + ["auto"]


def spread(shape, seed=0, dtype=torch.float64):
    return (2.5 * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).to(dtype)


def inputs(channel_wise=True, shape=(2, 3, 5), n=6, seed=0):
    params = random_params(3 if channel_wise else None, n, dtype=torch.float64, seed=seed)
    return spread(shape, seed), params


def fast(backend):
    def f(x, *params, channel_dim=1):
        with pwlu.use_backend(backend):
            return pwlu.pwlu(x, *params, channel_dim=channel_dim)

    return f


def ref(x, *params, channel_dim=1):
    return pwlu.pwlu_reference(x, *params, channel_dim=channel_dim)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


# ------------------------------------------------------------------------ second order


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channel_wise", [True, False], ids=["channel", "layer"])
def test_gradgradcheck(backend, channel_wise):
    x, params = inputs(channel_wise)
    f = fast(backend)
    assert torch.autograd.gradgradcheck(lambda *a: f(*a, channel_dim=1), leaves(x, *params))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty_matches_the_reference(backend):
    """WGAN-GP / R1 style: penalise the input gradient, then train on it. Every parameter and
    the layer before the PWLU get the gradients that autograd gives through the reference."""

    def penalty(fn):
        w = torch.linspace(0.5, 1.5, 3, dtype=torch.float64).reshape(1, 3, 1).requires_grad_(True)
        x0 = spread((2, 3, 5), seed=1).requires_grad_(True)
        ps = leaves(*random_params(3, 6, dtype=torch.float64, seed=2))
        y = fn(x0 * w, *ps, channel_dim=1)
        (g,) = torch.autograd.grad(
            (y * torch.arange(30.0, dtype=torch.float64).reshape(2, 3, 5)).sum(), x0, create_graph=True
        )
        assert g.requires_grad, "the input gradient has no graph"
        loss = g.square().sum() + y.square().sum()
        loss.backward()
        return [w.grad, x0.grad, *(p.grad for p in ps)]

    got, want = penalty(fast(backend)), penalty(ref)
    for name, a, b in zip(["w", "x", *PARAM_NAMES], got, want):
        assert a is not None, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


def test_first_order_backward_keeps_the_kernels():
    """Without create_graph the fast backward runs (no reference composition)."""
    calls = []
    backend = dispatch.select(CPU)
    original = backend.backward_from_params
    if original is None:
        pytest.skip("the selected backend has no fused backward to count")

    def counting(*args):
        calls.append(1)
        return original(*args)

    x, params = inputs()
    xs = leaves(x, *params)
    type(backend).backward_from_params = staticmethod(counting)
    try:
        pwlu.pwlu(*xs, channel_dim=1).sum().backward()
    finally:
        type(backend).backward_from_params = staticmethod(original)
    assert calls == [1]


# ------------------------------------------------------------------------ forward mode


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channel_wise", [True, False], ids=["channel", "layer"])
def test_forward_ad_matches_the_reference(backend, channel_wise):
    x, params = inputs(channel_wise)
    g = torch.Generator().manual_seed(5)
    tangents = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (x, *params)]

    def tangent_of(fn):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) for p, t in zip((x, *params), tangents)]
            out = fn(*duals, channel_dim=1)
            primal, tangent = fwAD.unpack_dual(out)
        assert tangent is not None, "no tangent"
        return primal, tangent

    (y, t), (y_ref, t_ref) = tangent_of(fast(backend)), tangent_of(ref)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(t, t_ref)
    assert t.abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_jvp_and_functional_jvp(backend):
    x, params = inputs()
    v = spread(x.shape, seed=9)
    f, r = fast(backend), ref
    got = torch.func.jvp(lambda a: f(a, *params), (x,), (v,))
    want = torch.func.jvp(lambda a: r(a, *params), (x,), (v,))
    torch.testing.assert_close(got, want)
    got = torch.autograd.functional.jvp(lambda a: f(a, *params), x, v)
    want = torch.autograd.functional.jvp(lambda a: r(a, *params), x, v)
    torch.testing.assert_close(got, want)
    assert want[1].abs().max() > 0


# ------------------------------------------------------------------------ torch.func


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", ["grad", "jacrev", "jacfwd", "hessian", "vmap_x", "vmap_params"])
def test_torch_func_transforms_match_the_reference(backend, transform):
    x, params = inputs(shape=(2, 3, 4), n=4)
    f, r = fast(backend), ref

    def run(fn):
        if transform == "grad":
            return torch.func.grad(lambda a, *p: fn(a, *p).square().sum(), argnums=(0, 1, 2, 3, 4, 5))(x, *params)
        if transform == "jacrev":
            return torch.func.jacrev(lambda a, p: fn(a, p, *params[1:]), argnums=(0, 1))(x, params[0])
        if transform == "jacfwd":
            return torch.func.jacfwd(lambda a, b: fn(a, params[0], b, *params[2:]), argnums=(0, 1))(x, params[1])
        if transform == "hessian":
            return torch.func.hessian(lambda p: fn(x, p, *params[1:]).square().sum())(params[0])
        if transform == "vmap_x":
            batch = torch.stack([x, 2 * x, -x])
            return torch.vmap(lambda a: fn(a, *params))(batch)
        stacked = [torch.stack([p, 1.5 * p]) for p in params]  # a batch of parameter sets
        return torch.vmap(lambda *p: fn(x, *p))(*stacked)

    got, want = run(f), run(r)
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------ ±inf inputs


@pytest.mark.parametrize("channel_wise", [True, False], ids=["channel", "layer"])
def test_reference_gradients_at_infinite_inputs(channel_wise):
    """The reference's where() used to turn 0 * inf into NaN parameter gradients. Now: every
    parameter gradient but the infinite input's outer slope is finite, and all agree with the
    fast paths (which never had the trap)."""
    x, params = inputs(channel_wise, shape=(2, 3, 6))
    x[0, 0, 0] = float("inf")
    x[1, 1, 1] = -float("inf")
    x[1, 2, 2] = float("inf")
    params[3].view(-1)[-1] = 0.0  # a flat outer piece: ±inf maps to its constant value

    def grads(fn):
        xs = leaves(x, *params)
        fn(*xs, channel_dim=1).backward(spread(x.shape, seed=4).abs() + 0.5)
        return [t.grad for t in xs]

    want = grads(ref)
    for name, g in zip(["x", *PARAM_NAMES], want):
        finite = g if name not in ("left_slope", "right_slope") else None
        if finite is not None:
            assert torch.isfinite(finite).all(), name
    for backend in BACKENDS:
        for name, a, b in zip(["x", *PARAM_NAMES], grads(fast(backend)), want):
            torch.testing.assert_close(
                a, b, equal_nan=False, msg=lambda m, name=name, backend=backend: f"{backend} {name}: {m}"
            )


# ------------------------------------------------------------------------ checkpointing


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_recomputation_does_not_count_twice(use_reentrant):
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), pwlu.PWLU(4)).train()

    plain, ckpt = make(), make()
    plain[1].set_collecting(True)
    ckpt[1].set_collecting(True)
    for step in range(3):
        x = spread((2, 3, 5, 5), seed=step, dtype=torch.float32).requires_grad_(True)
        plain(x).sum().backward()
        checkpoint(ckpt, x, use_reentrant=use_reentrant).sum().backward()
    assert int(ckpt[1].num_batches_tracked) == 3 == int(plain[1].num_batches_tracked)
    torch.testing.assert_close(ckpt[1].running_mean, plain[1].running_mean)
    torch.testing.assert_close(ckpt[1].running_std, plain[1].running_std)


def test_module_double_backward_reaches_parameters():
    m = pwlu.PWLU(3).double()
    with torch.no_grad():
        for p, v in zip(m.parameters(), random_params(3, 16, dtype=torch.float64, seed=3)):
            p.copy_(v)
    x = spread((2, 3, 4)).requires_grad_(True)
    (g,) = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
    g.sum().backward()
    got = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    x2 = x.detach().requires_grad_(True)
    y = pwlu.pwlu_reference(x2, *m.parameters(), channel_dim=1)
    (g2,) = torch.autograd.grad(y.square().sum(), x2, create_graph=True)
    g2.sum().backward()
    for name, a, p in zip(PARAM_NAMES, got, m.parameters()):
        assert a.abs().sum() > 0, name
        torch.testing.assert_close(a, p.grad, msg=lambda msg, name=name: f"{name}: {msg}")
