"""N-PWLU ops (SPEC section 9): the reference against an element loop and hand-computed values,
every backend (torch, CPU kernel, Triton in the interpreter) against the reference, gradcheck,
higher-order derivatives, low precision, bad input, and a property test with steep and
nearly collapsed widths."""

from __future__ import annotations

import math

import pytest
import torch

import pwlu
from helpers import max_err
from pwlu.ops.npwlu_backends import NPWLU_BACKENDS
from pwlu.ops.npwlu_reference import MIN_INTERVAL_WIDTH, npwlu_breakpoints

NAMES = ("points", "width_logits", "left_bound", "right_bound", "left_slope", "right_slope")
KEYS = ("y", "dx") + tuple(f"d{n}" for n in NAMES)
CPU = torch.device("cpu")


def random_nparams(num_channels, n, dtype=torch.float32, seed=0, logit_scale=1.0):
    """Well-posed random parameters: ranges of width >= 4, random widths, points and slopes."""
    g = torch.Generator().manual_seed(seed)
    shape = () if num_channels is None else (num_channels,)
    left = -2.0 + 0.5 * torch.rand(shape, generator=g, dtype=torch.float64)
    right = 2.0 + 0.5 * torch.rand(shape, generator=g, dtype=torch.float64)
    points = torch.randn(*shape, n + 1, generator=g, dtype=torch.float64)
    logits = logit_scale * torch.randn(*shape, n, generator=g, dtype=torch.float64)
    left_slope = torch.randn(shape, generator=g, dtype=torch.float64)
    right_slope = torch.randn(shape, generator=g, dtype=torch.float64)
    return [p.to(dtype) for p in (points, logits, left, right, left_slope, right_slope)]


def run(fn, x, params, channel_dim, grad=None, backend="auto"):
    """Output and all seven gradients of ``fn`` (forward and backward under ``backend``)."""
    x = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in params]
    if grad is None:
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(123))
    with pwlu.use_backend(backend):
        y = fn(x, *params, channel_dim=channel_dim)
        y.backward(grad.to(y.dtype))
    return {"y": y.detach(), "dx": x.grad, **{f"d{n}": p.grad for n, p in zip(NAMES, params)}}


def assert_close_all(got, want, **tol):
    for key in KEYS:
        assert got[key].dtype == want[key].dtype, key
        torch.testing.assert_close(got[key], want[key], equal_nan=True, msg=lambda m, key=key: f"{key}: {m}", **tol)


def with_breakpoints(x, params, channel_dim):
    """``x`` with some elements set exactly to breakpoints (both bounds included) of their channel."""
    points, logits, left, right = params[:4]
    b, _, _ = npwlu_breakpoints(logits.double(), left.double(), right.double())
    b = b.to(x.dtype)
    x = x.clone()
    if points.dim() == 1:
        flat = x.view(-1)
        flat[: b.numel()] = b[: flat.numel()]
        return x
    moved = x.movedim(channel_dim, 0)  # a view: writes go to x
    for c in range(moved.shape[0]):
        row = moved[c].reshape(-1)
        m = min(row.numel(), b.shape[1])
        row[:m] = b[c, :m]
        moved[c] = row.reshape(moved[c].shape)
    return x


# ---------------------------------------------------------------- reference vs loop and by hand


def loop_npwlu(x, points, logits, left, right, left_slope, right_slope, channel_dim):
    """SPEC section 9, element by element in Python floats."""
    out = torch.empty_like(x)
    channel_wise = points.dim() == 2
    n = points.shape[-1] - 1
    cd = channel_dim % x.dim() if channel_wise else None
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in x.shape]).reshape(-1, x.dim()).tolist():
        sel = (lambda p, c=idx[cd]: p[c]) if channel_wise else (lambda p: p)
        y_p = [float(v) for v in sel(points)]
        theta = [float(v) for v in sel(logits)]
        b_l, b_r, k_l, k_r = (float(sel(p)) for p in (left, right, left_slope, right_slope))
        top = max(theta)
        e = [math.exp(v - top) for v in theta]
        omega = [v / sum(e) for v in e]
        b = [b_l] + [b_l + (b_r - b_l) * sum(omega[:j]) for j in range(1, n)] + [b_r]
        v = float(x[tuple(idx)])
        if v < b_l:
            res = y_p[0] + (v - b_l) * k_l
        elif v >= b_r:
            res = y_p[n] + (v - b_r) * k_r
        else:
            j = max(i for i in range(n) if b[i] <= v)
            t = (v - b[j]) / (b[j + 1] - b[j])
            res = (1 - t) * y_p[j] + t * y_p[j + 1]
        out[tuple(idx)] = res
    return out


@pytest.mark.parametrize("num_channels,shape,channel_dim", [(None, (5, 7), 1), (3, (2, 3, 4), 1), (4, (3, 5, 4), -1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_matches_element_loop(num_channels, shape, channel_dim, seed):
    params = random_nparams(num_channels, n=5, dtype=torch.float64, seed=seed, logit_scale=1.5)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 3
    x = with_breakpoints(x, params, channel_dim)
    got = pwlu.npwlu_reference(x, *params, channel_dim=channel_dim)
    torch.testing.assert_close(got, loop_npwlu(x, *params, channel_dim), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [pwlu.npwlu, pwlu.npwlu_reference], ids=["npwlu", "reference"])
def test_gradients_match_spec_by_hand(fn):
    """SPEC section 9's rows, evaluated by hand, for one element in a non-uniform interval.

    theta = log([1, 2, 1]): omega = (1/4, 1/2, 1/4); B_L = -2, B_R = 2: b = (-2, -1, 1, 2).
    x = 0 is in interval 1 (w = 2), t = 1/2; Y = (0, 1, 3, 2): K_1 = 1.
    """
    points = torch.tensor([0.0, 1.0, 3.0, 2.0], dtype=torch.float64)
    logits = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64).log()
    left, right = torch.tensor(-2.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    kl, kr = torch.tensor(0.5, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    g = run(fn, torch.tensor([0.0], dtype=torch.float64), [points, logits, left, right, kl, kr], 0, torch.ones(1))
    assert g["y"].item() == pytest.approx(2.0)
    assert g["dx"].item() == pytest.approx(1.0)
    torch.testing.assert_close(g["dpoints"], torch.tensor([0.0, 0.5, 0.5, 0.0], dtype=torch.float64))
    # dy/db_1 = -K (1 - t) = -1/2, dy/db_2 = -K t = -1/2; c = (1/4, 3/4)
    # dB_L = -1/2 (1 - 1/4) - 1/2 (1 - 3/4) = -1/2; dB_R = -1/2 (1/4) - 1/2 (3/4) = -1/2
    assert g["dleft_bound"].item() == pytest.approx(-0.5)
    assert g["dright_bound"].item() == pytest.approx(-0.5)
    # db_j/dtheta_m = W omega_m ([m < j] - c_j), W = 4
    omega, c, db = [0.25, 0.5, 0.25], [None, 0.25, 0.75], {1: -0.5, 2: -0.5}
    want = [sum(db[j] * 4 * omega[m] * ((m < j) - c[j]) for j in (1, 2)) for m in range(3)]
    torch.testing.assert_close(g["dwidth_logits"], torch.tensor(want, dtype=torch.float64))
    assert g["dleft_slope"].item() == 0.0 and g["dright_slope"].item() == 0.0


def test_breakpoint_values_and_closed_left():
    """At every breakpoint the value is its point, and dy/dx is the slope of the interval to its right."""
    params = random_nparams(None, n=6, dtype=torch.float64, seed=2, logit_scale=1.0)
    points, logits, left, right = params[:4]
    b, w, _ = npwlu_breakpoints(logits, left, right)
    for fn in (pwlu.npwlu, pwlu.npwlu_reference):
        g = run(fn, b[:-1], params, 0, torch.ones(6, dtype=torch.float64))
        torch.testing.assert_close(g["y"], points[:-1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g["dx"], (points[1:] - points[:-1]) / w, rtol=1e-12, atol=1e-12)
        g = run(fn, b[-1:], params, 0, torch.ones(1, dtype=torch.float64))  # B_R: the right piece
        assert g["dx"].item() == params[5].item()


@pytest.mark.parametrize("num_channels", [None, 3])
def test_zero_logits_equal_pwlu(num_channels):
    params = random_nparams(num_channels, n=8, seed=4)
    params[1] = torch.zeros_like(params[1])
    x = torch.randn(4, 3, 17) * 3
    # run() names the gradients of six parameters: PWLU's five are the six without width_logits
    want = run(lambda x, p, _, *rest, channel_dim: pwlu.pwlu_reference(x, p, *rest, channel_dim), x, params, 1)
    assert want["dwidth_logits"] is None  # not used by PWLU
    for fn in (pwlu.npwlu, pwlu.npwlu_reference):
        got = run(fn, x, params, 1)
        for key in ("y", "dx", "dpoints", "dleft_bound", "dright_bound", "dleft_slope", "dright_slope"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=2e-5, msg=lambda m, key=key: f"{key}: {m}")


def test_relu_at_breakpoints_is_exact_relu():
    n = 4
    left, right = torch.tensor(-3.0), torch.tensor(3.0)
    logits = torch.zeros(n)
    b, _, _ = npwlu_breakpoints(logits, left, right)
    params = [b.clamp_min(0), logits, left, right, torch.tensor(0.0), torch.tensor(1.0)]
    x = torch.linspace(-5, 5, 1001)
    for backend in [b.values[0] for b in BACKENDS if not b.marks]:
        with pwlu.use_backend(backend):  # the folded forward is exact: slope 1, intercept 0
            assert torch.equal(pwlu.npwlu(x, *params, channel_dim=0), torch.relu(x)), backend
    # the reference interpolates, (1 - t) Y_j + t Y_{j+1}: ReLU up to rounding
    torch.testing.assert_close(pwlu.npwlu_reference(x, *params, channel_dim=0), torch.relu(x))


# ---------------------------------------------------------------- every backend vs the reference


def _backends():
    out = []
    for name in ("torch", "cpu", "triton"):
        marks = []
        if not NPWLU_BACKENDS.is_available(name, CPU):
            marks = [pytest.mark.skip(reason=f"N-PWLU backend {name!r} is not available here")]
        out.append(pytest.param(name, marks=marks))
    return out


BACKENDS = _backends()
SHAPES = [
    (None, (1, 1, 1023), 1, False),
    (7, (3, 7, 37), 1, False),
    (5, (9, 5), 1, False),
    (6, (2, 5, 3, 6), -1, False),
    (6, (2, 6, 5, 3), 1, True),
    (None, (2, 6, 5, 3), 1, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_channels,shape,channel_dim,channels_last", SHAPES)
@pytest.mark.parametrize("n", [1, 4, 16])
def test_backend_matches_reference(backend, num_channels, shape, channel_dim, channels_last, n):
    params = random_nparams(num_channels, n=n, seed=n, logit_scale=1.5)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 3  # outside and inside
    x = with_breakpoints(x, params, channel_dim)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    got = run(pwlu.npwlu, x, params, channel_dim, backend=backend)
    # float32 against the float64 reference, by the rule for rounding: within 4x the float32
    # reference's own error plus a small tolerance (steep narrow intervals amplify rounding)
    want = run(pwlu.npwlu_reference, x.double(), [p.double() for p in params], channel_dim)
    ref32 = run(pwlu.npwlu_reference, x, params, channel_dim)
    for key in KEYS:
        assert got[key].dtype == ref32[key].dtype, key
        scale = want[key].abs().max().item() + 1.0
        e_fast, e_ref = max_err(got[key], want[key]), max_err(ref32[key], want[key])
        assert e_fast <= 4 * e_ref + 2e-5 * scale, f"{key}: fast err {e_fast} vs float32 reference err {e_ref}"
    if channels_last:
        assert got["y"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [17, 64])  # N > 16: the Triton kernels' binary search over the breakpoints
@pytest.mark.parametrize("num_channels,shape,channel_dim,channels_last", [(3, (2, 3, 70), 1, False), (4, (2, 4, 5, 7), 1, True), (None, (3, 70), 0, False)])  # fmt: skip
def test_backend_many_intervals_float64_exact_regions(backend, n, num_channels, shape, channel_dim, channels_last):
    """float64 at tight tolerance: a wrong region for any element (inside, outside, exactly on a
    breakpoint, on tied breakpoints of a collapsed interval, NaN) changes y or a gradient."""
    params = random_nparams(num_channels, n=n, dtype=torch.float64, seed=n, logit_scale=1.5)
    params[1][..., n // 2] = -60.0  # interval n//2 collapses: two breakpoints tie (up to rounding)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3
    x = with_breakpoints(x, params, channel_dim)
    x.view(-1)[-1] = float("nan")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    got = run(pwlu.npwlu, x, params, channel_dim, backend=backend)
    want = run(pwlu.npwlu_reference, x, params, channel_dim)
    assert_close_all(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_channels", [None, 3])
def test_backend_float64(backend, num_channels):
    params = random_nparams(num_channels, n=6, dtype=torch.float64, seed=8, logit_scale=2.0)
    x = with_breakpoints(torch.randn(4, 3, 29, dtype=torch.float64) * 3, params, 1)
    got = run(pwlu.npwlu, x, params, 1, backend=backend)
    want = run(pwlu.npwlu_reference, x, params, 1)
    assert_close_all(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backend_low_precision_rule(backend, dtype):
    """err(fast lowp vs fp32 ref) <= 2 * err(lowp ref vs fp32 ref) + atol, per output."""
    params = random_nparams(4, n=8, seed=5)
    x = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(6)) * 3
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    ref32 = run(pwlu.npwlu_reference, x, params, 1, grad)
    ref_lp = run(pwlu.npwlu_reference, x.to(dtype), params, 1, grad.to(dtype))
    fast_lp = run(pwlu.npwlu, x.to(dtype), params, 1, grad.to(dtype), backend=backend)
    for key in KEYS:
        assert fast_lp[key].dtype == ref_lp[key].dtype, key
        scale = ref32[key].abs().max().item() + 1.0
        e_fast, e_ref = max_err(fast_lp[key], ref32[key]), max_err(ref_lp[key], ref32[key])
        assert e_fast <= 2 * e_ref + 1e-3 * scale, f"{key}: fast err {e_fast} vs ref err {e_ref}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_nonfinite_inputs(backend):
    params = random_nparams(None, n=4, seed=1)
    params[4] = torch.tensor(0.0)  # a flat left piece: -inf maps to its constant
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5, -0.5])
    got = run(pwlu.npwlu, x, params, 0, torch.ones(5), backend=backend)
    want = run(pwlu.npwlu_reference, x, params, 0, torch.ones(5))
    assert torch.isnan(got["y"][0]) and not torch.isnan(got["y"][1:]).any()
    assert_close_all(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_range_below_min_width_and_collapsed_interval(backend):
    """The two floors: B_R - B_L < MIN_WIDTH, and an interval narrower than MIN_INTERVAL_WIDTH."""
    params = random_nparams(3, n=4, dtype=torch.float64, seed=3)
    params[3] = params[2].clone()
    params[3][0] += 1e-4  # channel 0: range below MIN_WIDTH
    params[1][1, 2] = -40.0  # channel 1: interval 2 collapses (omega ~ 1e-17)
    x = torch.randn(2, 3, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    x = with_breakpoints(x, params, 1)
    got = run(pwlu.npwlu, x, params, 1, backend=backend)
    want = run(pwlu.npwlu_reference, x, params, 1)
    for v in got.values():
        assert torch.isfinite(v).all()
    assert_close_all(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_elements_inside_a_floored_interval(backend):
    """Elements strictly inside an interval narrower than MIN_INTERVAL_WIDTH (t > 0 there): its
    width is then the constant floor, so nothing of sum g t may reach the right breakpoint
    (an epilogue that sent it there passed every test with elements only on breakpoints)."""
    params = random_nparams(2, n=4, dtype=torch.float64, seed=5)
    params[1][:, 1] = -20.0  # interval 1 of both channels: width ~ 1e-8 < MIN_INTERVAL_WIDTH
    b, _, _ = npwlu_breakpoints(*params[1:4])
    width = b[:, 2] - b[:, 1]
    assert ((width > 0) & (width < MIN_INTERVAL_WIDTH)).all()
    x = torch.randn(3, 2, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for k, frac in enumerate((0.25, 0.5, 0.75)):
        x[k, :, :4] = (b[:, 1] + frac * width)[:, None]  # inside the narrow interval, t = frac * width / floor
    got = run(pwlu.npwlu, x, params, 1, backend=backend)
    want = run(pwlu.npwlu_reference, x, params, 1)
    assert_close_all(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("n", [4, 40])  # 40: N + 2 > 32, tables gathered instead of permuted
def test_cpu_kernel_two_threads_and_long_tables(n):
    if not NPWLU_BACKENDS.is_available("cpu", CPU):
        pytest.skip("N-PWLU cpu backend not available")
    params = random_nparams(3, n=n, seed=n, logit_scale=1.0)
    x = torch.randn(2, 3, 12000, generator=torch.Generator().manual_seed(0)) * 3  # above GRAIN_SIZE
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first = run(pwlu.npwlu, x, params, 1, backend="cpu")
        second = run(pwlu.npwlu, x, params, 1, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    for key in KEYS:
        assert torch.equal(first[key], second[key]), key  # deterministic for a thread count
    want = run(pwlu.npwlu_reference, x.double(), [p.double() for p in params], 1)
    ref32 = run(pwlu.npwlu_reference, x, params, 1)
    for key in KEYS:
        scale = want[key].abs().max().item() + 1.0
        e_fast, e_ref = max_err(first[key], want[key]), max_err(ref32[key], want[key])
        assert e_fast <= 4 * e_ref + 2e-5 * scale, f"{key}: fast err {e_fast} vs float32 reference err {e_ref}"


# ---------------------------------------------------------------- autograd


def _leaves(*ts):
    return tuple(t.detach().clone().requires_grad_(True) for t in ts)


@pytest.mark.parametrize("num_channels,channel_dim", [(None, 1), (3, 1), (3, -1)])
@pytest.mark.parametrize("where", ["mixed", "inside", "outside", "near_breakpoints"])
def test_gradcheck_all_seven(num_channels, channel_dim, where):
    params = random_nparams(num_channels, n=4, dtype=torch.float64, seed=11, logit_scale=1.0)
    gen = torch.Generator().manual_seed(12)
    shape = (2, 3, 3) if channel_dim == 1 else (2, 3, 3)
    if where == "mixed":
        x = torch.randn(shape, dtype=torch.float64, generator=gen) * 3
    elif where == "inside":
        x = torch.rand(shape, dtype=torch.float64, generator=gen) * 3.0 - 1.5
    elif where == "outside":
        x = torch.randn(shape, dtype=torch.float64, generator=gen).sign() * (4 + torch.rand(shape, generator=gen))
    else:  # 1e-3 to the right of breakpoints (gradcheck's eps is 1e-6): the one-sided rows
        x = with_breakpoints(torch.randn(shape, dtype=torch.float64, generator=gen) * 3, params, channel_dim) + 1e-3
    fn = lambda x, *p: pwlu.npwlu(x, *p, channel_dim=channel_dim)  # noqa: E731
    assert torch.autograd.gradcheck(fn, _leaves(x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("num_channels", [None, 3])
def test_double_backward_and_jvp(num_channels):
    params = random_nparams(num_channels, n=4, dtype=torch.float64, seed=13)
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    fn = lambda x, *p: pwlu.npwlu(x, *p, channel_dim=1)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, _leaves(x, *params))
    tangents = tuple(torch.randn_like(t) for t in (x, *params))
    _, jvp_fast = torch.func.jvp(fn, (x, *params), tangents)
    ref = lambda x, *p: pwlu.npwlu_reference(x, *p, channel_dim=1)  # noqa: E731
    _, jvp_ref = torch.func.jvp(ref, (x, *params), tangents)
    torch.testing.assert_close(jvp_fast, jvp_ref)


def test_saves_only_inputs():
    params = _leaves(*random_nparams(3, n=4, seed=0))
    x = torch.randn(2, 3, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with pwlu.use_backend("torch"):
            pwlu.npwlu(x, *params, channel_dim=1)
    assert len(saved) == 7
    assert {id(t) for t in saved} == {id(t) for t in (x, *params)}


def test_custom_op_under_compile_and_vmap():
    params = random_nparams(3, n=4, seed=0)
    x = torch.randn(2, 3, 8)
    y = torch.ops.pwlu.npwlu(x, *params, 1)
    torch.testing.assert_close(y, pwlu.npwlu_reference(x, *params, channel_dim=1), rtol=1e-5, atol=1e-5)
    xs = torch.randn(5, 2, 3, 8)
    got = torch.vmap(lambda v: pwlu.npwlu(v, *params, channel_dim=1))(xs)
    torch.testing.assert_close(got, pwlu.npwlu_reference(xs, *params, channel_dim=2), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- bad input


def test_bad_input_errors_name_the_value():
    x = torch.randn(2, 3, 4)
    ok = random_nparams(3, n=4)
    with pytest.raises(ValueError, match=r"npwlu: points must hold N\+1 >= 2 values"):
        pwlu.npwlu(x, torch.zeros(3, 1), torch.zeros(3, 0), *ok[2:])
    with pytest.raises(ValueError, match=r"width_logits must have shape \(3, 4\).*got shape \(3, 5\)"):
        pwlu.npwlu(x, ok[0], torch.zeros(3, 5), *ok[2:])
    with pytest.raises(ValueError, match=r"width_logits must have shape \(4,\).*got shape \(3, 4\)"):
        pwlu.npwlu_reference(x, ok[0][0], ok[1], *(p[0] for p in ok[2:]))
    bad = ok[1].clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"npwlu: width_logits holds nan at index \(1, 2\)"):
        pwlu.npwlu(x, ok[0], bad, *ok[2:])
    bad = ok[2].clone()
    bad[0] = float("inf")
    with pytest.raises(ValueError, match=r"npwlu: left_bound holds inf"):
        pwlu.npwlu_reference(x, ok[0], ok[1], bad, *ok[3:])
    with pytest.raises(TypeError, match="width_logits to be floating point"):
        pwlu.npwlu(x, ok[0], ok[1].long(), *ok[2:])
    with pytest.raises(ValueError, match=r"npwlu: input has 4 channels on axis -1.*num_channels=3"):
        pwlu.npwlu(x, *ok, channel_dim=-1)


# ---------------------------------------------------------------- property test


def test_property_steep_and_collapsed_widths():
    """No NaN from finite input for any logits (steep, nearly collapsed), and every backend agrees
    with the reference; the floor MIN_INTERVAL_WIDTH bounds every inner slope."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    logit = st.one_of(st.floats(-60, 60), st.sampled_from([-60.0, -35.0, 0.0, 35.0, 60.0]))
    # the Triton interpreter is too slow for many examples: its floors are tested above
    backends = [b.values[0] for b in BACKENDS if not b.marks and b.values[0] != "triton"]

    @hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
    @hypothesis.given(
        logits=st.lists(logit, min_size=1, max_size=8),
        width=st.floats(1e-4, 50.0),
        left=st.floats(-20.0, 20.0),
        seed=st.integers(0, 2**16),
    )
    def check(logits, width, left, seed):
        n = len(logits)
        g = torch.Generator().manual_seed(seed)
        params = [
            torch.randn(n + 1, generator=g) * 3,
            torch.tensor(logits),
            torch.tensor(left),
            torch.tensor(left + width),
            torch.randn((), generator=g),
            torch.randn((), generator=g),
        ]
        b, w, _ = npwlu_breakpoints(*params[1:4])
        assert (w >= MIN_INTERVAL_WIDTH).all()
        x = torch.cat([b, b + 1e-7, torch.randn(40, generator=g) * width + left])
        ref32 = run(pwlu.npwlu_reference, x, params, 0)
        for v in ref32.values():
            assert not torch.isnan(v).any()
        # float32 against the float64 reference by the rounding rule (steep intervals amplify it)
        want = run(pwlu.npwlu_reference, x.double(), [p.double() for p in params], 0)
        for backend in backends:
            got = run(pwlu.npwlu, x, params, 0, backend=backend)
            for key in KEYS:
                assert not torch.isnan(got[key]).any(), (backend, key)
                scale = want[key].abs().max().item() + 1.0
                e_fast, e_ref = max_err(got[key], want[key]), max_err(ref32[key], want[key])
                assert e_fast <= 4 * e_ref + 1e-5 * scale, (backend, key, e_fast, e_ref)

    check()


@pytest.mark.parametrize("n", [1, 4, 16, 40])
@pytest.mark.parametrize("layout", ["btc", "channels_last"])
def test_cpu_channels_fastest_rows_path(n, layout):
    """Channels the fastest axis (the cpu backend's 16-channel row blocks): C = 37 (two whole
    blocks and a partial one), 600 rows (past the float accumulators' flush at 256 rows), x on
    breakpoints, NaN and +-inf, against the float64 reference (y, dx and every parameter
    gradient) and, for bf16/fp16, by the low-precision rule against the torch backend."""
    if not NPWLU_BACKENDS.is_available("cpu", torch.device("cpu")):
        pytest.skip("no C compiler")
    c = 37
    params = random_nparams(c, n=n, seed=n + 1, logit_scale=1.5)
    params[4][0] = 0.0  # channel 0: a flat left piece (+-inf maps to its value, not NaN)
    gen = torch.Generator().manual_seed(9)
    if layout == "btc":
        x, cd = torch.randn(4, 150, c, generator=gen) * 3, -1
    else:
        x, cd = torch.randn(6, c, 10, 10, generator=gen) * 3, 1
    x = with_breakpoints(x, params, cd)
    flat = x.movedim(cd, -1).reshape(-1, c)  # a copy: the specials go into rows 5..7 of every channel
    flat[5], flat[6], flat[7] = float("nan"), float("inf"), -float("inf")
    x = flat.reshape(x.movedim(cd, -1).shape).movedim(-1, cd).contiguous()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    special = ~torch.isfinite(x)
    # the specials (forward): NaN out for NaN in, the outer pieces' limits at +-inf
    y = run(pwlu.npwlu, x, params, cd, grad=grad, backend="cpu")["y"]
    y_ref = run(pwlu.npwlu_reference, x.double(), [p.double() for p in params], cd)["y"]
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref)) and torch.equal(torch.isnan(y), x.isnan())
    torch.testing.assert_close(y[special].double(), y_ref[special], equal_nan=True, rtol=1e-5, atol=1e-5)
    # everything else, with every gradient (a NaN or infinite input makes them NaN, rightly)
    xf = torch.where(special, torch.full_like(x, 0.5), x)
    if layout == "channels_last":
        xf = xf.contiguous(memory_format=torch.channels_last)
    got = run(pwlu.npwlu, xf, params, cd, grad=grad, backend="cpu")
    want = run(pwlu.npwlu_reference, xf.double(), [p.double() for p in params], cd, grad=grad.double())
    ref32 = run(pwlu.npwlu_reference, xf, params, cd, grad=grad)
    for key in KEYS:
        scale = want[key].abs().max().item() + 1.0
        e_fast, e_ref = max_err(got[key], want[key]), max_err(ref32[key], want[key])
        assert e_fast <= 4 * e_ref + 2e-5 * scale, f"{key}: fast err {e_fast} vs float32 reference err {e_ref}"
    finite = ~special
    for dtype in (torch.bfloat16, torch.float16):
        xl = x.to(dtype)
        lp = run(pwlu.npwlu, xl, params, cd, grad=grad * finite, backend="cpu")
        tb = run(pwlu.npwlu, xl, params, cd, grad=grad * finite, backend="torch")
        for key in ("y", "dx"):
            assert lp[key].dtype == dtype
            keep = ~torch.isnan(tb[key])
            assert torch.equal(torch.isnan(lp[key]), ~keep), key
            torch.testing.assert_close(lp[key][keep].float(), tb[key][keep].float(), rtol=2e-2, atol=2e-2)
