"""Shared test utilities: random parameters, the reference comparison, the low-precision rule."""

from __future__ import annotations

import torch

import pwlu

PARAM_NAMES = ("points", "left_bound", "right_bound", "left_slope", "right_slope")


def random_params(num_channels, n, dtype=torch.float32, seed=0, lo=-2.0, hi=2.0):
    """Random but well-posed parameters: ranges of width >= 1, arbitrary shape and slopes."""
    g = torch.Generator().manual_seed(seed)
    shape = () if num_channels is None else (num_channels,)
    left = lo + 0.5 * torch.rand(shape, generator=g, dtype=torch.float64)
    right = hi + 0.5 * torch.rand(shape, generator=g, dtype=torch.float64)
    points = torch.randn(*shape, n + 1, generator=g, dtype=torch.float64)
    left_slope = torch.randn(shape, generator=g, dtype=torch.float64)
    right_slope = torch.randn(shape, generator=g, dtype=torch.float64)
    return [p.to(dtype) for p in (points, left, right, left_slope, right_slope)]


def run(fn, x, params, channel_dim, grad_out=None):
    """Forward and all six gradients of ``fn`` (pwlu.pwlu or pwlu.pwlu_reference)."""
    x = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in params]
    y = fn(x, *params, channel_dim=channel_dim)
    if grad_out is None:
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(123)).to(y.dtype)
    y.backward(grad_out)
    return {"y": y.detach(), "dx": x.grad, **{f"d{n}": p.grad for n, p in zip(PARAM_NAMES, params)}}


def max_err(a, b):
    a, b = a.double(), b.double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    diff = (a - b).abs()
    diff[both_nan] = 0
    return diff.max().item() if diff.numel() else 0.0


def assert_matches_reference(fast, x, params, channel_dim, rtol=1e-5, atol=1e-5):
    """Forward, dx and every parameter gradient of ``fast`` against the reference, labelled."""
    got = run(fast, x, params, channel_dim)
    want = run(pwlu.pwlu_reference, x, params, channel_dim)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert got[key].shape == want[key].shape, key
        torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=atol, equal_nan=True, msg=lambda m, key=key: f"{key}: {m}")


def assert_low_precision_rule(fast, x32, params, channel_dim, dtype, atol=1e-3):
    """err(fast lowp vs fp32 ref) <= 2 * err(lowp ref vs fp32 ref) + atol, per output."""
    grad = torch.randn(x32.shape, generator=torch.Generator().manual_seed(7))
    ref32 = run(pwlu.pwlu_reference, x32, params, channel_dim, grad)
    ref_lp = run(pwlu.pwlu_reference, x32.to(dtype), params, channel_dim, grad.to(dtype))
    fast_lp = run(fast, x32.to(dtype), params, channel_dim, grad.to(dtype))
    for key in ref32:
        assert fast_lp[key].dtype == ref_lp[key].dtype, key
        scale = ref32[key].abs().max().item() + 1.0
        e_fast = max_err(fast_lp[key], ref32[key])
        e_ref = max_err(ref_lp[key], ref32[key])
        assert e_fast <= 2 * e_ref + atol * scale, f"{key}: fast err {e_fast} vs ref err {e_ref}"
