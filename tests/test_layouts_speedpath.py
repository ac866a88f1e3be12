"""The CPU kernel's channels-fastest path (channels-last, ``(B, T, C)`` with ``channel_dim=-1``).

There the forward transposes 16 x 16 tiles (16 rows x 16 channels) in registers to look the
tables up per channel, with partial tiles where C or the row count is not a multiple of 16,
and the backward looks dx's slope up on the same transposed tiles (N + 2 <= 32; larger N
gathers). These tests cover every kind of tile edge against ``pwlu_reference`` (in float64 for
the parameter gradients, sums over many elements) and the vectorised-torch backend: C below,
at and above 16 and not a multiple of it, row counts below 16 and not a multiple of it, points
outside the range, exactly on the breakpoints and bounds, NaN and +-inf, the inference plan's
forward, a thread split inside a row tile, and the gather path. Expectations never come from
the CPU backend itself.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pwlu
from helpers import PARAM_NAMES, assert_low_precision_rule, random_params
from pwlu.ops.cpu import backend as cpu_backend

pytestmark = pytest.mark.skipif(not cpu_backend.is_available(torch.device("cpu")), reason="no C compiler")

KEYS = ("y", "dx") + tuple(f"d{n}" for n in PARAM_NAMES)


def run_backend(backend, x, params, channel_dim, grad_out):
    x = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in params]
    with pwlu.use_backend(backend):
        y = pwlu.pwlu(x, *params, channel_dim=channel_dim)
        y.backward(grad_out)
    return {"y": y.detach(), "dx": x.grad, **{f"d{n}": p.grad for n, p in zip(PARAM_NAMES, params)}}


def spread(shape, dtype, seed=0, channels_last=False):
    """N(0, 3^2): many points left of B_L and right of B_R, every region populated."""
    x = (3 * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def grad_like(x, seed=123):
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(x.dtype)
    return g.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and not x.is_contiguous() else g


def assert_close(got, want, keys, rtol, atol):
    for key in keys:
        assert got[key].shape == want[key].shape, key
        scale = want[key].double().nan_to_num(posinf=0.0, neginf=0.0).abs().max().item() + 1.0
        torch.testing.assert_close(
            got[key].double(), want[key].double(), rtol=rtol, atol=atol * scale, equal_nan=True,
            msg=lambda m, key=key: f"{key}: {m}",
        )  # fmt: skip


def check_all(x, params, channel_dim, dtype):
    g = grad_like(x)
    got = run_backend("cpu", x, params, channel_dim, g)
    tight = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    ref = run_backend("reference", x, params, channel_dim, g)
    assert_close(got, ref, ("y", "dx"), **tight)
    ref64 = run_backend("reference", x.double(), [p.double() for p in params], channel_dim, g.double())
    assert_close(got, ref64, KEYS, **tight)
    tb = run_backend("torch", x, params, channel_dim, g)
    assert torch.equal(got["dx"], tb["dx"]), "dx: a slope differs from the torch backend's (wrong region or channel)"
    assert_close(got, tb, KEYS, **tight)
    return got


# (B, T, C): C below, at, above 16 and not a multiple of it; rows below 16, not a multiple of 16
BTC_SHAPES = [(2, 9, 17), (3, 11, 33), (1, 5, 3), (2, 16, 16), (4, 8, 64), (1, 1, 33), (5, 7, 48)]
# (N, C, H, W) channels-last: N H W rows of C channels
CL_SHAPES = [(2, 17, 3, 5), (3, 33, 4, 3), (1, 16, 4, 4), (2, 64, 3, 3), (1, 7, 5, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", BTC_SHAPES)
def test_btc_every_tile_edge(shape, dtype):
    params = random_params(shape[-1], 16, dtype=dtype, seed=shape[-1])
    check_all(spread(shape, dtype, seed=sum(shape)), params, -1, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", CL_SHAPES)
def test_channels_last_every_tile_edge(shape, dtype):
    params = random_params(shape[1], 16, dtype=dtype, seed=shape[1])
    x = spread(shape, dtype, seed=sum(shape), channels_last=True)
    got = check_all(x, params, 1, dtype)
    assert got["y"].is_contiguous(memory_format=torch.channels_last)
    assert got["dx"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("n", [1, 4, 30, 40])
def test_any_number_of_intervals(n):
    """N + 2 <= 32: tables in registers on the transposed tiles; larger N: by gather."""
    params = random_params(33, n, seed=n)
    x = spread((3, 11, 33), torch.float32, seed=n)
    g = grad_like(x)
    got = run_backend("cpu", x, params, -1, g)
    tb = run_backend("torch", x, params, -1, g)
    assert torch.equal(got["dx"], tb["dx"])
    assert_close(got, tb, KEYS, rtol=1e-5, atol=1e-6)
    ref64 = run_backend("reference", x.double(), [p.double() for p in params], -1, g.double())
    assert_close(got, ref64, KEYS, rtol=1e-4, atol=1e-5)


def exact_params(num_channels, dtype):
    """B_L = -2, B_R = 2, N = 8: d = 0.5 and every breakpoint is exact in every dtype."""
    gen = torch.Generator().manual_seed(5)
    points = torch.randn(num_channels, 9, generator=gen, dtype=torch.float64).to(dtype)
    left = torch.full((num_channels,), -2.0, dtype=dtype)
    right = torch.full((num_channels,), 2.0, dtype=dtype)
    slopes = [torch.randn(num_channels, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2)]
    return [points, left, right, *slopes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels", [17, 33])
def test_exact_breakpoints_and_bounds(channels, dtype):
    """Every breakpoint, B_L, B_R and the midpoints, in every channel: the reference's regions."""
    grid = torch.arange(-12, 13, dtype=torch.float64) * 0.25  # -3 .. 3
    x = grid.repeat(channels, 1).T.contiguous().repeat(2, 1, 1).to(dtype)  # (2, 25, C): each row one value
    x = torch.cat([x, x.flip(1)], dim=1)  # (2, 50, C), also each channel seeing another value
    x = x.roll(shifts=1, dims=2)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    params = exact_params(channels, cdt)
    g = grad_like(x)
    got = run_backend("cpu", x, params, -1, g)
    ref = run_backend("reference", x, params, -1, g)
    tb = run_backend("torch", x, params, -1, g)
    assert_close(got, ref, ("y", "dx"), rtol=1e-5, atol=1e-6)
    assert torch.equal(got["dx"], tb["dx"]), "dx: region differs from the torch backend at a breakpoint"
    assert_close(got, tb, KEYS, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_and_inf(dtype):
    channels = 19
    params = exact_params(channels, dtype)
    params[3][::3] = 0.0  # K_L flat in every third channel
    params[4][1::3] = 0.0  # K_R flat in others
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -2.0, 2.0, 7.0], dtype=dtype)
    x = special[torch.arange(5 * 21 * channels) % 7].view(5, 21, channels)  # every value in every channel
    g = torch.ones_like(x)
    got = run_backend("cpu", x, params, -1, g)
    ref = run_backend("reference", x, params, -1, g)
    assert torch.equal(torch.isnan(got["y"]), torch.isnan(x)), "NaN in -> NaN out, and only there"
    assert_close(got, ref, ("y", "dx"), rtol=1e-6, atol=1e-6)
    assert_close(got, run_backend("torch", x, params, -1, g), KEYS, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rule(dtype):
    params = random_params(33, 16, seed=3)

    def fast(x, *p, channel_dim):
        with pwlu.use_backend("cpu"):
            return pwlu.pwlu(x, *p, channel_dim=channel_dim)

    assert_low_precision_rule(fast, spread((3, 21, 33), torch.float32), params, -1, dtype)


@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_plan_forward(channels_last):
    """The eval path (an inference plan, no autograd) on partial tiles: same y as the reference."""
    c = 33
    m = pwlu.PWLU(c, 16, channel_dim=1 if channels_last else -1)
    if hasattr(m, "set_collecting"):
        m.set_collecting(False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.points.copy_(torch.randn(m.points.shape, generator=gen))
    shape = (3, c, 5, 7) if channels_last else (3, 35, c)
    x = spread(shape, torch.float32, seed=1, channels_last=channels_last)
    m.eval()
    with torch.no_grad(), pwlu.use_backend("cpu"):
        first, second = m(x), m(x)  # the second call runs the plan made by the first
    params = [p.detach() for p in (m.points, m.left_bound, m.right_bound, m.left_slope, m.right_slope)]
    want = pwlu.pwlu_reference(x, *params, channel_dim=1 if channels_last else -1)
    for y in (first, second):
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert isinstance(m, nn.Module)


def test_threads_split_inside_a_row_tile():
    """Above the one-thread grain the rows are split among threads at any row (not a multiple of
    16): every partial tile at a split, bit for bit the one-thread result for y and dx."""
    if torch.get_num_threads() < 2:
        pytest.skip("one thread")
    shape = (1, 4099, 33)  # 135267 elements: above GRAIN_SIZE
    params = random_params(33, 16, seed=9)
    x = spread(shape, torch.float32, seed=9)
    g = grad_like(x)
    got = run_backend("cpu", x, params, -1, g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_backend("cpu", x, params, -1, g)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got["y"], one["y"]) and torch.equal(got["dx"], one["dx"])
    assert_close(got, one, KEYS, rtol=1e-6, atol=1e-7)
