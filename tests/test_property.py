"""Property-based comparison of the fast path with the reference (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pwlu
from helpers import run


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
