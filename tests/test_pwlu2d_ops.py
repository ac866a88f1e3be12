"""2-D PWLU ops (SPEC section 10): the reference against an element-by-element loop, every
fast path against the reference (forward, dx, dy and the nine parameter gradients),
gradcheck, addition at init, low precision, double backward and bad input."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import pwlu

NAMES = (
    "values",
    "x_left_bound",
    "x_right_bound",
    "y_left_bound",
    "y_right_bound",
    "x_left_slope",
    "x_right_slope",
    "y_left_slope",
    "y_right_slope",
)


def addition_params(n, channels=None, xr=(-2.0, 2.0), yr=(-1.0, 3.0), dtype=torch.float64):
    """Parameters of z = x + y (V[i, j] = X_i + Y_j, all slopes 1), written from SPEC section 10."""
    grid_x = torch.tensor([xr[0] + k * (xr[1] - xr[0]) / n for k in range(n + 1)], dtype=dtype)
    grid_y = torch.tensor([yr[0] + k * (yr[1] - yr[0]) / n for k in range(n + 1)], dtype=dtype)
    values = grid_x[:, None] + grid_y[None, :]
    scalars = [torch.tensor(v, dtype=dtype) for v in (*xr, *yr, 1.0, 1.0, 1.0, 1.0)]
    if channels is not None:
        values = values.expand(channels, n + 1, n + 1).clone()
        scalars = [s.expand(channels).clone() for s in scalars]
    return [values, *scalars]


def random_params(n, channels=None, dtype=torch.float64, seed=0):
    """Random (non-additive) parameters around a grid of [-2, 2] x [-1, 3]."""
    gen = torch.Generator().manual_seed(seed)
    params = addition_params(n, channels, dtype=dtype)
    return [p + 0.4 * torch.randn(p.shape, generator=gen, dtype=dtype) for p in params]


def loop_pwlu2d(x, y, params, channel_dim=1):
    """SPEC section 10 element by element, in Python floats (float64)."""
    values = params[0].double()
    others = [p.double() for p in params[1:]]
    n = values.shape[-1] - 1
    out = torch.empty(x.shape, dtype=torch.float64)
    cd = channel_dim % max(x.dim(), 1)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in x.shape]).reshape(-1, x.dim()).tolist():
        idx = tuple(idx)
        c = idx[cd] if values.dim() == 3 else None
        v = values[c] if c is not None else values
        xl, xr, yl, yr, kxl, kxr, kyl, kyr = (float(p[c] if c is not None else p) for p in others)
        xr = max(xr, xl + pwlu.MIN_WIDTH) if xr - xl < pwlu.MIN_WIDTH else xr
        yr = max(yr, yl + pwlu.MIN_WIDTH) if yr - yl < pwlu.MIN_WIDTH else yr
        a, b = float(x[idx]), float(y[idx])
        ac, bc = min(max(a, xl), xr), min(max(b, yl), yr)
        u = (ac - xl) * n / (xr - xl) if a < xr else float(n)
        w = (bc - yl) * n / (yr - yl) if b < yr else float(n)
        i, j = min(math.floor(u), n - 1), min(math.floor(w), n - 1)
        s, t = u - i, w - j
        if s >= t:
            f = float(v[i, j] + s * (v[i + 1, j] - v[i, j]) + t * (v[i + 1, j + 1] - v[i + 1, j]))
        else:
            f = float(v[i, j] + t * (v[i, j + 1] - v[i, j]) + s * (v[i + 1, j + 1] - v[i, j + 1]))
        out[idx] = f + kxl * min(a - xl, 0) + kxr * max(a - xr, 0) + kyl * min(b - yl, 0) + kyr * max(b - yr, 0)
    return out


def region_inputs(shape, n=4, seed=0, dtype=torch.float64):
    """x, y covering the inside (both triangles), grid lines, the diagonals, outside on
    each side and at each corner, for the grid [-2, 2] x [-1, 3] with N = 4."""
    gen = torch.Generator().manual_seed(seed)
    count = math.prod(shape)
    x = torch.rand(count, generator=gen, dtype=torch.float64) * 7 - 3.5  # [-3.5, 3.5]
    y = torch.rand(count, generator=gen, dtype=torch.float64) * 7 - 2.5  # [-2.5, 4.5]
    special = [
        (-2.0, -1.0),
        (2.0, 3.0),
        (-2.0, 3.0),
        (2.0, -1.0),  # corners of the grid exactly
        (-1.0, 0.5),
        (0.3, 0.0),
        (1.0, 1.0),  # on grid lines
        (-3.0, -2.0),
        (3.0, 4.0),
        (-3.0, 4.0),
        (3.0, -2.0),  # outside, at each corner
        (-3.0, 1.2),
        (3.0, 1.2),
        (0.4, -2.0),
        (0.4, 4.0),  # outside, on each side
    ]
    for k, (a, b) in enumerate(special[:count]):
        x[k], y[k] = a, b
    return x.reshape(shape).to(dtype), y.reshape(shape).to(dtype)


# ------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("channels, channel_dim", [(None, 1), (3, 1), (3, -1)])
def test_reference_matches_element_loop(channels, channel_dim):
    shape = (2, 3, 5) if channel_dim == 1 else (2, 5, 3)
    x, y = region_inputs(shape)
    params = random_params(4, channels)
    z = pwlu.pwlu2d_reference(x, y, *params, channel_dim=channel_dim)
    torch.testing.assert_close(z, loop_pwlu2d(x, y, params, channel_dim), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [None, 3])
def test_addition_at_init(dtype, channels):
    x, y = region_inputs((2, 3, 40), dtype=dtype)
    x = x * 3  # far outside too
    params = addition_params(4, channels, dtype=dtype)
    atol = 1e-12 if dtype == torch.float64 else 5e-6
    for fn in (pwlu.pwlu2d_reference, pwlu.pwlu2d):
        torch.testing.assert_close(fn(x, y, *params), x + y, rtol=0, atol=atol * (1 + (x + y).abs().max().item()))


@pytest.mark.parametrize("channels", [None, 3])
def test_reference_gradcheck(channels):
    x, y = region_inputs((2, 3, 6), seed=1)
    params = random_params(4, channels, seed=1)
    # keep clear of the kinks (grid lines, diagonals, bounds) where finite differences straddle two pieces
    inputs = [t.clone().requires_grad_() for t in (x + 1e-3, y + 2.3e-3, *params)]
    assert torch.autograd.gradcheck(lambda *a: pwlu.pwlu2d_reference(*a), inputs)


def test_nan_and_inf_inputs():
    params = random_params(4)
    x = torch.tensor([float("nan"), 0.5, float("inf"), -float("inf"), 0.2], dtype=torch.float64)
    y = torch.tensor([0.5, float("nan"), 0.5, 1.0, float("inf")], dtype=torch.float64)
    z = pwlu.pwlu2d_reference(x, y, *params)
    assert torch.isnan(z[:2]).all()
    assert z[2] == float("inf") * torch.sign(params[6]) and z[3] == -float("inf") * torch.sign(params[5])
    params[8] = torch.tensor(0.0, dtype=torch.float64)  # a flat outer piece: ±inf maps to its limit
    z = pwlu.pwlu2d_reference(x, y, *params)
    assert torch.isfinite(z[4])


# ------------------------------------------------------------------------------- bad input


def test_bad_input_names_the_value():
    params = addition_params(4)
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x.shape=\(2, 3\) and y.shape=\(3, 2\)"):
        pwlu.pwlu2d(x, torch.randn(3, 2, dtype=torch.float64), *params)
    with pytest.raises(TypeError, match="same dtype"):
        pwlu.pwlu2d(x, x.float(), *params)
    bad = list(params)
    bad[0] = torch.zeros(5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"values must have shape .* got shape \(5, 4\)"):
        pwlu.pwlu2d(x, x, *bad)
    bad = list(params)
    bad[5] = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x_left_slope must have shape \(\), but got \(3,\)"):
        pwlu.pwlu2d(x, x, *bad)
    bad = list(params)
    bad[4] = torch.tensor(float("nan"), dtype=torch.float64)
    with pytest.raises(ValueError, match="y_right_bound holds nan"):
        pwlu.pwlu2d(x, x, *bad)
    bad = list(params)
    bad[0] = bad[0].clone()
    bad[0][1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"values holds inf at index \(1, 2\)"):
        pwlu.pwlu2d(x, x, *bad)
    channel = addition_params(4, channels=5)
    with pytest.raises(ValueError, match="3 channels on axis 1.*num_channels=5"):
        pwlu.pwlu2d(x, x, *channel)
    with pytest.raises(TypeError, match="y to be a torch.Tensor"):
        pwlu.pwlu2d(x, 1.0, *params)


# ------------------------------------------------------------------------------- fast paths

BACKENDS = ["torch", "cpu", "triton"]
KEYS = ("z", "dx", "dy") + tuple(f"d{name}" for name in NAMES)


def run(fn, x, y, params, channel_dim, backend=None, seed=5):
    """Output and all eleven gradients of ``fn`` (under ``backend`` if given)."""
    x = x.detach().clone().requires_grad_(True)
    y = y.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in params]
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if backend is None:
        z = fn(x, y, *params, channel_dim=channel_dim)
    else:
        with pwlu.use_backend(backend):
            z = fn(x, y, *params, channel_dim=channel_dim)
    z.backward(grad.to(z.dtype))
    return dict(zip(KEYS, [z.detach(), x.grad, y.grad, *(p.grad for p in params)]))


def assert_all_close(fast, ref, rtol, atol):
    for key in KEYS:
        torch.testing.assert_close(fast[key], ref[key], rtol=rtol, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


def select_backend(backend):
    from pwlu.ops.dispatch import PWLU2D_BACKENDS

    if not PWLU2D_BACKENDS.is_available(backend, torch.device("cpu")):
        pytest.skip(f"{backend} backend not available here")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape, channels, channel_dim",
    [
        ((3, 5, 7), None, 1),
        ((2, 3, 5, 7), 3, 1),
        ((2, 7, 3), 3, -1),
        ((37,), None, 0),
        ((4, 3), 3, 1),
        ((2, 3, 301), 3, 1),  # rows longer than the CPU kernel's blocks, with a tail
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_path_matches_reference(backend, shape, channels, channel_dim, dtype):
    select_backend(backend)
    x, y = region_inputs(shape, seed=3, dtype=dtype)
    params = [p.to(dtype) for p in random_params(4, channels, seed=3)]
    fast = run(pwlu.pwlu2d, x, y, params, channel_dim, backend)
    ref = run(pwlu.pwlu2d_reference, x, y, params, channel_dim)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert_all_close(fast, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [5, 70])  # 70: the CPU kernel's vector path
def test_fast_path_at_exact_vertices_grid_lines_bounds_and_diagonals(backend, dtype, rows):
    """Inputs exactly on the grid (a [-2, 2] x [-1, 3] grid of N = 4: every grid line, vertex,
    bound and cell diagonal an exact binary value), with random vertex values and slopes, so that
    each point sits where the cell, the triangle or the outer side changes: forward and all eleven
    gradients against the reference, which decides those ties by SPEC section 10 (cells closed on
    the left, the lower triangle on the diagonal, outside from the right bound on)."""
    select_backend(backend)
    n = 4
    params = addition_params(n, 3, dtype=dtype)
    gen = torch.Generator().manual_seed(21)
    params[0] = params[0] + torch.randn(params[0].shape, generator=gen, dtype=dtype)  # not additive
    params[5:] = [p + 0.5 * torch.randn(p.shape, generator=gen, dtype=dtype) for p in params[5:]]
    gx = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=dtype)  # grid lines, bounds included
    gy = torch.tensor([-1.0, 0.0, 1.0, 2.0, 3.0], dtype=dtype)
    pts = [(a, b) for a in gx for b in gy]  # every vertex
    pts += [(a, b + 0.25) for a in gx for b in gy[:-1]]  # on x grid lines, inside cells in y
    pts += [(a + 0.5, b) for a in gx[:-1] for b in gy]  # on y grid lines
    pts += [(a + 0.5, b + 0.5) for a in gx[:-1] for b in gy[:-1]]  # on each cell's diagonal
    pts += [(a + 0.75, b + 0.25) for a in gx[:-1] for b in gy[:-1]]  # each side of it
    pts += [(a + 0.25, b + 0.75) for a in gx[:-1] for b in gy[:-1]]
    pts += [(-3.0, 0.0), (2.5, 0.0), (0.0, -1.5), (0.0, 3.5), (-3.0, -1.5), (2.5, 3.5), (-3.0, 3.5), (2.5, -1.5)]
    pts += [(-2.0, 3.5), (2.0, -1.5), (-3.0, 3.0), (2.5, -1.0)]  # outside along one axis, on the other's bound
    xs = torch.stack([torch.as_tensor(a) for a, _ in pts])
    ys = torch.stack([torch.as_tensor(b) for _, b in pts])
    batch = -(-len(pts) // (3 * rows))  # every point at least once
    idx = torch.arange(batch * 3 * rows) % len(pts)
    x, y = xs[idx].reshape(batch, 3, rows), ys[idx].reshape(batch, 3, rows)
    fast = run(pwlu.pwlu2d, x, y, params, 1, backend)
    ref = run(pwlu.pwlu2d_reference, x, y, params, 1)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert_all_close(fast, ref, rtol=tol, atol=tol)
    if rows == 5:  # and the reference against the element-by-element loop there
        torch.testing.assert_close(ref["z"].double(), loop_pwlu2d(x, y, params), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 8, 12])
def test_fast_path_other_grid_sizes(backend, n):
    """N = 1 (one cell), N = 8 (the CPU kernel's largest in-register table) and N = 12."""
    select_backend(backend)
    x, y = region_inputs((2, 3, 130), seed=11, dtype=torch.float32)
    params = [p.float() for p in addition_params(n, 3)]
    params = [p + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(n)) for p in params]
    fast = run(pwlu.pwlu2d, x, y, params, 1, backend)
    ref = run(pwlu.pwlu2d_reference, x, y, params, 1)
    assert_all_close(fast, ref, rtol=2e-5, atol=2e-5)


def test_cpu_kernel_threads():
    """Two threads (above the kernel's grain size) give the single-threaded result."""
    select_backend("cpu")
    x, y = region_inputs((2, 4, 100, 100), seed=12, dtype=torch.float64)
    params = random_params(4, 4, seed=12)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = run(pwlu.pwlu2d, x, y, params, 1, "cpu")
        torch.set_num_threads(1)
        one = run(pwlu.pwlu2d, x, y, params, 1, "cpu")
    finally:
        torch.set_num_threads(previous)
    assert_all_close(two, one, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_path_min_width_and_channels_last(backend):
    """A collapsed range (below MIN_WIDTH, its gradient goes to the left bound) and a
    channels-last (non-contiguous) input."""
    select_backend(backend)
    x, y = region_inputs((2, 3, 4, 5), seed=4)
    x, y = x.to(memory_format=torch.channels_last), y.to(memory_format=torch.channels_last)
    params = random_params(4, 3, seed=4)
    params[2] = params[1] + torch.tensor([1e-4, 0.5, 2.0], dtype=torch.float64)  # channel 0 collapsed
    fast = run(pwlu.pwlu2d, x, y, params, 1, backend)
    ref = run(pwlu.pwlu2d_reference, x, y, params, 1)
    assert_all_close(fast, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_path_nan_inf(backend):
    select_backend(backend)
    params = random_params(4, seed=6)
    params[8] = torch.tensor(0.0, dtype=torch.float64)
    x = torch.tensor([float("nan"), 0.5, float("inf"), -float("inf"), 0.2, 0.1], dtype=torch.float64)
    y = torch.tensor([0.5, float("nan"), 0.5, 1.0, float("inf"), 0.7], dtype=torch.float64)
    with pwlu.use_backend(backend):
        z = pwlu.pwlu2d(x, y, *params)
    torch.testing.assert_close(z, pwlu.pwlu2d_reference(x, y, *params), equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [6, 70])  # 70: the CPU kernel's vector path
@pytest.mark.parametrize("channels_last", [False, True])
def test_nan_input_gradients_match_reference(backend, rows, channels_last):
    """A NaN input makes NaN exactly the gradients whose weights involve it, in every backend and
    in the reference. Found by an adversarial review: the reference's unselected triangle passed
    0 * NaN to its vertices, so all four vertices of the cell were NaN there, against three
    (or fewer) in the kernels; the test compared only the forward."""
    select_backend(backend)
    params = random_params(4, 2, seed=7)
    g = torch.Generator().manual_seed(8)
    x = torch.rand(2, 2, rows, generator=g, dtype=torch.float64) * 4 - 2
    y = torch.rand(2, 2, rows, generator=g, dtype=torch.float64) * 4 - 2
    x[0, 0, 1] = float("nan")  # lower and upper triangles of other cells, both channels, both inputs
    x[1, 1, 3] = float("nan")
    y[0, 1, 2] = float("nan")
    y[1, 0, rows - 1] = float("nan")
    cd = 1
    if channels_last:  # (rows, 18) with the channels fastest: 2 of them hold the NaN above
        params = random_params(4, 18, seed=7)
        x, y = (t.movedim(1, -1).reshape(-1, 2).repeat(1, 9) for t in (x, y))
        cd = -1
    fast = run(pwlu.pwlu2d, x, y, params, cd, backend)
    ref = run(pwlu.pwlu2d_reference, x, y, params, cd)
    for key in KEYS:
        torch.testing.assert_close(fast[key], ref[key], rtol=1e-10, atol=1e-10, equal_nan=True,
                                   msg=lambda m, key=key: f"{key}: {m}")  # fmt: skip
    # the NaN reaches some vertex values, not all: the others keep finite gradients
    nan_vertices = torch.isnan(ref["dvalues"])
    assert nan_vertices.any() and not nan_vertices.all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fast_path_specials_long_rows(backend, n, dtype):
    """Rows long enough for the CPU kernel's vector path (and a tail): NaN and ±inf in each
    input, at a vector's first lane and in the tail, with a flat outer piece on a different
    side in each channel (±inf maps to that piece's limit); then every gradient with finite
    inputs far outside the grid. Low precision is compared with the reference on the same
    rounded inputs, computed in float32 and rounded once."""
    select_backend(backend)
    x, y = region_inputs((4, 4, 83), n=n, seed=13, dtype=torch.float64)
    params = [p.float() for p in random_params(n, 4, seed=13)]
    for c in range(4):
        params[5 + c][c] = 0.0  # channel c: outer slope c (K_XL, K_XR, K_YL, K_YR) flat
    specials = [(float("nan"), 0.5), (0.5, float("nan")), (float("inf"), 0.5), (-float("inf"), 0.5),
                (0.5, float("inf")), (0.5, -float("inf")), (float("inf"), -float("inf"))]  # fmt: skip
    for c in range(4):
        for k, (a, b) in enumerate(specials):
            pos = (16 + 3 * k) if k % 2 == 0 else (80 - k // 2)  # a vector's first lane, and the tail
            x[c % 4, c, pos], y[c % 4, c, pos] = a, b
    x, y = x.to(dtype), y.to(dtype)
    with pwlu.use_backend(backend):
        z = pwlu.pwlu2d(x, y, *params)
    ref = pwlu.pwlu2d_reference(x.float(), y.float(), *params).to(dtype)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(z, ref, rtol=tol, atol=tol, equal_nan=True)
    finite = [t.float().nan_to_num(nan=0.25, posinf=1e4, neginf=-1e4).to(dtype) for t in (x, y)]
    fast = run(pwlu.pwlu2d, *finite, params, 1, backend)
    ref = run(pwlu.pwlu2d_reference, *(t.float() for t in finite), params, 1)
    for key in KEYS:
        scale = 1.0 + ref[key].abs().max().item()
        torch.testing.assert_close(
            fast[key].float(), ref[key], rtol=tol, atol=tol * scale, msg=lambda m, key=key: f"{key}: {m}"
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", [None, 3])
def test_fast_path_gradcheck(backend, channels):
    select_backend(backend)
    x, y = region_inputs((2, 3, 6), seed=7)
    params = random_params(4, channels, seed=7)
    inputs = [t.clone().requires_grad_() for t in (x + 1e-3, y + 2.3e-3, *params)]
    # the interpreted Triton kernels are slow: one random projection (every gradient is also
    # compared with the reference's in float64 in test_fast_path_matches_reference)
    with pwlu.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *a: pwlu.pwlu2d(*a), inputs, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_rule(backend, dtype):
    """err(fast vs fp32 reference) <= 2 err(low-precision reference vs fp32 reference) + atol."""
    select_backend(backend)
    x, y = region_inputs((2, 3, 70), seed=8, dtype=torch.float32)
    params = [p.float() for p in random_params(4, 3, seed=8)]
    x, y = x.to(dtype).float(), y.to(dtype).float()  # the same representable inputs for all three
    ref32 = run(pwlu.pwlu2d_reference, x, y, params, 1)
    low_ref = run(pwlu.pwlu2d_reference, x.to(dtype), y.to(dtype), params, 1)
    fast = run(pwlu.pwlu2d, x.to(dtype), y.to(dtype), params, 1, backend)
    for key in KEYS:
        err = (fast[key].float() - ref32[key]).abs()
        err_low = (low_ref[key].float() - ref32[key]).abs().max().item()
        scale = ref32[key].abs().max().item()
        if (
            backend == "triton"
            and dtype == torch.bfloat16
            and key in ("z", "dx", "dy")
            and _interpreter_truncates_bf16()
        ):
            # the interpreter truncates float32 -> bfloat16 where a GPU rounds to nearest: one
            # more bfloat16 ulp per element
            err = err - ref32[key].abs() * 2.0**-7
        assert err.max().item() <= 2 * err_low + 1e-3 * (1 + scale), f"{key}: {err.max().item()} vs {err_low}"


@functools.cache
def _interpreter_truncates_bf16() -> bool:
    """Whether Triton runs interpreted here and its interpreter stores float32 into bfloat16 by
    truncation (Triton 3.8's does: 3.014 -> 3.0, where rounding, as on a GPU, gives 3.015625),
    measured on one store, so that a release that rounds needs no allowance."""
    from pwlu.ops import pwlu2d_triton_backend

    if not pwlu2d_triton_backend._INTERPRETED:
        return False
    import triton
    import triton.language as tl

    @triton.jit
    def store(src, dst, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs).to(dst.dtype.element_ty))

    src = torch.tensor([3.014051914215088, 1.0 + 2.0**-8 + 2.0**-10])
    dst = torch.empty(2, dtype=torch.bfloat16)
    store[(1,)](src, dst, BLOCK=2)
    return dst.tolist() == [3.0, 1.0]


def test_double_backward_and_saved_tensors():
    x, y = region_inputs((1, 3, 4), seed=9)
    params = random_params(2, 3, seed=9)
    inputs = [t.clone().requires_grad_() for t in (x + 1e-3, y + 2.3e-3, *params)]
    assert torch.autograd.gradgradcheck(lambda *a: pwlu.pwlu2d(*a), inputs)
    z = pwlu.pwlu2d(*inputs)
    assert type(z.grad_fn).__name__ == "PWLU2DFunctionBackward"
    saved = z.grad_fn.saved_tensors
    assert len(saved) == 11 and all(s.shape == t.shape for s, t in zip(saved, inputs))


def test_compile_sees_one_custom_op():
    x, y = region_inputs((2, 3, 6), seed=10, dtype=torch.float32)
    params = [p.float().requires_grad_() for p in random_params(4, 3, seed=10)]
    compiled = torch.compile(lambda *a: pwlu.pwlu2d(*a).square().sum(), fullgraph=True, backend="aot_eager")
    loss = compiled(x, y, *params)
    grads = torch.autograd.grad(loss, params)
    expected = torch.autograd.grad(pwlu.pwlu2d_reference(x, y, *params).square().sum(), params)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels", [None, 5])
def test_native_geometry_and_param_grads_match_the_torch_formulas(channels, monkeypatch):
    """The compiled one-call geometry and parameter gradients (float32 parameters on the CPU)
    against the torch formulas of pwlu2d_grads: the geometry bit for bit (also a collapsed
    width and a NaN bound), the gradients from random float64 histograms to rounding."""
    from pwlu.ops import pwlu2d_grads
    from pwlu.ops.pwlu2d_cpu_backend import PWLU2D_CPU

    if PWLU2D_CPU.get() is None:
        pytest.skip("no C compiler")
    n = 6
    params = [p.float() for p in random_params(n, channels, seed=21)]
    if channels is not None:
        params[2][1] = params[1][1] + 1e-7  # x range of channel 1 below MIN_WIDTH
        params[3][2] = float("nan")  # a NaN y bound (written through .data): NaN geometry
        params[4][4] = params[3][4] + 1e-7  # y range of channel 4 below MIN_WIDTH
    params = tuple(params)
    gen = torch.Generator().manual_seed(22)
    c = 1 if channels is None else channels
    hist = torch.randn(c, n, n, 2, 3, generator=gen, dtype=torch.float64)
    sums = torch.randn(c, 12, generator=gen, dtype=torch.float64)
    assert pwlu2d_grads._native(params, torch.float32) is not None
    values, geometry = pwlu2d_grads.pwlu2d_geometry(params, torch.float32)
    native = pwlu2d_grads.pwlu2d_param_grads(hist, sums, geometry, params)
    monkeypatch.setattr(pwlu2d_grads, "_native", lambda params, dtype: None)
    values_t, geometry_t = pwlu2d_grads.pwlu2d_geometry(params, torch.float32)
    assert torch.equal(values, values_t)
    torch.testing.assert_close(geometry, geometry_t, rtol=0, atol=0, equal_nan=True)
    formulas = pwlu2d_grads.pwlu2d_param_grads(hist, sums, geometry, params)
    for name, a, b in zip(NAMES, native, formulas):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32, name
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, equal_nan=True, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["btc", "btc-long", "channels-last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fast_path_channels_fastest_specials(backend, layout, dtype):
    """Channels the fastest axis, with enough rows for the CPU kernel's per-lane-channel path:
    37 or 40 channels (a partial block of 16), NaN and ±inf in each input at several channels,
    a flat outer piece on each side in some channels, inputs on the grid lines; forward and
    every gradient against the reference."""
    select_backend(backend)
    if layout == "btc":
        shape, channel_dim, channels = (2, 35, 37), -1, 37
    elif layout == "btc-long":  # 300 rows: the CPU backward's chunks of 256 rows, with a tail
        shape, channel_dim, channels = (3, 100, 37), -1, 37
    else:
        shape, channel_dim, channels = (2, 40, 6, 6), 1, 40
    x, y = region_inputs(shape, n=4, seed=17, dtype=torch.float64)
    params = [p.float() for p in random_params(4, channels, seed=17)]
    for c in range(4):
        params[5 + c][3 * c + 1] = 0.0  # a flat piece on side c in channel 3c + 1
    specials = [(float("nan"), 0.5), (0.5, float("nan")), (float("inf"), 0.5), (-float("inf"), 0.5),
                (0.5, float("inf")), (0.5, -float("inf"))]  # fmt: skip
    xm, ym = x.movedim(channel_dim, -1), y.movedim(channel_dim, -1)  # views: channels last
    flat_for = {2: 4, 3: 1, 4: 10, 5: 7}  # +inf x: K_XR flat in channel 4, -inf x: K_XL in 1, ...
    for k, (a, b) in enumerate(specials):
        for c in (k, flat_for.get(k, 3 * k + 1), channels - 1 - k):
            xm[1, k % xm.shape[1], ..., c], ym[1, k % xm.shape[1], ..., c] = a, b
    if layout == "channels-last":
        x, y = x.to(memory_format=torch.channels_last), y.to(memory_format=torch.channels_last)
    x, y = x.to(dtype), y.to(dtype)
    with pwlu.use_backend(backend):
        z = pwlu.pwlu2d(x, y, *params, channel_dim=channel_dim)
    ref = pwlu.pwlu2d_reference(x.float(), y.float(), *params, channel_dim=channel_dim).to(dtype)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(z, ref, rtol=tol, atol=tol, equal_nan=True)
    assert torch.isnan(z.float()).sum() == torch.isnan(ref.float()).sum() > 0
    finite = [t.float().nan_to_num(nan=0.25, posinf=1e4, neginf=-1e4).to(dtype) for t in (x, y)]
    fast = run(pwlu.pwlu2d, *finite, params, channel_dim, backend)
    ref = run(pwlu.pwlu2d_reference, *(t.float() for t in finite), params, channel_dim)
    for key in KEYS:
        scale = 1.0 + ref[key].abs().max().item()
        torch.testing.assert_close(
            fast[key].float(), ref[key], rtol=tol, atol=tol * scale, msg=lambda m, key=key: f"{key}: {m}"
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threads", [1, 2])
def test_fast_path_long_rows_inside_and_outside_runs(backend, threads):
    """Rows of 4,500 elements in runs of 512 (the CPU forward's windows of 32 vectors, after
    each of which it chooses whether to branch around the outer terms): runs all inside the
    grid, all outside, mixed, and inside again, with NaN and ±inf in runs of each kind and a
    flat outer piece on a different side in each channel; the forward against the reference."""
    select_backend(backend)
    n, channels, run_len = 8, 4, 512
    gen = torch.Generator().manual_seed(23)
    kinds = ["inside", "outside", "outside", "outside", "inside", "inside", "mixed", "outside", "inside"]
    length = run_len * len(kinds) - 108  # a partial last run and a tail
    x = torch.empty(1, channels, length)
    y = torch.empty(1, channels, length)
    for r, kind in enumerate(kinds):
        sl = slice(r * run_len, min((r + 1) * run_len, length))
        shape = x[:, :, sl].shape
        inside_x = torch.rand(shape, generator=gen) * 3.9 - 1.95  # grid [-2, 2] x [-1, 3]
        inside_y = torch.rand(shape, generator=gen) * 3.9 - 0.95
        side = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
        far = side * (2.5 + 3 * torch.rand(shape, generator=gen))  # outside on x's left or right
        if kind == "inside":
            x[:, :, sl], y[:, :, sl] = inside_x, inside_y
        elif kind == "outside":
            x[:, :, sl], y[:, :, sl] = far, inside_y
            y[:, :, sl][..., 1::2] += 3 * side[..., 1::2] + 1.0  # and every other element outside on y too
        else:
            pick = torch.rand(shape, generator=gen) < 0.1
            x[:, :, sl] = torch.where(pick, far, inside_x)
            y[:, :, sl] = inside_y
    specials = [(float("nan"), 0.5), (0.5, float("nan")), (float("inf"), 0.5), (-float("inf"), 0.5),
                (0.5, float("inf")), (0.5, -float("inf"))]  # fmt: skip
    for r in (0, 2, 3, 5, 6):  # an inside run under branching, outside runs with and without
        for k, (a, b) in enumerate(specials):
            pos = r * run_len + 37 + 16 * k
            x[0, :, pos], y[0, :, pos] = a, b
    params = [p.float() for p in random_params(n, channels, seed=23)]
    for c in range(channels):
        params[5 + c][c] = 0.0  # channel c: outer slope c (K_XL, K_XR, K_YL, K_YR) flat
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with pwlu.use_backend(backend):
            z = pwlu.pwlu2d(x, y, *params)
    finally:
        torch.set_num_threads(previous)
    ref = pwlu.pwlu2d_reference(x, y, *params)
    torch.testing.assert_close(z, ref, rtol=2e-5, atol=2e-5, equal_nan=True)
    assert torch.isnan(z).sum() == torch.isnan(ref).sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw-14x14", "channels-last"])
def test_fast_path_short_rows_inside_and_outside_runs(backend, layout):
    """Rows shorter than the CPU forward's window of 32 vectors (14x14 maps; the channels-fastest
    path's 256-row tiles), whose windows span several rows: channels (or spatial blocks) all
    inside the grid, all outside, then inside again with NaN and ±inf, and a flat outer piece in
    some channels; the forward against the reference."""
    select_backend(backend)
    n, gen = 8, torch.Generator().manual_seed(29)
    shape = (2, 64, 14, 14) if layout == "nchw-14x14" else (2, 40, 24, 24)
    channels = shape[1]
    x = torch.rand(shape, generator=gen) * 3.9 - 1.95  # grid [-2, 2] x [-1, 3]
    y = torch.rand(shape, generator=gen) * 3.9 - 0.95
    side = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    far = side * (2.5 + 3 * torch.rand(shape, generator=gen))
    if layout == "nchw-14x14":
        outside = torch.zeros(shape, dtype=torch.bool)
        outside[:, 16:48] = True  # 32 channels of 196 elements: windows of 512 across rows
    else:
        outside = torch.zeros(shape, dtype=torch.bool)
        outside[:, :, :12] = True  # the first half of each image's rows (tiles of 256 rows)
    x = torch.where(outside, far, x)
    y = torch.where(outside & (torch.rand(shape, generator=gen) < 0.5), y + 3 * side + 1.0, y)
    specials = [(float("nan"), 0.5), (0.5, float("nan")), (float("inf"), 0.5), (-float("inf"), 0.5),
                (0.5, float("inf")), (0.5, -float("inf"))]  # fmt: skip
    for k, (a, b) in enumerate(specials):
        for c in (k, 20 + k, channels - 1 - k):  # inside, outside and late channels
            x[1, c, 13, 3 + k], y[1, c, 13, 3 + k] = a, b
            x[0, c, 2, 5 + k], y[0, c, 2, 5 + k] = a, b
    params = [p.float() for p in random_params(n, channels, seed=29)]
    for c in range(4):
        params[5 + c][3 * c + 1] = 0.0  # a flat piece on side c in channel 3c + 1
        params[5 + c][20 + 3 * c] = 0.0  # and in an outside channel
    if layout == "channels-last":
        x, y = x.to(memory_format=torch.channels_last), y.to(memory_format=torch.channels_last)
    with pwlu.use_backend(backend):
        z = pwlu.pwlu2d(x, y, *params)
    ref = pwlu.pwlu2d_reference(x, y, *params)
    torch.testing.assert_close(z, ref, rtol=2e-5, atol=2e-5, equal_nan=True)
    assert torch.isnan(z).sum() == torch.isnan(ref).sum() > 0
