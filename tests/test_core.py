"""Core tests: reference vs an element loop, exact gradients, fast path vs reference, module."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

import pwlu
from helpers import PARAM_NAMES, assert_low_precision_rule, assert_matches_reference, random_params, run


def loop_pwlu(x, points, bl, br, kl, kr, channel_dim):
    """Independent element-by-element SPEC section 2, in Python floats."""
    xs = x.double()
    out = torch.empty_like(xs)
    channel_wise = points.dim() == 2
    n = points.shape[-1] - 1
    cd = channel_dim % x.dim() if channel_wise else None
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in x.shape]).reshape(-1, x.dim()).tolist():
        c = idx[cd] if channel_wise else None
        sel = (lambda p, c=c: p[c]) if channel_wise else (lambda p: p)
        y_p = [float(v) for v in sel(points)]
        b_l, b_r, k_l, k_r = (float(sel(p)) for p in (bl, br, kl, kr))
        v = float(xs[tuple(idx)])
        if v < b_l:
            res = y_p[0] + (v - b_l) * k_l
        elif v >= b_r:
            res = y_p[n] + (v - b_r) * k_r
        else:
            d = (b_r - b_l) / n
            i = min(int(math.floor((v - b_l) / d)), n - 1)
            t = (v - b_l) / d - i
            res = (1 - t) * y_p[i] + t * y_p[i + 1]
        out[tuple(idx)] = res
    return out


# ---------------------------------------------------------------- reference vs loop


@pytest.mark.parametrize("num_channels,shape,channel_dim", [(None, (5, 7), 1), (3, (2, 3, 4), 1), (4, (3, 5, 4), -1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_matches_element_loop(num_channels, shape, channel_dim, seed):
    params = random_params(num_channels, n=6, dtype=torch.float64, seed=seed)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 3
    got = pwlu.pwlu_reference(x, *params, channel_dim=channel_dim)
    want = loop_pwlu(x, *params, channel_dim)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_reference_matches_loop_at_breakpoints_and_bounds():
    n = 8
    points = torch.randn(n + 1, dtype=torch.float64)
    bl, br = torch.tensor(-2.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    kl, kr = torch.tensor(0.3, dtype=torch.float64), torch.tensor(-0.7, dtype=torch.float64)
    x = torch.linspace(-3, 3, 25, dtype=torch.float64)  # step 0.25 hits every breakpoint and both bounds
    got = pwlu.pwlu_reference(x, points, bl, br, kl, kr)
    torch.testing.assert_close(got, loop_pwlu(x, points, bl, br, kl, kr, 0), rtol=1e-12, atol=1e-12)
    # at each breakpoint the value is the point itself
    breakpoints = torch.linspace(-2, 2, n + 1, dtype=torch.float64)
    torch.testing.assert_close(pwlu.pwlu_reference(breakpoints, points, bl, br, kl, kr), points)


# ---------------------------------------------------------------- gradcheck (float64)


def _gradcheck(num_channels, shape, channel_dim, seed, scale=3.0, noncontiguous=False):
    params = random_params(num_channels, n=5, dtype=torch.float64, seed=seed)
    params = [p.requires_grad_(True) for p in params]
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 100)) * scale
    if noncontiguous:
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
        assert not x.is_contiguous()
    x.requires_grad_(True)
    fn = lambda x, *p: pwlu.pwlu(x, *p, channel_dim=channel_dim)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "num_channels,shape,channel_dim",
    [(None, (4, 6), 1), (3, (2, 3, 5), 1), (3, (2, 4, 3), -1), (2, (3, 2, 2, 2), 1)],
)
def test_gradcheck_all_inputs(num_channels, shape, channel_dim, seed):
    # scale 3 puts points left of B_L (~-2), right of B_R (~2) and inside
    _gradcheck(num_channels, shape, channel_dim, seed)


@pytest.mark.parametrize("num_channels", [None, 4])
def test_gradcheck_noncontiguous(num_channels):
    _gradcheck(num_channels, (3, 4, 5), 1, seed=5, noncontiguous=True)


def test_gradcheck_covers_all_regions():
    params = random_params(None, n=5, dtype=torch.float64, seed=0)
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(100)) * 3
    assert (x < params[1]).any() and (x >= params[2]).any() and ((x >= params[1]) & (x < params[2])).any()


def test_exact_slopes_match_spec_table():
    """SPEC Table 1 evaluated by hand for one element per region."""
    n = 4
    points = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5], dtype=torch.float64)
    bl, br = torch.tensor(-2.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)  # d = 1
    kl, kr = torch.tensor(0.25, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    for xv, expected in [
        (-3.0, dict(dx=0.25, dY={0: 1.0}, dKL=-1.0, dKR=0.0, dBL=-0.25, dBR=0.0)),
        (3.5, dict(dx=-3.0, dY={4: 1.0}, dKL=0.0, dKR=1.5, dBL=0.0, dBR=3.0)),
        # x = -0.75: u = 1.25, i = 1, t = 0.25, K_1 = -2
        (-0.75, dict(dx=-2.0, dY={1: 0.75, 2: 0.25}, dKL=0.0, dKR=0.0, dBL=2.0 * (1 - 1.25 / 4), dBR=2.0 * 1.25 / 4)),
    ]:
        g = run(pwlu.pwlu, torch.tensor([xv], dtype=torch.float64), [points, bl, br, kl, kr], 0, torch.ones(1))
        assert g["dx"].item() == pytest.approx(expected["dx"])
        want_dy = torch.zeros(n + 1, dtype=torch.float64)
        for j, v in expected["dY"].items():
            want_dy[j] = v
        torch.testing.assert_close(g["dpoints"], want_dy)
        assert g["dleft_slope"].item() == pytest.approx(expected["dKL"])
        assert g["dright_slope"].item() == pytest.approx(expected["dKR"])
        assert g["dleft_bound"].item() == pytest.approx(expected["dBL"])
        assert g["dright_bound"].item() == pytest.approx(expected["dBR"])


def _breakpoint_setup():
    n = 8
    points = torch.tensor([0.0, 0.5, -1.0, 2.0, 1.0, 1.5, -0.5, 0.25, 3.0], dtype=torch.float64)
    bl, br = torch.tensor(-2.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)  # d = 0.5, exact
    kl, kr = torch.tensor(0.5, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    inner = (points[1:] - points[:-1]) / 0.5
    return n, [points, bl, br, kl, kr], inner


@pytest.mark.parametrize("fn", [pwlu.pwlu, pwlu.pwlu_reference], ids=["pwlu", "reference"])
def test_breakpoint_convention_right_continuous(fn):
    """At an inner breakpoint B_j exactly, the interval to the right (j) is used: dy/dx = K_j."""
    n, params, inner = _breakpoint_setup()
    for j in range(n):
        xj = torch.tensor([-2.0 + 0.5 * j], dtype=torch.float64)
        g = run(fn, xj, params, 0, torch.ones(1, dtype=torch.float64))
        assert g["y"].item() == params[0][j].item()
        assert g["dx"].item() == inner[j].item(), f"breakpoint {j}"
        # t = 0: all of dY goes to Y[j]; u = j
        expected = torch.zeros(n + 1, dtype=torch.float64)
        expected[j] = 1
        torch.testing.assert_close(g["dpoints"], expected)
        assert g["dleft_bound"].item() == pytest.approx(-inner[j].item() * (1 - j / n))
        assert g["dright_bound"].item() == pytest.approx(-inner[j].item() * j / n)


@pytest.mark.parametrize("fn", [pwlu.pwlu, pwlu.pwlu_reference], ids=["pwlu", "reference"])
def test_right_bound_belongs_to_right_region(fn):
    """x = B_R exactly uses the right outer piece: dy/dx = K_R, dK_R = 0, dB_R = -K_R."""
    n, params, _ = _breakpoint_setup()
    g = run(fn, torch.tensor([2.0], dtype=torch.float64), params, 0, torch.ones(1, dtype=torch.float64))
    assert g["y"].item() == params[0][n].item()
    assert g["dx"].item() == -2.0
    assert g["dright_slope"].item() == 0.0
    assert g["dright_bound"].item() == 2.0
    assert g["dleft_bound"].item() == 0.0
    expected = torch.zeros(n + 1, dtype=torch.float64)
    expected[n] = 1
    torch.testing.assert_close(g["dpoints"], expected)


# ---------------------------------------------------------------- fast path vs reference


SHAPES = [
    (None, (1, 1, 1023), 1),
    (1, (1, 1, 1023), 1),
    (7, (3, 7, 256), 1),
    (None, (3, 7, 256), 1),
    (5, (9, 5), 1),
    (6, (2, 6, 5, 3), 1),
    (6, (2, 5, 3, 6), -1),
    (4, (2, 4, 3, 5), -3),
]


@pytest.mark.parametrize("num_channels,shape,channel_dim", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_matches_reference(num_channels, shape, channel_dim, dtype):
    params = random_params(num_channels, n=16, dtype=dtype, seed=3)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 3).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    assert_matches_reference(pwlu.pwlu, x, params, channel_dim, **tol)


@pytest.mark.parametrize("num_channels", [None, 6])
def test_fast_matches_reference_channels_last(num_channels):
    params = random_params(num_channels, n=8, seed=1)
    x = (torch.randn(2, 6, 5, 3) * 3).to(memory_format=torch.channels_last)
    assert_matches_reference(pwlu.pwlu, x, params, 1)
    y = pwlu.pwlu(x, *params, channel_dim=1)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_channels,shape,channel_dim", [(None, (3, 7, 256), 1), (7, (3, 7, 256), 1), (4, (5, 3, 4), -1)])
def test_fast_low_precision_rule(dtype, num_channels, shape, channel_dim):
    params = random_params(num_channels, n=16, seed=2)
    x32 = torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 3
    assert_low_precision_rule(pwlu.pwlu, x32, params, channel_dim, dtype)
    assert pwlu.pwlu(x32.to(dtype), *params, channel_dim=channel_dim).dtype == dtype


def test_backward_saves_only_input_and_parameters():
    params = [p.requires_grad_(True) for p in random_params(8, n=16)]
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        pwlu.pwlu(x, *params)
    assert sum(t.numel() for t in saved) == x.numel() + sum(p.numel() for p in params)


def test_use_backend_reference_routes_to_reference():
    params = random_params(3, n=4)
    x = torch.randn(2, 3, 4, requires_grad=True)
    with pwlu.use_backend("reference"):
        y = pwlu.pwlu(x, *params)
        assert pwlu.get_backend_name() == "reference"
    assert "pwlu" not in str(y.grad_fn).lower() or "Backward" in str(y.grad_fn)
    assert pwlu.get_backend_name() == "auto"
    with pytest.raises(ValueError, match="nope"):
        with pwlu.use_backend("nope"):
            pass


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_forced_backends_agree(backend):
    params = random_params(3, n=4)
    x = torch.randn(2, 3, 4) * 3
    with pwlu.use_backend(backend):
        y = pwlu.pwlu(x, *params)
    torch.testing.assert_close(y, pwlu.pwlu_reference(x, *params), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- numerics: NaN, inf, narrow ranges


@pytest.mark.parametrize("fn", [pwlu.pwlu, pwlu.pwlu_reference], ids=["pwlu", "reference"])
def test_nan_and_inf(fn):
    m = pwlu.PWLU(3, num_intervals=8)  # ReLU
    x = torch.tensor([[[float("nan"), 1.0], [float("-inf"), -1.0], [float("inf"), 0.5]]]).transpose(1, 2).contiguous()
    x = x.transpose(1, 2)  # (1, 3, 2)
    y = fn(x, *(p.detach() for p in m.parameters()), channel_dim=1)
    assert torch.isnan(y[0, 0, 0]) and torch.isnan(y).sum() == 1
    assert y[0, 1, 0].item() == 0.0  # ReLU(-inf) = 0, not NaN
    assert y[0, 2, 0].item() == float("inf")
    torch.testing.assert_close(y[0, :, 1], torch.relu(x[0, :, 1]))


def test_inf_with_nonzero_outer_slopes():
    m = pwlu.PWLU(None, num_intervals=4, init="leaky_relu")
    y = m(torch.tensor([float("-inf"), float("inf")]))
    assert y.tolist() == [float("-inf"), float("inf")]


@pytest.mark.parametrize("fn", [pwlu.pwlu, pwlu.pwlu_reference], ids=["pwlu", "reference"])
@pytest.mark.parametrize("right", [0.5, 0.4999999, 0.5 - 1e-4, -3.0])
def test_collapsed_range_stays_finite(fn, right):
    """B_R <= B_L (or nearly): the width is raised to MIN_WIDTH, output and grads finite."""
    params = random_params(None, n=16, seed=0)
    params[1] = torch.tensor(0.5)
    params[2] = torch.tensor(right)
    x = torch.randn(1000) * 2
    g = run(fn, x, params, 0)
    for key, v in g.items():
        assert torch.isfinite(v).all(), key
    assert g["dright_bound"].item() == 0.0 if right - 0.5 < pwlu.MIN_WIDTH else True


def test_collapsed_range_fast_matches_reference():
    params = random_params(3, n=16, seed=0)
    params[2] = params[1] + torch.tensor([-1.0, 0.0, 1e-5])
    assert_matches_reference(pwlu.pwlu, torch.randn(4, 3, 50) * 0.01 + params[1].reshape(1, 3, 1), params, 1, atol=1e-3)


# ---------------------------------------------------------------- module


@pytest.mark.parametrize("num_channels,channel_dim,shape", [(None, 1, (4, 6, 5, 5)), (6, 1, (4, 6, 5, 5)), (6, -1, (2, 7, 6))])
@pytest.mark.parametrize("n", [2, 8, 16])
def test_relu_init_is_exact_relu(num_channels, channel_dim, shape, n):
    m = pwlu.PWLU(num_channels, num_intervals=n, channel_dim=channel_dim)
    x = torch.randn(shape) * 5
    x[0].view(-1)[: n + 1] = torch.linspace(-3, 3, n + 1)  # breakpoints themselves
    for mode in (m.train, m.eval):
        mode()
        assert torch.equal(m(x), torch.relu(x))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_relu_init_near_zero_is_exact_but_for_one_rounding(backend):
    """The README's guarantee (Conventions): the ReLU-initialised PWLU equals relu(x) bit for bit
    except for float32 inputs less than half an ulp of B_L below 0, which round into the
    interval right of 0 and come out as x (an error below that half ulp)."""
    if backend == "cpu" and not pwlu.ops.dispatch.is_available("cpu", torch.device("cpu")):
        pytest.skip("no C compiler")
    act = pwlu.PWLU(None, 16)  # B_L = -3
    half_ulp = torch.finfo(torch.float32).eps * 2.0  # ulp(3) / 2 = 2^-23
    tiny = torch.tensor([1e-30, -1e-30, 1e-45, -1e-45, 0.0, -0.0, 5e-8, -5e-8])
    x = torch.cat([torch.linspace(-1e-6, 1e-6, 20001), tiny, torch.randn(1000)])
    with pwlu.use_backend(backend), torch.no_grad():
        y = act(x)
    off = y != torch.relu(x)
    window = (x < 0) & (x > -half_ulp)
    assert not (off & ~window).any(), x[off & ~window]
    assert (y - torch.relu(x)).abs().max() <= half_ulp
    assert off.any()  # the rounding is real (this test must fail if the region rule changes)


@pytest.mark.parametrize("name,fn", [("silu", F.silu), ("tanh", torch.tanh), ("gelu", F.gelu), ("identity", lambda x: x)])
def test_named_init_matches_function_at_breakpoints(name, fn):
    m = pwlu.PWLU(None, num_intervals=12, bound=2.0, init=name)
    b = torch.linspace(-2, 2, 13, dtype=torch.float64)
    torch.testing.assert_close(m(b.float()).double(), fn(b), rtol=1e-6, atol=1e-6)


def test_callable_init_exact_and_outer_slopes():
    fn = lambda x: 0.5 * x**2 - x  # noqa: E731
    m = pwlu.PWLU(3, num_intervals=10, bound=1.0, init=fn)
    b = torch.linspace(-1, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(m.points.detach().double(), fn(b).expand(3, 11).float().double())
    # f'(x) = x - 1: -2 at -1, 0 at 1
    torch.testing.assert_close(m.left_slope.detach(), torch.full((3,), -2.0))
    torch.testing.assert_close(m.right_slope.detach(), torch.zeros(3), atol=1e-6, rtol=0)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(m(x), pwlu.pwlu_reference(x, *m.parameters(), channel_dim=1))


def test_leaky_relu_init_exact():
    m = pwlu.PWLU(None, num_intervals=16, init="leaky_relu")
    x = torch.randn(1000) * 6
    torch.testing.assert_close(m(x), F.leaky_relu(x), rtol=1e-6, atol=1e-7)


def _relu_model_with_pwlu(num_channels=4):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, num_channels, 3), pwlu.PWLU(num_channels, 8), torch.nn.Flatten())


def _assert_eval_equals_training_form(m: pwlu.PWLU, x):
    m.train()
    with torch.no_grad():
        y_train = m(x)  # the training-form output
    m.eval()
    with torch.no_grad():
        y_eval = m(x)
        slopes, intercepts = m.inference_tables()
    torch.testing.assert_close(y_eval, y_train, rtol=1e-6, atol=0)
    y_ref = pwlu.pwlu_reference(x, *(p.detach() for p in m.parameters()), channel_dim=m.channel_dim)
    # one multiply-add a*x + b rounds like |a * B_i| (SPEC section 5's form cancels near x = B_i)
    bound = torch.maximum(m.left_bound.abs(), m.right_bound.abs()).max()
    scale = 1.0 + (slopes.abs().max() * bound).item()
    torch.testing.assert_close(y_eval, y_ref, rtol=1e-6, atol=1e-6 * scale)
    # and the tables themselves give the same numbers, one multiply-add per element
    n = m.num_intervals
    bl = m.left_bound.detach().reshape(-1, 1, 1) if m.channel_wise else m.left_bound.detach()
    d = ((m.right_bound - m.left_bound).detach() / n).reshape(bl.shape)
    k = torch.clamp(torch.floor((x - bl) / d) + 1, 0, n + 1).long()
    if m.channel_wise:
        a = slopes.detach()[torch.arange(m.num_channels).reshape(-1, 1, 1), k]
        b = intercepts.detach()[torch.arange(m.num_channels).reshape(-1, 1, 1), k]
    else:
        a, b = slopes.detach()[k], intercepts.detach()[k]
    torch.testing.assert_close(a * x + b, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eval_folded_never_stale(seed):
    torch.manual_seed(seed)
    m = pwlu.PWLU(4, num_intervals=8)
    x = torch.randn(2, 4, 5, 5) * 3
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    (m(x) * torch.randn_like(x)).sum().backward()
    opt.step()  # optimizer step
    _assert_eval_equals_training_form(m, x[:1])
    with torch.no_grad():
        m.points[1, 3] += 0.7  # manual edit
        m.left_slope.data[2] = -0.3  # edit through .data (does not bump the version counter)
    _assert_eval_equals_training_form(m, x[:1])
    other = pwlu.PWLU(4, num_intervals=8)
    other.load_state_dict(m.state_dict())  # load_state_dict
    _assert_eval_equals_training_form(other, x[:1])
    m64 = copy.deepcopy(m).to(torch.float64)  # .to()
    _assert_eval_equals_training_form(m64, x[:1].double())


def test_inference_tables_shapes():
    assert pwlu.PWLU(None, 8).inference_tables()[0].shape == (10,)
    s, b = pwlu.PWLU(5, 8).inference_tables()
    assert s.shape == b.shape == (5, 10)


def test_state_dict_roundtrip_and_deepcopy():
    m = pwlu.PWLU(3, num_intervals=6, init="silu")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = pwlu.PWLU(3, num_intervals=6)
    fresh.load_state_dict(torch.load(buf))
    x = torch.randn(2, 3, 7)
    assert torch.equal(fresh(x), m(x))
    clone = copy.deepcopy(m)
    assert torch.equal(clone(x), m(x))
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(clone.parameters(), m.parameters()))
    assert set(dict(m.named_parameters())) == set(PARAM_NAMES)


def test_module_dtypes_and_layouts():
    m = pwlu.PWLU(6, num_intervals=16, init="tanh")
    x = torch.randn(2, 6, 4, 4) * 2
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert m(x.to(dtype)).dtype == dtype
    nhwc = pwlu.PWLU(6, num_intervals=16, channel_dim=-1, init="tanh")
    nhwc.load_state_dict(m.state_dict())
    torch.testing.assert_close(nhwc(x.permute(0, 2, 3, 1)), m(x).permute(0, 2, 3, 1))
    torch.testing.assert_close(m(x.to(memory_format=torch.channels_last)), m(x))
    torch.testing.assert_close(m(x[:, :, ::2, 1:]), m(x)[:, :, ::2, 1:])  # non-contiguous


def test_module_gradients_flow_to_all_parameters():
    m = pwlu.PWLU(4, num_intervals=8)
    x = torch.randn(8, 4, 10) * 4
    (m(x) * torch.randn_like(x)).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_extra_repr():
    assert "mode=layer, num_intervals=16" in repr(pwlu.PWLU())
    text = repr(pwlu.PWLU(8, 4, channel_dim=-1, bound=2.5))
    assert "mode=channel" in text and "num_channels=8" in text and "range=[-2.5, 2.5]" in text and "num_intervals=4" in text


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(num_intervals=0), ValueError, "num_intervals.*0"),
        (dict(num_intervals=2.5), ValueError, "num_intervals.*2.5"),
        (dict(bound=0.0), ValueError, "bound.*0.0"),
        (dict(bound=-1), ValueError, "bound.*-1"),
        (dict(bound=float("nan")), ValueError, "bound.*nan"),
        (dict(init="softplus_typo"), ValueError, "softplus_typo"),
        (dict(num_channels=0), ValueError, "num_channels.*0"),
        (dict(channel_dim="1"), TypeError, "channel_dim"),
    ],
)
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pwlu.PWLU(**kwargs)


def test_forward_errors():
    m = pwlu.PWLU(4)
    with pytest.raises(TypeError, match="torch.int64"):
        m(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.bool"):
        pwlu.PWLU()(torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="5 channels.*num_channels=4"):
        m(torch.randn(2, 5))
    with pytest.raises(ValueError, match="channel_dim=3 is out of range"):
        pwlu.PWLU(4, channel_dim=3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="channel_dim=-3"):
        pwlu.pwlu(torch.randn(2, 4), *random_params(4, 3), channel_dim=-3)


def test_functional_shape_errors():
    pts, bl, br, kl, kr = random_params(4, 3)
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"right_bound must have shape \(4,\).*\(3,\)"):
        pwlu.pwlu(x, pts, bl, br[:3], kl, kr)
    with pytest.raises(ValueError, match=r"left_slope must have shape \(\)"):
        pwlu.pwlu(x, pts[0], bl[0], br[0], kl, kr[0])
    with pytest.raises(ValueError, match=r"points must have shape"):
        pwlu.pwlu(x, pts[None], bl, br, kl, kr)
    with pytest.raises(ValueError, match="N\\+1 >= 2"):
        pwlu.pwlu(x, pts[:, :1], bl, br, kl, kr)
    with pytest.raises(TypeError, match="points"):
        pwlu.pwlu(x, [1.0, 2.0], bl, br, kl, kr)
    with pytest.raises(ValueError, match="3 channels"):
        pwlu.pwlu(torch.randn(2, 3), pts, bl, br, kl, kr)
    with pytest.raises(TypeError, match="torch.int32"):
        pwlu.pwlu_reference(torch.ones(2, 4, dtype=torch.int32), pts, bl, br, kl, kr)
