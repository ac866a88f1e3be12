"""The compiled CPU backend against pwlu_reference and the torch backend.

Expectations come from the reference differentiated by autograd (in float64 where sums
over many elements are compared) and from the vectorised-torch backend, never from the
CPU backend itself.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import pwlu
import pwlu.ops.cpu as cpu_package
from helpers import PARAM_NAMES, assert_low_precision_rule, max_err, random_params
from pwlu.ops import dispatch, torch_backend
from pwlu.ops.cpu import backend as cpu_backend
from pwlu.ops.cpu import build as cpu_build

pytestmark = pytest.mark.skipif(not cpu_backend.is_available(torch.device("cpu")), reason="no C compiler")

KEYS = ("y", "dx") + tuple(f"d{n}" for n in PARAM_NAMES)


def run_backend(backend, x, params, channel_dim, grad_out):
    """Forward and all six gradients, forward and backward both inside ``use_backend``."""
    x = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in params]
    with pwlu.use_backend(backend):
        y = pwlu.pwlu(x, *params, channel_dim=channel_dim)
        y.backward(grad_out)
    return {"y": y.detach(), "dx": x.grad, **{f"d{n}": p.grad for n, p in zip(PARAM_NAMES, params)}}


def run_reference64(x, params, channel_dim, grad_out):
    """The reference in float64 (the truth for sums over many elements)."""
    return run_backend("reference", x.double(), [p.double() for p in params], channel_dim, grad_out.double())


def spread_input(shape, dtype, seed=0):
    """Mostly N(0, 3^2): many points left of B_L and right of B_R, all regions populated."""
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def grad_like(x, seed=123):
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(x.dtype)


def assert_all_close(got, want, rtol, atol, keys=KEYS):
    for key in keys:
        assert got[key].dtype == want[key].dtype or want[key].dtype == torch.float64, key
        assert got[key].shape == want[key].shape, key
        finite = want[key].double()[torch.isfinite(want[key])]
        scale = finite.abs().max().item() + 1.0 if finite.numel() else 1.0
        torch.testing.assert_close(
            got[key].double(),
            want[key].double(),
            rtol=rtol,
            atol=atol * scale,
            equal_nan=True,
            msg=lambda m, key=key: f"{key}: {m}",
        )


# (shape, channel_dim, channel-wise?)
CASES = [
    ((1, 1, 1023), 1, True),
    ((3, 7, 256), 1, True),
    ((3, 7, 256), 1, False),
    ((5, 40), 1, True),  # 2-D: channels fastest
    ((37,), 0, False),
    ((2, 6, 9, 11), 1, True),  # NCHW, odd sizes
    ((8, 72, 11, 11), 1, True),  # short rows above the one-thread grain: channels split across threads
    ((2, 9, 20), -1, True),  # (B, T, C)
    ((4, 5, 17), -1, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,channel_dim,channel_wise", CASES)
def test_matches_reference_and_torch_backend(shape, channel_dim, channel_wise, dtype):
    num_channels = shape[channel_dim] if channel_wise else None
    params = random_params(num_channels, 16, dtype=dtype, seed=len(shape))
    x = spread_input(shape, dtype)
    g = grad_like(x)
    got = run_backend("cpu", x, params, channel_dim, g)
    tight = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    # elementwise outputs against the reference in the same dtype
    want = run_backend("reference", x, params, channel_dim, g)
    assert_all_close(got, want, keys=("y", "dx"), **tight)
    for key in KEYS:
        assert got[key].dtype == want[key].dtype, key
    # every gradient against the float64 reference
    assert_all_close(got, run_reference64(x, params, channel_dim, g), **tight)
    # and against the torch backend (same tables, same regions)
    assert_all_close(got, run_backend("torch", x, params, channel_dim, g), **tight)


@pytest.mark.parametrize("n", [1, 3, 30, 40, 64])
def test_any_number_of_intervals(n):
    """N + 2 <= 32 looks tables up in registers, larger N gathers: both paths."""
    params = random_params(6, n, seed=n)
    for shape, cd in (((2, 6, 50), 1), ((9, 6), 1)):
        x = spread_input(shape, torch.float32, seed=n)
        g = grad_like(x)
        got = run_backend("cpu", x, params, cd, g)
        # fp32 rounding of the folded tables grows with N: loose against float64, tight against torch
        assert_all_close(got, run_reference64(x, params, cd, g), rtol=1e-4, atol=1e-5)
        assert_all_close(got, run_backend("torch", x, params, cd, g), rtol=1e-5, atol=1e-6)


def exact_params(num_channels, dtype):
    """B_L = -2, B_R = 2, N = 8: d = 0.5 and every breakpoint is exact in every dtype."""
    shape = () if num_channels is None else (num_channels,)
    g = torch.Generator().manual_seed(5)
    points = torch.randn(*shape, 9, generator=g, dtype=torch.float64).to(dtype)
    left = torch.full(shape, -2.0, dtype=dtype)
    right = torch.full(shape, 2.0, dtype=dtype)
    slopes = [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(2)]
    return [points, left, right, *slopes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channel_wise", [True, False])
def test_exact_breakpoints_and_bounds(dtype, channel_wise):
    """x exactly on every breakpoint, on B_L and B_R and just around them: same regions as the reference."""
    grid = torch.arange(-12, 13, dtype=torch.float64) * 0.25  # -3 .. 3, every breakpoint and midpoint
    x = grid.repeat(3, 4, 1).to(dtype)  # (3, 4, 25), channels on axis 1
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    params = exact_params(4 if channel_wise else None, cdt)
    g = grad_like(x)
    got = run_backend("cpu", x, params, 1, g)
    ref = run_backend("reference", x, params, 1, g)
    tb = run_backend("torch", x, params, 1, g)
    # one-sided values: a region mismatch at a breakpoint would change y only by rounding,
    # but dx (the slope of the chosen region) by O(1)
    assert_all_close(got, ref, keys=("y", "dx"), rtol=1e-5, atol=1e-6)
    assert torch.equal(got["dx"], tb["dx"]), "dx: region differs from the torch backend"
    assert_all_close(got, tb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_and_inf(dtype):
    params = exact_params(3, dtype)
    params[3] = torch.tensor([0.0, 0.5, -1.0], dtype=dtype)  # K_L: flat in channel 0
    params[4] = torch.tensor([1.0, 0.0, 2.0], dtype=dtype)  # K_R: flat in channel 1
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -2.0, 2.0], dtype=dtype)
    x = special.repeat(2, 3, 1)
    g = torch.ones_like(x)
    got = run_backend("cpu", x, params, 1, g)
    ref = run_backend("reference", x, params, 1, g)
    tb = run_backend("torch", x, params, 1, g)
    assert torch.isnan(got["y"][:, :, 0]).all(), "NaN input must give NaN output"
    assert_all_close(got, ref, keys=("y", "dx"), rtol=1e-6, atol=1e-6)
    assert_all_close(got, tb, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["rows", "channels-fastest"])
def test_finite_input_whose_offset_overflows(layout):
    """A range far from 0 (its shift is B_L = 1e38) and a finite x = -3e38: x - shift overflows to
    -inf, and a flat outer piece must still give its value, not 0 * inf = NaN (the kernel's fast
    FMA path checks x - shift, not x, for infinities; a mutation checking x passed every other
    test)."""
    left, right = torch.tensor([1e38, 1e38]), torch.tensor([2e38, 2e38])
    points = torch.tensor([[1.0, 2.0, 3.0], [5.0, 6.0, 7.0]])
    flat = torch.zeros(2)
    x = torch.tensor([-3e38, -1e30, 3e38, 1.5e38] * 20).reshape(1, 1, 80).expand(2, 2, 80).contiguous()
    cd = 1
    if layout == "channels-fastest":
        x, cd = x.transpose(1, 2).contiguous(), -1
    for backend in ("cpu", "reference"):
        with pwlu.use_backend(backend), torch.no_grad():
            y = pwlu.pwlu(x, points, left, right, flat, flat, channel_dim=cd)
        assert torch.isfinite(y).all(), backend
        if backend == "cpu":
            got = y
    torch.testing.assert_close(got, y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape,channel_dim,channel_wise",
    [((3, 7, 256), 1, True), ((1, 1, 1023), 1, False), ((4, 9, 24), -1, True), ((6, 24), 1, True)],
)
def test_low_precision_rule(dtype, shape, channel_dim, channel_wise):
    num_channels = shape[channel_dim] if channel_wise else None
    params = random_params(num_channels, 16, seed=3)

    def fast(x, *p, channel_dim):
        with pwlu.use_backend("cpu"):
            return pwlu.pwlu(x, *p, channel_dim=channel_dim)

    # the backward also runs on the cpu backend: auto selects it for CPU tensors
    assert dispatch.select(torch.device("cpu")) is cpu_package.BACKEND
    assert_low_precision_rule(fast, spread_input(shape, torch.float32), params, channel_dim, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_output_dtype_and_rounding(dtype):
    """Storage in the input dtype, rounded to nearest from the fp32 result (same kernel, fp32 input)."""
    x = spread_input((2, 5, 333), dtype)
    params = random_params(5, 16, seed=1)
    g = grad_like(x)
    got = run_backend("cpu", x, params, 1, g)
    f32 = run_backend("cpu", x.float(), params, 1, g.float())
    assert got["y"].dtype == dtype and got["dx"].dtype == dtype
    assert max_err(got["y"], f32["y"].to(dtype)) == 0.0
    assert max_err(got["dx"], f32["dx"].to(dtype)) == 0.0
    # and within one rounding of the torch backend (whose tables are folded by torch ops)
    tb = run_backend("torch", x, params, 1, g)
    assert_all_close(got, tb, rtol=1e-2, atol=1e-2, keys=("y", "dx"))


def test_channels_last_and_memory_format():
    x = spread_input((2, 12, 7, 9), torch.float32).contiguous(memory_format=torch.channels_last)
    params = random_params(12, 16, seed=2)
    g = grad_like(x)
    got = run_backend("cpu", x, params, 1, g)
    assert got["y"].is_contiguous(memory_format=torch.channels_last)
    assert got["dx"].is_contiguous(memory_format=torch.channels_last)
    assert_all_close(got, run_reference64(x, params, 1, g), rtol=1e-5, atol=1e-6)
    # a contiguous gradient for a channels-last input
    got2 = run_backend("cpu", x, params, 1, g.contiguous())
    assert_all_close(got2, got, rtol=1e-6, atol=1e-7)


def test_non_dense_input_and_broadcast_grad():
    base = spread_input((4, 10, 30), torch.float32)
    x = base[:, :, ::3].transpose(0, 2)  # (10, 10, 4), strided, channels on axis 1
    params = random_params(10, 8, seed=4)
    g = torch.ones(()).expand(x.shape)
    got = run_backend("cpu", x, params, 1, g)
    assert_all_close(got, run_reference64(x, params, 1, g), rtol=1e-5, atol=1e-6)


def test_empty_input():
    x = torch.empty(0, 3, 4)
    params = random_params(3, 4)
    got = run_backend("cpu", x, params, 1, torch.empty(0, 3, 4))
    assert got["y"].shape == (0, 3, 4)
    assert all(float(got[f"d{n}"].abs().sum()) == 0.0 for n in PARAM_NAMES)


def test_backend_functions_directly_match_torch_backend():
    """The interface itself: forward(..., shift) and backward() -> (dx, hist) in the compute dtype."""
    from pwlu.ops.folding import fold_tables

    x = spread_input((3, 5, 77), torch.float32)
    g = grad_like(x)
    params = random_params(5, 16, seed=9)
    slopes, intercepts, left, right, inv_d, shift = fold_tables(*params)
    y = cpu_backend.forward(x, slopes, intercepts, left, right, inv_d, 1, shift)
    y_t = torch_backend.forward(x, slopes, intercepts, left, right, inv_d, 1, shift)
    torch.testing.assert_close(y, y_t, rtol=1e-6, atol=1e-6)
    dx, hist = cpu_backend.backward(g, x, slopes, left, right, inv_d, 1)
    dx_t, hist_t = torch_backend.backward(g, x, slopes, left, right, inv_d, 1)
    assert hist.dtype == torch.float32 and hist.shape == (5, 18, 2)
    torch.testing.assert_close(dx, dx_t, rtol=0, atol=0)
    torch.testing.assert_close(hist, hist_t, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "shape,channel_dim", [((8, 16, 40, 40), 1), ((16, 64, 9, 9), 1), ((64, 50, 32), -1), ((200000,), 0)]
)
def test_parameter_gradients_are_deterministic(shape, channel_dim):
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        channel_wise = len(shape) > 1
        params = random_params(shape[channel_dim] if channel_wise else None, 16, seed=6)
        x = spread_input(shape, torch.float32)
        g = grad_like(x)
        first = run_backend("cpu", x, params, channel_dim, g)
        second = run_backend("cpu", x, params, channel_dim, g)
    finally:
        torch.set_num_threads(previous)
    for key in KEYS:
        assert torch.equal(first[key], second[key]), f"{key} differs between two identical runs"


@pytest.mark.parametrize("shape", [(4, 2, 131072), (40000, 24)])
def test_large_sums_are_accurate(shape):
    """Histograms end in double: parameter gradients over ~1M elements match float64.

    (4, 2, 131072) runs the channel-segment path, (40000, 24) the channels-fastest one.
    """
    x = spread_input(shape, torch.float32)
    params = random_params(shape[1], 16, seed=8)
    g = grad_like(x)
    got = run_backend("cpu", x, params, 1, g)
    assert_all_close(got, run_reference64(x, params, 1, g), rtol=2e-6, atol=1e-6)


def test_missing_compiler_falls_back_with_one_warning(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_build / "no-such-compiler"))
    cpu = torch.device("cpu")
    with pytest.warns(RuntimeWarning, match="falling back to the slower torch backend"):
        assert not cpu_backend.is_available(cpu)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert not cpu_backend.is_available(cpu)
        assert dispatch.select(cpu) is torch_backend.BACKEND
        x = spread_input((2, 3, 50), torch.float32)
        params = random_params(3, 8)
        g = grad_like(x)
        got = run_backend("auto", x, params, 1, g)
    assert_all_close(got, run_reference64(x, params, 1, g), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="not available"), pwlu.use_backend("cpu"):
        pwlu.pwlu(x, *params, channel_dim=1)
    assert not list(fresh_build.glob("*.so"))


def test_build_is_cached_in_build_dir(fresh_build):
    assert cpu_backend.is_available(torch.device("cpu"))
    built = list(fresh_build.glob("pwlu_cpu_*.so"))
    assert len(built) == 1 and not list(fresh_build.glob("*.tmp*"))
    mtime = built[0].stat().st_mtime_ns
    cpu_build._reset_for_tests()
    assert cpu_backend.is_available(torch.device("cpu"))
    assert built[0].stat().st_mtime_ns == mtime, "a cached build must be reused, not rebuilt"


def test_portable_path_without_avx512(fresh_build, monkeypatch):
    """The scalar C path (what a machine without AVX-512 or AVX2 runs), built without -march=native."""
    monkeypatch.setattr(cpu_build, "_FLAG_SETS", (cpu_build.TARGET_FLAGS["portable"],))
    lib = cpu_backend.library()
    assert lib is not None and not lib.pwlu_cpu_has_avx512() and not lib.pwlu_cpu_has_avx2()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape, cd in (((2, 5, 61), 1), ((7, 5), 1), ((3, 4, 5), -1)):
            x = spread_input(shape, dtype)
            params = random_params(5, 16, seed=11)
            g = grad_like(x)
            got = run_backend("cpu", x, params, cd, g)
            tb = run_backend("torch", x, params, cd, g)
            assert_all_close(got, tb, rtol=1e-5, atol=1e-5)


AVX2_FLAGS = cpu_build.TARGET_FLAGS["avx2"]


@pytest.fixture
def avx2_build(fresh_build, monkeypatch):
    """The AVX2 path (what x86 CPUs without AVX-512 run), built with AVX2, FMA and F16C and
    without -march=native, so that a machine with AVX-512 runs it too."""
    cpu_flags = cpu_build._cpu_flags().split()
    missing = [f for f in ("avx2", "fma", "f16c") if f not in cpu_flags]
    if missing:
        pytest.skip(f"this CPU cannot run the AVX2 path (no {', '.join(missing)})")
    monkeypatch.setattr(cpu_build, "_FLAG_SETS", (AVX2_FLAGS,))
    lib = cpu_backend.library()
    assert lib is not None and lib.pwlu_cpu_has_avx2() and not lib.pwlu_cpu_has_avx512()
    return lib


# N: tables in 1, 2, 3 and 4 registers (N + 2 <= 32), and N = 31 (the scalar fallback)
@pytest.mark.parametrize("n", [1, 6, 7, 14, 16, 22, 30, 31])
def test_avx2_path_matches_reference(avx2_build, n):
    """Every way through the AVX2 kernels: row segments with tails (NCHW), rows of C channels
    in 8 x 8 tiles with partial tiles on both edges (2-D, (B, T, C), channels-last), channel-
    and layer-wise, against the float64 reference and the torch backend."""
    cases = [((2, 6, 50), 1, True), ((3, 5, 7, 3), 1, True), ((11, 13), 1, True), ((3, 19, 21), -1, True),
             ((17, 16), 1, False), ((4, 9, 8), -1, False)]
    for shape, cd, channel_wise in cases:
        x = spread_input(shape, torch.float32, seed=n)
        params = random_params(shape[cd] if channel_wise else None, n, seed=n)
        g = grad_like(x)
        got = run_backend("cpu", x, params, cd, g)
        assert_all_close(got, run_reference64(x, params, cd, g), rtol=1e-4, atol=1e-5)
        assert_all_close(got, run_backend("torch", x, params, cd, g), rtol=1e-5, atol=1e-6)


@pytest.fixture(params=["avx2", "portable"])
def avx2_or_portable_build(request, fresh_build, monkeypatch):
    """The AVX2 build, then the portable one (the scalar loop: CPUs without AVX2, ARM)."""
    if request.param == "avx2":
        return request.getfixturevalue("avx2_build")
    monkeypatch.setattr(cpu_build, "_FLAG_SETS", (cpu_build.TARGET_FLAGS["portable"],))
    lib = cpu_backend.library()
    assert lib is not None and not lib.pwlu_cpu_has_avx2() and not lib.pwlu_cpu_has_avx512()
    return lib


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_avx2_and_scalar_paths_breakpoints_specials_and_low_precision(avx2_or_portable_build, dtype):
    """x on every breakpoint and bound, NaN and +-inf with flat outer pieces, in every storage
    dtype and both layouts: the regions of the torch backend (dx equal), NaN in gives NaN out
    (the scalar loop selects a flat piece's value without a branch: the same results)."""
    grid = torch.arange(-12, 13, dtype=torch.float64) * 0.25  # -3 .. 3, every breakpoint and midpoint
    special = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
    row = torch.cat([grid, special])  # 28 values
    params = exact_params(4, torch.float32)
    params[3] = torch.tensor([0.0, 0.5, -1.0, 2.0])  # K_L: flat in channel 0
    params[4] = torch.tensor([1.0, 0.0, 2.0, -0.5])  # K_R: flat in channel 1
    for cd, x in ((1, row.repeat(3, 4, 1)), (-1, row.repeat(3, 4, 1).transpose(1, 2).contiguous())):
        x = x.to(dtype)
        g = grad_like(x)
        got = run_backend("cpu", x, params, cd, g)
        tb = run_backend("torch", x, params, cd, g)
        assert got["y"].dtype == dtype
        assert torch.isnan(got["y"][x.isnan()]).all(), "NaN input must give NaN output"
        finite = x.isfinite()
        assert torch.equal(got["dx"][finite], tb["dx"][finite]), "dx: region differs from the torch backend"
        assert_all_close(got, tb, keys=("y", "dx"), rtol=1e-5, atol=1e-6)
        if dtype == torch.float32:  # parameter gradients (the NaN rows make them NaN in the reference too)
            xf, gf = x[..., :25] if cd == 1 else x[:, :25], g[..., :25] if cd == 1 else g[:, :25]
            assert_all_close(run_backend("cpu", xf, params, cd, gf), run_reference64(xf, params, cd, gf),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_c_fold_matches_torch_fold(dtype):
    """The C folding gives the region parameters bit for bit (breakpoint consistency with the
    reference) and the tables to rounding, also for collapsed ranges."""
    from pwlu.ops import folding as common
    from pwlu.ops.cpu import backend as cpu_backend

    g = torch.Generator().manual_seed(0)
    c, n = 9, 16
    points = torch.randn(c, n + 1, generator=g, dtype=dtype)
    left = torch.randn(c, generator=g, dtype=dtype) * 3
    right = left + torch.rand(c, generator=g, dtype=dtype) * 5 + 0.01
    right[0], right[1], right[2] = left[0], left[1] - 1, left[2] + 1e-3
    slopes = torch.randn(2, c, generator=g, dtype=dtype)
    got = cpu_backend.fold_tables(points, left, right, slopes[0], slopes[1])
    want = common.fold_tables(points, left, right, slopes[0], slopes[1])
    for name, a, b in zip(("slopes", "intercepts", "left", "right", "inv_d", "shift"), got, want):
        if name == "intercepts":
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("channel_wise", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fused_entry_points_match_the_table_path(channel_wise, dtype):
    """forward_from_params / backward_from_params (fold, kernel and gradient epilogue in one C
    call, what pwlu.pwlu runs on CPU) against the torch folding + the same kernels + the torch
    epilogue, including channels whose range collapsed below MIN_WIDTH."""
    from pwlu.ops import folding as common

    c, n = (6, 8) if channel_wise else (1, 8)
    g = torch.Generator().manual_seed(3)
    points = torch.randn(c, n + 1, generator=g)
    left = torch.randn(c, generator=g)
    right = left + torch.rand(c, generator=g) * 4 + 0.5
    right[0] = left[0] - 0.5  # collapsed: the effective B_R is B_L + MIN_WIDTH, dB_R goes to B_L
    kl, kr = torch.randn(2, c, generator=g)
    params = [points, left, right, kl, kr] if channel_wise else [points[0], left[0], right[0], kl[0], kr[0]]
    cd = 1 if channel_wise else None
    x = spread_input((3, c, 37), dtype)
    x[0, 0, :3] = left[0]  # exactly on the collapsed range
    gy = grad_like(x)
    y = cpu_backend.forward_from_params(x, *params, cd)
    dx, grads = cpu_backend.backward_from_params(gy, x, *params, cd)

    cdt = common.compute_dtype(dtype)
    two_d = [p.to(cdt).reshape(-1, n + 1) if i == 0 else p.to(cdt).reshape(-1) for i, p in enumerate(params)]
    slopes, intercepts, lo, hi, inv_d, shift = common.fold_tables(*two_d)
    assert torch.equal(y, cpu_backend.forward(x, slopes, intercepts, lo, hi, inv_d, cd, shift))
    dx_t, hist = torch_backend.backward(gy, x, slopes, lo, hi, inv_d, cd)
    torch.testing.assert_close(dx, dx_t, rtol=0, atol=0)
    want = common.param_grads_from_histogram(
        hist.double(), *(p.double() for p in two_d), slopes.double()
    )
    assert len(grads) == 5
    for name, got, w, p in zip(PARAM_NAMES, grads, want, params):
        assert got.shape == p.shape and got.dtype == p.dtype, name
        tol = 1e-4 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(got.double(), w.reshape(p.shape), rtol=tol, atol=tol * (w.abs().max().item() + 1), msg=name)
    assert grads[2].reshape(-1)[0] == 0 and grads[1].reshape(-1)[0] != 0  # collapsed: dB_R moved to B_L


def _fp16_all_ops_vs_reference():
    """pwlu (N = 6: vector tables; N = 31: the scalar loop), npwlu and pwlu2d on fp16 data with
    the cpu backend against their float64 references: outputs within fp16 rounding."""
    torch.manual_seed(3)
    x = (torch.randn(2, 3, 37) * 2).half()
    y = (torch.randn(2, 3, 37) * 2).half()
    for n in (6, 31):
        params = random_params(3, n, seed=5)
        with pwlu.use_backend("cpu"):
            got = pwlu.pwlu(x, *params, channel_dim=1)
        want = pwlu.pwlu_reference(x.double(), *(p.double() for p in params), channel_dim=1)
        assert (got.double() - want).abs().max() < 2e-2 * (want.abs().max() + 1), f"pwlu N={n}"
    m = pwlu.NPWLU(num_channels=3, num_intervals=8)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    names = ("points", "width_logits", "left_bound", "right_bound", "left_slope", "right_slope")
    nparams = [getattr(m, name).detach() for name in names]
    with pwlu.use_backend("cpu"):
        got = pwlu.npwlu(x, *nparams, channel_dim=1)
    want = pwlu.npwlu_reference(x.double(), *(p.double() for p in nparams), channel_dim=1)
    assert (got.double() - want).abs().max() < 2e-2 * (want.abs().max() + 1), "npwlu"
    merge = pwlu.PWLU2D(num_channels=3, num_intervals=4)
    with torch.no_grad():
        merge.values.add_(torch.randn_like(merge.values) * 0.3)
    names = ("values", "x_left_bound", "x_right_bound", "y_left_bound", "y_right_bound")
    names += ("x_left_slope", "x_right_slope", "y_left_slope", "y_right_slope")
    mparams = [getattr(merge, name).detach() for name in names]
    with pwlu.use_backend("cpu"):
        got = pwlu.pwlu2d(x, y, *mparams, channel_dim=1)
    want = pwlu.pwlu2d_reference(x.double(), y.double(), *(p.double() for p in mparams), channel_dim=1)
    assert (got.double() - want).abs().max() < 2e-2 * (want.abs().max() + 1), "pwlu2d"


@pytest.mark.parametrize(
    "flags, f16_kernels",
    [
        (AVX2_FLAGS, True),  # no _Float16: the scalar loads and stores convert with F16C
        (cpu_build.TARGET_FLAGS["portable"], False),  # neither: fp16 is computed in fp32
    ],
)
def test_fp16_without_float16_type(fresh_build, monkeypatch, flags, f16_kernels):
    """A compiler without ``_Float16`` (gcc <= 11, clang < 15; simulated with -U__FLT16_MAX__):
    regression test, the AVX2 build read and wrote fp16 as bf16 in its scalar loops (pwlu with
    N + 2 > 32, npwlu, pwlu2d: errors of 2-3 where fp16 rounding is 1e-3)."""
    from pwlu.ops import npwlu_cpu_backend, pwlu2d_cpu_backend

    if "-mf16c" in flags and "f16c" not in cpu_build._cpu_flags().split():
        pytest.skip("this CPU has no F16C")
    monkeypatch.setattr(cpu_build, "_FLAG_SETS", ((*flags, "-U__FLT16_MAX__"),))
    libs = (cpu_backend.library(), npwlu_cpu_backend.NPWLU_CPU.get(), pwlu2d_cpu_backend.PWLU2D_CPU.get())
    assert all(lib is not None for lib in libs)
    has = (libs[0].pwlu_cpu_has_f16(), libs[1].npwlu_cpu_has_f16(), libs[2].pwlu2d_cpu_has_f16())
    assert has == (int(f16_kernels),) * 3
    _fp16_all_ops_vs_reference()
