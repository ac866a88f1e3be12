"""Property-based comparison of the fast path with the reference (hypothesis)."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pwlu
from helpers import PARAM_NAMES, run


@st.composite
def pwlu_cases(draw):
    n = draw(st.integers(1, 24))
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    channel_wise = draw(st.booleans())
    channel_dim = draw(st.integers(-ndim, ndim - 1))
    c = shape[channel_dim] if channel_wise else None
    pshape = () if c is None else (c,)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    center = draw(st.floats(-50, 50))
    width = draw(st.sampled_from([1e-2, 0.1, 1.0, 6.0, 100.0]))
    slope_scale = draw(st.sampled_from([0.0, 1.0, 10.0, 1e3]))
    left = center - width / 2 + 0.1 * width * torch.rand(pshape, generator=g, dtype=torch.float64)
    right = center + width / 2 + 0.1 * width * torch.rand(pshape, generator=g, dtype=torch.float64)
    points = torch.randn(*pshape, n + 1, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 1.0, 10.0]))
    kl = torch.randn(pshape, generator=g, dtype=torch.float64) * slope_scale
    kr = torch.randn(pshape, generator=g, dtype=torch.float64) * slope_scale
    x = center + torch.randn(shape, generator=g, dtype=torch.float64) * width
    # some elements exactly on the bounds
    x.view(-1)[0] = left.reshape(-1)[0]
    x.view(-1)[-1] = right.reshape(-1)[-1]
    return x, [points, left, right, kl, kr], channel_dim


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pwlu_cases())
def test_fast_matches_reference_property(case):
    x, params, channel_dim = case
    got = run(pwlu.pwlu, x, params, channel_dim)
    want = run(pwlu.pwlu_reference, x, params, channel_dim)
    for key in want:
        scale = want[key].abs().max().item() + 1.0
        torch.testing.assert_close(got[key], want[key], rtol=1e-9, atol=1e-9 * scale, msg=lambda m, key=key: f"{key}: {m}")
        assert got[key].shape == want[key].shape


SPECIALS = [float("inf"), -float("inf"), float("nan"), 1e-310, -1e-310, 1e30, -1e30, 0.0]


@st.composite
def edge_cases(draw):
    """The cases above with special inputs (±inf, NaN, subnormals, huge values) and, sometimes,
    collapsed ranges (``B_R <= B_L + MIN_WIDTH``)."""
    x, params, channel_dim = draw(pwlu_cases())
    flat = x.view(-1)
    for _ in range(draw(st.integers(1, 4))):
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(SPECIALS))
    if draw(st.booleans()):
        points, left, right, kl, kr = params
        right = left + draw(st.sampled_from([0.0, 1e-6, 5e-4]))  # narrower than MIN_WIDTH
        params = [points, left, right, kl, kr]
    return x, params, channel_dim


def _second_order(fn, x, params, channel_dim):
    xs = [t.detach().clone().requires_grad_(True) for t in (x, *params)]
    y = fn(*xs, channel_dim=channel_dim)
    weight = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    (g,) = torch.autograd.grad((y * weight).sum(), xs[0], create_graph=True)
    torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0).square().sum().backward()
    return [t.grad for t in xs]


def _jvp(fn, x, params, channel_dim, seed):
    g = torch.Generator().manual_seed(seed)
    tangents = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (x, *params)]
    with fwAD.dual_level():
        duals = [fwAD.make_dual(t, v) for t, v in zip((x, *params), tangents)]
        return fwAD.unpack_dual(fn(*duals, channel_dim=channel_dim)).tangent


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edge_cases(), st.integers(0, 2**31 - 1))
def test_fast_matches_reference_at_the_edges(case, seed):
    """First- and second-order gradients and the jvp of the fast path equal the reference's,
    NaN where the reference is NaN, with special inputs and collapsed ranges."""
    x, params, channel_dim = case
    got = run(pwlu.pwlu, x, params, channel_dim)
    want = run(pwlu.pwlu_reference, x, params, channel_dim)
    for key in want:
        finite = want[key][torch.isfinite(want[key])]
        scale = (finite.abs().max().item() if finite.numel() else 0.0) + 1.0
        torch.testing.assert_close(
            got[key], want[key], rtol=1e-9, atol=1e-9 * scale, equal_nan=True, msg=lambda m, key=key: f"{key}: {m}"
        )
    for name, a, b in zip(("x",) + PARAM_NAMES, _second_order(pwlu.pwlu, x, params, channel_dim),
                          _second_order(pwlu.pwlu_reference, x, params, channel_dim)):  # fmt: skip
        torch.testing.assert_close(a, b, equal_nan=True, msg=lambda m, name=name: f"second order d{name}: {m}")
    torch.testing.assert_close(
        _jvp(pwlu.pwlu, x, params, channel_dim, seed), _jvp(pwlu.pwlu_reference, x, params, channel_dim, seed),
        equal_nan=True,
    )  # fmt: skip
