"""2-D PWLU merges (issue 15, SPEC section 10): the ``PWLU2D`` module, ``convert_merges``, realignment,
metrics, optimizer groups, export, autocast, DDP, double backward and the CLI's ``--merges pwlu2d``.

The operator itself (reference vs loop, gradcheck, kernels) is tested in ``test_pwlu2d_ops.py``.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import pwlu
from pwlu import PWLU2D, ConversionError, LazyPWLU2D, convert_merges
from pwlu.app.models import build_model
from pwlu.convert2d import Addition, merge_sites
from pwlu.merge import merge_modules

NAMES = ("values", "x_left_bound", "x_right_bound", "y_left_bound", "y_right_bound",
         "x_left_slope", "x_right_slope", "y_left_slope", "y_right_slope")  # fmt: skip


def _randomise(m: PWLU2D, seed: int = 0, scale: float = 0.3) -> PWLU2D:
    """Random vertex values and slopes, shifted ranges: a surface far from addition."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in NAMES:
            p = getattr(m, name)
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def _scalar_f(x: float, y: float, v, xl, xr, yl, yr, kxl, kxr, kyl, kyr) -> float:
    """SPEC section 10 for one element, in plain Python floats (no torch)."""
    n = len(v) - 1
    xb, yb = min(max(x, xl), xr), min(max(y, yl), yr)
    u, w = (xb - xl) * n / (xr - xl), (yb - yl) * n / (yr - yl)
    i, j = min(math.floor(u), n - 1), min(math.floor(w), n - 1)
    s, t = u - i, w - j
    if s >= t:
        f = v[i][j] + s * (v[i + 1][j] - v[i][j]) + t * (v[i + 1][j + 1] - v[i + 1][j])
    else:
        f = v[i][j] + t * (v[i][j + 1] - v[i][j]) + s * (v[i + 1][j + 1] - v[i][j + 1])
    return f + kxl * min(x - xl, 0) + kxr * max(x - xr, 0) + kyl * min(y - yl, 0) + kyr * max(y - yr, 0)


def _mixed_inputs(shape, seed=0, dtype=torch.float32):
    """Inputs inside the grid and outside it on every side and corner (|x| up to 8 > bound 3)."""
    g = torch.Generator().manual_seed(seed)
    return (8 * torch.rand(shape, generator=g) * 2 - 8).to(dtype), (8 * torch.rand(shape, generator=g) * 2 - 8).to(
        dtype
    )


# ----------------------------------------------------------------------------- the module


@pytest.mark.parametrize(
    "num_channels,channel_dim,shape", [(None, 1, (3, 5, 4)), (5, 1, (2, 5, 3, 3)), (4, -1, (2, 6, 4))]
)
def test_addition_at_init(num_channels, channel_dim, shape):
    m = PWLU2D(num_channels, num_intervals=8, channel_dim=channel_dim)
    for dtype, tol in ((torch.float32, 4e-6), (torch.float64, 1e-14)):
        m = m.to(dtype)
        x, y = _mixed_inputs(shape, dtype=dtype)
        x.view(-1)[:4] = torch.tensor([-3.0, 3.0, 0.0, 0.75], dtype=dtype)  # on grid lines and the bounds
        z = m(x, y)
        assert z.dtype == dtype and z.shape == x.shape
        scale = (x.abs() + y.abs()).max()
        assert ((z - (x + y)).abs().max() / scale) <= tol
    assert torch.equal(m.x_left_slope, torch.ones_like(m.x_left_slope))
    assert m.values.shape == ((9, 9) if num_channels is None else (num_channels, 9, 9))


def test_parameters_buffers_and_repr():
    m = PWLU2D(6, num_intervals=4)
    assert [n for n, _ in m.named_parameters()] == list(NAMES)
    assert {n for n, _ in m.named_buffers()} == {
        "x_running_mean", "x_running_std", "y_running_mean", "y_running_std", "num_batches_tracked", "collecting"
    }  # fmt: skip
    text = repr(m)
    assert "mode=channel" in text and "num_channels=6" in text and "x_range=[-3, 3]" in text and "init=add" in text
    assert "mode=layer" in repr(PWLU2D())
    # V[i, j] = X_i + Y_j on the grid of [-2, 2]^2
    m = PWLU2D(None, num_intervals=4, bound=2.0)
    grid = torch.linspace(-2, 2, 5)
    assert torch.equal(m.values.detach(), grid[:, None] + grid[None, :])


def test_init_callable_and_named():
    def mul(a, b):
        return a * b

    m = PWLU2D(2, num_intervals=4, bound=2.0, init=mul)
    grid = torch.linspace(-2, 2, 5)
    torch.testing.assert_close(m.values[1].detach(), grid[:, None] * grid[None, :])
    # d(xy)/dx = y, averaged along the edge x = X_L over the grid's y values: 0
    torch.testing.assert_close(m.x_left_slope.detach(), torch.zeros(2))
    m = PWLU2D(None, 4, init="max")
    x = torch.tensor([0.3, -1.2, 2.9])
    y = torch.tensor([0.1, 1.4, -2.0])
    # max is linear on every triangle of the grid whose diagonal is x = y: exact at any point
    torch.testing.assert_close(m(x, y), torch.maximum(x, y))
    assert m.init_name == "max" and "init=mul" in repr(PWLU2D(init=mul))


def test_bad_arguments_name_the_values():
    with pytest.raises(ValueError, match="num_intervals must be an int >= 1, but got 0"):
        PWLU2D(num_intervals=0)
    with pytest.raises(ValueError, match="num_channels must be None or an int >= 1, but got -2"):
        PWLU2D(-2)
    with pytest.raises(ValueError, match="bound must be a finite number > 0, but got inf"):
        PWLU2D(bound=math.inf)
    # Regression: a range narrower than MIN_WIDTH, which the ops widen, was accepted, so the
    # module was not addition at init (100% error at bound=1e-4)
    with pytest.raises(ValueError, match=r"x range .* at least pwlu.MIN_WIDTH=0.001 wide .* -9.99999"):
        PWLU2D(3, bound=1e-4)
    m = PWLU2D(3)
    with pytest.raises(ValueError, match=r"y range .* at least pwlu.MIN_WIDTH"):
        m.init_from_function(torch.add, 0.0, 1.0, 0.0, 1e-5)
    torch.testing.assert_close(m.values.detach(), PWLU2D(3).values.detach())  # unchanged
    with pytest.raises(ValueError, match=r"x range .*MIN_WIDTH=0.001 wide in bfloat16 .* \[1.0\] and \[1.0\]"):
        PWLU2D(1).to(torch.bfloat16).init_from_function(torch.add, 1.0, 1.002, 0.0, 1.0)  # equal once rounded
    # realignment and fix_init follow their own min_width and bound (review: they crashed on this check)
    net = nn.Sequential()
    net.add_module("merge", PWLU2D(2))
    net.merge.set_collecting(True)
    net.merge(torch.ones(8, 2), torch.randn(8, 2))  # constant x: the minimum width
    net.merge.set_collecting(False)
    assert pwlu.realign_boundaries(net, min_width=1e-3) == ["merge"]
    pwlu.fix_init(net, 1e-4)
    m = PWLU2D(3, bound=5e-4)  # exactly MIN_WIDTH wide: addition
    x = 1e-3 * torch.rand(2, 3, 4) - 5e-4
    torch.testing.assert_close(m(x, x.flip(0)), x + x.flip(0), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="unknown init 'mull'"):
        PWLU2D(init="mull")
    with pytest.raises(TypeError, match="must act elementwise"):
        PWLU2D(init=lambda a, b: (a * b).sum())
    with pytest.raises(ValueError, match="non-finite values on the grid"):
        PWLU2D(init=lambda a, b: a / (b - b))
    m = PWLU2D(3)
    with pytest.raises(ValueError, match=r"x.shape=\(2, 3, 4\) and y.shape=\(2, 3, 5\)"):
        m(torch.randn(2, 3, 4), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="num_channels=3"):
        m(torch.randn(2, 4, 5), torch.randn(2, 4, 5))
    with pytest.raises(TypeError, match="must be tensors"):
        m(torch.randn(2, 3), 1.0)
    with torch.no_grad():
        m.values[1, 2, 3] = math.nan
    with pytest.raises(ValueError, match="values"):
        m(torch.randn(2, 3), torch.randn(2, 3))


def test_forward_matches_reference_and_scalar_definition():
    m = _randomise(PWLU2D(3, num_intervals=5, channel_dim=-1), seed=1).double()
    x, y = _mixed_inputs((4, 7, 3), seed=2, dtype=torch.float64)
    z = m(x, y)
    torch.testing.assert_close(z, m.reference(x, y), rtol=0, atol=1e-12)
    p = [getattr(m, n).detach() for n in NAMES]
    for k in range(0, x.numel(), 5):
        b, t, c = np.unravel_index(k, x.shape)
        scalars = [p[0][c].tolist()] + [q[c].item() for q in p[1:]]
        expected = _scalar_f(x[b, t, c].item(), y[b, t, c].item(), *scalars)
        assert abs(z[b, t, c].item() - expected) <= 1e-9 * max(1.0, abs(expected))


@pytest.mark.parametrize("num_channels", [None, 4])
def test_eval_and_export_forms_equal_training_form(num_channels):
    m = _randomise(PWLU2D(num_channels, num_intervals=6), seed=3)
    x, y = _mixed_inputs((2, 4, 5, 3), seed=4)
    x[0, 0, 0, :2] = torch.tensor([math.nan, math.inf])
    y[0, 0, 1, :2] = torch.tensor([-math.inf, 2.0])
    params = [getattr(m, n).detach() for n in NAMES]
    reference = pwlu.pwlu2d_reference(x, y, *params, channel_dim=1 if num_channels else None)
    train = m.train()(x, y)  # the differentiable op
    with torch.no_grad():
        evaluated = m.eval()(x, y)  # the inference plan
        evaluated_again = m(x, y)  # the plan reused
    exported = m._forward_export(x, y)
    for got in (train, evaluated, evaluated_again, exported):
        torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-5, equal_nan=True)
    assert torch.isnan(train[0, 0, 0, 0]) and not torch.isnan(train[0, 0, 0, 1:]).any()


def test_gradients_and_double_backward():
    m = _randomise(PWLU2D(2, num_intervals=3), seed=5).double()
    x, y = _mixed_inputs((3, 2, 2), seed=6, dtype=torch.float64)
    x.requires_grad_(True)
    y.requires_grad_(True)
    params = [getattr(m, n) for n in NAMES]

    def f(x, y, *p):
        return pwlu.pwlu2d(x, y, *p, channel_dim=1)

    assert torch.autograd.gradcheck(f, (x, y, *params))
    # double backward through the module: d/dtheta |dz/dx|^2 exists and matches finite differences
    assert torch.autograd.gradgradcheck(f, (x, y, *params))
    z = m(x, y)
    (gx,) = torch.autograd.grad(z.sum(), x, create_graph=True)
    (gv,) = torch.autograd.grad(gx.pow(2).sum(), m.values)
    assert gv.abs().sum() > 0


def test_mixed_dtypes_promote_and_autocast():
    m = PWLU2D(3)
    x = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    y = torch.randn(2, 3, 4)
    z = m(x, y)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, x.float() + y, rtol=0, atol=1e-5)
    # under autocast: the surface of a non-additive merge, against the float32 reference
    _randomise(m, seed=8)
    xb, yb = (t.to(torch.bfloat16) for t in _mixed_inputs((2, 3, 4), seed=9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zb = m(xb, yb)
    assert zb.dtype == torch.bfloat16
    reference = pwlu.pwlu2d_reference(xb.float(), yb.float(), *(getattr(m, n).detach() for n in NAMES))
    torch.testing.assert_close(zb.float(), reference, rtol=2**-7, atol=1e-2)
    model = pwlu.convert_merges(
        build_model("resnet", lambda c, **k: nn.ReLU()), example_input=torch.randn(2, 1, 28, 28)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    realigner = pwlu.BoundaryRealigner(model, warmup_steps=1)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.arange(4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        realigner.step()
    for _, merge in merge_modules(model):
        assert merge.values.dtype == torch.float32 and torch.isfinite(merge.values).all()
        assert merge.values.grad is not None and torch.isfinite(merge.values.grad).all()


def test_lazy():
    m = LazyPWLU2D(num_intervals=4)
    x, y = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    z = m(x, y)  # 3-D: channel axis -1
    assert type(m) is PWLU2D and m.num_channels == 3 and m.values.shape == (3, 5, 5)
    torch.testing.assert_close(z, x + y)
    assert "num_channels=<lazy>" in repr(LazyPWLU2D())
    # Regression: restored from a state_dict (resuming a lazy model), its first call crashed
    # (num_channels stayed None with (C, N+1, N+1) values)
    src = _randomise(PWLU2D(3, num_intervals=4), seed=2)
    src.x_running_mean.fill_(0.5)
    lazy = LazyPWLU2D(num_intervals=4)
    lazy.load_state_dict(src.state_dict())
    x, y = _mixed_inputs((2, 3, 5, 5), seed=3)
    torch.testing.assert_close(lazy(x, y), src(x, y))
    assert type(lazy) is PWLU2D and lazy.num_channels == 3 and torch.equal(lazy.x_running_mean, src.x_running_mean)


# ----------------------------------------------------------------------------- statistics and realignment


def _expected_running(batches: list[torch.Tensor], momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC Eq. 5 per channel (axis 1), first batch sets the values; unbiased std; float64."""
    mean = std = None
    for b in batches:
        flat = b.double().transpose(0, 1).reshape(b.shape[1], -1)
        bm, bs = flat.mean(1), flat.std(1, unbiased=True)
        mean = bm if mean is None else (1 - momentum) * mean + momentum * bm
        std = bs if std is None else (1 - momentum) * std + momentum * bs
    return mean, std


def test_realigner_phases_on_a_converted_model():
    torch.manual_seed(0)
    model = convert_merges(build_model("resnet", lambda c, **k: nn.ReLU()), example_input=torch.zeros(2, 1, 28, 28))
    merges = merge_modules(model)
    assert len(merges) == 3
    seen = {name: ([], []) for name, _ in merges}

    def record(name):
        def hook(module, args):
            seen[name][0].append(args[0].detach().clone())
            seen[name][1].append(args[1].detach().clone())

        return hook

    for name, m in merges:
        m.register_forward_pre_hook(record(name))
    opt = torch.optim.SGD(pwlu.parameter_groups(model, 1e-3), lr=0.05, momentum=0.9)
    warmup = 3
    realigner = pwlu.BoundaryRealigner(model, warmup_steps=warmup)
    initial = {f"{n}.{p}": getattr(m, p).detach().clone() for n, m in merges for p in NAMES}
    for step in range(warmup + 2):
        x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(step))
        out = model(x)
        if step < warmup:  # phase I: exactly the addition it started as (bit for bit: frozen)
            assert all(torch.equal(getattr(m, p), initial[f"{n}.{p}"]) for n, m in merges for p in NAMES)
            assert realigner.phase == "collecting" and all(bool(m.collecting) for _, m in merges)
        F.cross_entropy(out, torch.arange(8) % 10).backward()
        opt.step()
        opt.zero_grad()
        realigner.step()
        if step == warmup - 1:  # the reset: both ranges mean ± 3 std of their input, V addition, slopes 1
            for name, m in merges:
                for axis, k in (("x", 0), ("y", 1)):
                    mean, std = _expected_running(seen[name][k][:warmup], 0.1)
                    torch.testing.assert_close(
                        getattr(m, f"{axis}_left_bound").double(), mean - 3 * std, rtol=1e-5, atol=1e-5
                    )
                    torch.testing.assert_close(
                        getattr(m, f"{axis}_right_bound").double(), mean + 3 * std, rtol=1e-5, atol=1e-5
                    )
                a, b = _mixed_inputs((2, m.num_channels, 3, 3), seed=7)
                torch.testing.assert_close(m(a, b), a + b, rtol=0, atol=1e-5)
                for p in NAMES[5:]:
                    assert torch.equal(getattr(m, p), torch.ones_like(getattr(m, p)))
                assert int(m.num_batches_tracked) == warmup
    assert realigner.phase == "learning" and not any(bool(m.collecting) for _, m in merges)
    # phase II: the merges learn
    assert any(not torch.equal(m.values, initial[f"{n}.values"]) for n, m in merges)


def test_statistics_only_while_collecting_in_training():
    m = PWLU2D(3)
    x, y = torch.randn(4, 3, 2), 2 + 3 * torch.randn(4, 3, 2)
    m(x, y)
    assert int(m.num_batches_tracked) == 0
    m.set_collecting(True)
    m.eval()(x, y)
    assert int(m.num_batches_tracked) == 0
    m.train()(x, y)
    m(2 * x, y - 1)
    assert int(m.num_batches_tracked) == 2
    for buf, batches in (("x", [x, 2 * x]), ("y", [y, y - 1])):
        mean, std = _expected_running(batches, 0.1)
        torch.testing.assert_close(getattr(m, f"{buf}_running_mean").double(), mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(getattr(m, f"{buf}_running_std").double(), std, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("init", ["mean", "max", "product"])
def test_realignment_and_fix_init_keep_the_modules_init(init):
    """Regression: realignment and fix_init reset every PWLU2D to addition, also one made with
    init="mean", "max" or a callable: at the end of phase I its function jumped (the identity
    contribution doubled for "mean") while it still reported its init. They reset to the module's
    own init on the new grid (addition for the default, SPEC section 10)."""
    fn = {"mean": lambda a, b: 0.5 * (a + b), "max": torch.maximum, "product": lambda a, b: a * b}[init]
    m = PWLU2D(2, num_intervals=8, init=fn if init == "product" else init).double()
    model = nn.Sequential()
    model.add_module("merge", m)
    m.set_collecting(True)
    x, y = 1 + 0.5 * torch.randn(256, 2, dtype=torch.float64), -2 + 2 * torch.randn(256, 2, dtype=torch.float64)
    m(x, y)
    m.set_collecting(False)
    assert pwlu.realign_boundaries(model) == ["merge"]
    xl, xr, yl, yr = (getattr(m, n).detach() for n in NAMES[1:5])
    assert torch.allclose(xl, m.x_running_mean - 3 * m.x_running_std)
    gx = xl[:, None] + torch.arange(9, dtype=torch.float64) / 8 * (xr - xl)[:, None]  # the new vertices
    gy = yl[:, None] + torch.arange(9, dtype=torch.float64) / 8 * (yr - yl)[:, None]
    torch.testing.assert_close(m.values.detach(), fn(gx[:, :, None], gy[:, None, :]))
    pwlu.fix_init(model, 2.0)
    g = torch.linspace(-2.0, 2.0, 9, dtype=torch.float64)
    torch.testing.assert_close(m.values.detach(), fn(g[:, None], g[None, :]).expand(2, 9, 9))


def test_realign_boundaries_fix_init_and_preserving_rebound():
    m = PWLU2D(2, num_intervals=4)
    model = nn.Sequential()
    model.add_module("merge", m)
    with pytest.warns(UserWarning, match="PWLU2D 'merge' has seen no training batch"):
        assert pwlu.realign_boundaries(model) == []
    m.set_collecting(True)
    x, y = 1 + 0.5 * torch.randn(64, 2), -2 + 2 * torch.randn(64, 2)
    m(x, y)
    _randomise(m, seed=8)
    before = [getattr(m, n).detach().clone() for n in NAMES]
    names = pwlu.realign_boundaries(model, preserve_function=True)
    assert names == ["merge"]
    torch.testing.assert_close(m.x_left_bound, x.mean(0) - 3 * x.std(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.y_right_bound, y.mean(0) + 3 * y.std(0), rtol=1e-5, atol=1e-5)
    # the new vertex values are the old surface at the new vertices
    grid_x = (
        m.x_left_bound.detach()[:, None] + torch.arange(5) / 4 * (m.x_right_bound - m.x_left_bound).detach()[:, None]
    )
    grid_y = (
        m.y_left_bound.detach()[:, None] + torch.arange(5) / 4 * (m.y_right_bound - m.y_left_bound).detach()[:, None]
    )
    for c in range(2):
        for i in (0, 2, 4):
            for j in (1, 4):
                scalars = [before[0][c].tolist()] + [q[c].item() for q in before[1:]]
                expected = _scalar_f(grid_x[c, i].item(), grid_y[c, j].item(), *scalars)
                assert abs(m.values[c, i, j].item() - expected) < 1e-4
    assert torch.equal(m.x_left_slope, before[5])  # kept
    pwlu.realign_boundaries(model)  # the SPEC reset: addition again
    torch.testing.assert_close(m(x, y), x + y, rtol=0, atol=1e-5)
    m.set_collecting(True)
    pwlu.fix_init(model, 6.0)
    assert not bool(m.collecting) and int(m.num_batches_tracked) == 0
    assert torch.equal(m.x_right_bound, torch.full((2,), 6.0)) and torch.equal(m.y_left_bound, torch.full((2,), -6.0))
    torch.testing.assert_close(m(x, y), x + y, rtol=0, atol=1e-5)
    m.set_collecting(True)
    m(torch.tensor([[math.nan, 1.0]]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="non-finite running statistics of its x input"):
        pwlu.realign_boundaries(model)


def test_boundary_iou_per_input_and_parameter_groups():
    m = PWLU2D(2, num_intervals=4)
    model = nn.Sequential()
    model.add_module("merge", m)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4000, 2, generator=g) * 2 - 1, torch.rand(4000, 2, generator=g) * 12 - 6  # U[-1,1], U[-6,6]
    iou = pwlu.boundary_iou(model, [(x, y)], lower=0.0, upper=1.0, forward=lambda net, batch: net.merge(*batch))
    assert set(iou) == {"merge.x", "merge.y"}
    # [-3, 3] against [~-1, ~1] and [~-6, ~6]: IOU 1/3 and 1/2
    torch.testing.assert_close(iou["merge.x"], torch.full((2,), 1 / 3, dtype=torch.float64), atol=2e-3, rtol=0)
    torch.testing.assert_close(iou["merge.y"], torch.full((2,), 1 / 2, dtype=torch.float64), atol=2e-3, rtol=0)
    # Regression: a merge called with its inputs by name crashed boundary_iou (IndexError)
    for call in (lambda net, b: net.merge(b[0], y=b[1]), lambda net, b: net.merge(x=b[0], y=b[1])):
        by_name = pwlu.boundary_iou(model, [(x, y)], lower=0.0, upper=1.0, forward=call)
        for key in iou:
            torch.testing.assert_close(by_name[key], iou[key])
    net = nn.Sequential(nn.Linear(2, 2))
    net.add_module("merge", PWLU2D(2))
    groups = pwlu.parameter_groups(net, weight_decay=1e-4)
    assert [len(g["params"]) for g in groups] == [2, 9] and groups[1]["weight_decay"] == 0.0


# ----------------------------------------------------------------------------- conversion


def _count(model: nn.Module) -> int:
    return sum(isinstance(m, PWLU2D) for m in model.modules())


def _same_outputs(model: nn.Module, x: torch.Tensor, train: bool = False, **kwargs) -> nn.Module:
    """Converted in float64 (so that rounding, amplified by batch norm on tiny maps, stays far below
    any real difference), with the same outputs as before."""
    model.train(train).double()
    x = x.double()
    with torch.no_grad():
        before = model(x)
        converted = convert_merges(model, example_input=x, **kwargs)
        after = converted(x)
    scale = before.abs().max()
    assert (after - before).abs().max() <= 1e-11 * scale, ((after - before).abs().max(), scale)
    assert all(m.values.dtype == torch.float64 for _, m in merge_modules(converted))
    return converted


@pytest.mark.parametrize("name,count", [("resnet18", 8), ("resnet50", 16), ("mobilenet_v2", 10)])
def test_torchvision_counts_and_outputs(name, count):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    keys = set(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    if name == "mobilenet_v2":  # its activations vanish at init in eval mode: the features, batch statistics
        model = model.features
    converted = _same_outputs(model, x, train=name == "mobilenet_v2")
    assert _count(converted) == count
    assert keys <= set(converted.state_dict()) if name != "mobilenet_v2" else True
    assert all(type(m).__name__ != "Addition" for m in converted.modules())


def test_timm_counts_and_outputs():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    converted = _same_outputs(timm.create_model("resnet18", pretrained=False), torch.randn(1, 3, 64, 64))
    assert _count(converted) == 8
    converted = _same_outputs(timm.create_model("mobilenetv3_small_100", pretrained=False), torch.randn(1, 3, 64, 64))
    assert _count(converted) == 6  # the six inverted residuals with stride 1 and equal widths


@pytest.mark.parametrize(
    "name,count",
    [("mobilenet_v3_small", 6), ("mobilenet_v3_large", 10), ("efficientnet_b0", 9), ("mobilenet_v2", 10)],
)
def test_torchvision_inverted_residual_zoo(name, count):
    """The whole networks (MobileNetV3's and EfficientNet's inverted residuals with
    squeeze-and-excitation, stochastic depth in EfficientNet's MBConv), in train mode: at init in
    eval mode their activations shrink to 1e-10 and below, where addition at init is exact only up
    to eps times the grid's bound (see the README)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    for m in model.modules():  # no random numbers in train mode: dropout and stochastic depth off
        if isinstance(m, nn.Dropout) or type(m).__name__ == "StochasticDepth":
            m.p = 0.0
    converted = _same_outputs(model, torch.randn(2, 3, 64, 64), train=True)
    assert _count(converted) == count


def test_converted_blocks_keep_their_plain_attributes():
    """Regression: a converted block (an fx.GraphModule) lost its plain attributes (torchvision's
    BasicBlock.stride and .expansion, InvertedResidual.use_res_connect and .out_channels), which
    init loops and user code read; they are copied. Its class and methods are not (documented)."""
    torchvision = pytest.importorskip("torchvision")
    resnet = convert_merges(torchvision.models.resnet18(weights=None), example_input=torch.randn(1, 3, 64, 64))
    block = resnet.layer2[0]
    assert isinstance(block, torch.fx.GraphModule) and type(block).__name__ == "BasicBlock"
    assert (block.stride, block.expansion) == (2, 1) and resnet.layer1[0].stride == 1
    copied = copy.deepcopy(resnet)  # a GraphModule's deepcopy rebuilds it from its graph
    assert (copied.layer2[0].stride, copied.layer2[0].expansion) == (2, 1)
    mobilenet = torchvision.models.mobilenet_v2(weights=None)
    k = next(i for i, b in enumerate(mobilenet.features) if getattr(b, "use_res_connect", False))
    before = mobilenet.features[k]
    mobilenet = convert_merges(mobilenet, example_input=torch.randn(1, 3, 64, 64))
    after = mobilenet.features[k]
    assert isinstance(after, torch.fx.GraphModule) and after.use_res_connect
    assert (after.out_channels, after.stride) == (before.out_channels, before.stride)


@pytest.mark.parametrize(
    "name,count", [("efficientnet_b0", 9), ("mobilenetv2_100", 10), ("resnet50", 16), ("convnext_atto", 12)]
)
def test_timm_zoo(name, count):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, drop_rate=0.0, drop_path_rate=0.0)
    assert _count(_same_outputs(model, torch.randn(2, 3, 64, 64), train=name != "convnext_atto")) == count


def test_app_models_exclude_mode_and_composition_in_either_order():
    torchvision = pytest.importorskip("torchvision")
    x = torch.randn(2, 1, 28, 28)
    for arch, count in (("resnet", 3), ("mobilenet_v3", 3)):
        torch.manual_seed(0)
        assert _count(_same_outputs(build_model(arch, lambda c, **k: nn.ReLU()), x)) == count
    torch.manual_seed(0)
    model = _same_outputs(torchvision.models.resnet18(weights=None), torch.randn(1, 3, 64, 64), exclude="layer4.*",
                          mode="layer")  # fmt: skip
    assert _count(model) == 6 and all(m.num_channels is None for _, m in merge_modules(model))
    img = torch.randn(1, 3, 64, 64)
    for order in ("activations first", "merges first"):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(weights=None).eval()
        steps = [
            lambda m: pwlu.convert_activations(m, example_input=img),
            lambda m: convert_merges(m, example_input=img),
        ]
        if order == "merges first":
            steps.reverse()
        for step in steps:
            model = step(model)
        assert _count(model) == 8 and sum(isinstance(m, pwlu.PWLU) for m in model.modules()) == 17, order
        assert model.layer2[0].merge.num_channels == 128 and hasattr(model.layer2[0], "relu_1")


class _Block(nn.Module):
    def __init__(self, forward):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.scale = nn.Parameter(torch.ones(1, 3, 1, 1))
        self._fn = forward

    def forward(self, x):
        return self._fn(self, x)


def _block(fn, name="BasicBlock"):
    return type(name, (_Block,), {})(fn)


def test_what_is_and_is_not_a_merge():
    x = torch.randn(2, 3, 4, 4)
    cases = {
        "residual": (lambda s, x: s.conv(x) + x, 1),
        "torch.add and add_": (lambda s, x: torch.add(s.conv(x), x).add_(s.conv(x)), 2),
        "constant": (lambda s, x: s.conv(x) + 1.0, 0),
        "parameter": (lambda s, x: s.conv(x) + s.scale, 0),
        "alpha": (lambda s, x: torch.add(s.conv(x), x, alpha=2), 0),
    }
    for what, (fn, count) in cases.items():
        assert len(merge_sites(_block(fn))) == count, what
    net = nn.Sequential(_block(cases["torch.add and add_"][0]))
    net = _same_outputs(net, x)
    assert {n for n, _ in merge_modules(net)} == {"0.merge", "0.merge_1"}
    # the model itself as the block: a new GraphModule comes back
    root = convert_merges(_block(cases["residual"][0]), example_input=x)
    assert isinstance(root, torch.fx.GraphModule) and type(root).__name__ == "BasicBlock" and _count(root) == 1
    # other classes only when asked for
    with pytest.warns(UserWarning, match="converted nothing"):
        convert_merges(nn.Sequential(_block(cases["residual"][0], "MyBlock")), example_input=x)
    net = convert_merges(nn.Sequential(_block(cases["residual"][0], "MyBlock")), example_input=x, blocks=["MyBlock"])
    assert _count(net) == 1


def test_size_arithmetic_and_keyword_additions():
    """Bugs found by an adversarial review: an addition of two sizes (x.size(2) + x.size(3))
    was taken for a merge (an Addition left behind, a 'not reached' warning, the real merge
    renamed merge_1, TorchScript broken), and torch.add(input=, other=) / a.add(other=) were
    not recognised."""
    x = torch.randn(2, 3, 5, 5)

    def sizes(s, x):
        hw = x.size(2) + x.size(3)
        n = x.shape[-1] * 2 + x.dim()
        return s.conv(x) * ((hw + n) / 10.0) + x

    class _Positional(nn.Module):  # a parameter cut to the input's length: not a branch
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(1, 3, 9, 5))

        def forward(self, x):
            return x + self.pos[:, :, : x.size(2)]

    assert merge_sites(_Positional()) == []

    class _Sized(nn.Module):  # int arguments, added in the forward: not a merge
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x, h: int = 2, w: int = 3):
            return self.conv(x) * (h + w) + x

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 'not reached' warning
        sized = convert_merges(nn.Sequential(_Sized()), example_input=torch.randn(2, 3, 4, 4), blocks=[_Sized])
    assert len(merge_modules(sized)) == 1 and not any(isinstance(m, Addition) for m in sized.modules())
    with torch.no_grad():
        x = torch.randn(2, 3, 4, 4)
        torch.testing.assert_close(sized(x), sized[0].conv(x) * 5 + x)
    cases = {
        "sizes": (sizes, 1),
        "keywords": (lambda s, x: torch.add(input=s.conv(x), other=x), 1),
        "method keyword": (lambda s, x: s.conv(x).add(other=x), 1),
        "keyword alpha": (lambda s, x: torch.add(input=s.conv(x), other=x, alpha=2), 0),
    }
    for what, (fn, count) in cases.items():
        assert len(merge_sites(_block(fn))) == count, what
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 'not reached' warning
        net = _same_outputs(nn.Sequential(_block(sizes)), x)
        kw = _same_outputs(nn.Sequential(_block(cases["keywords"][0])), x)
    assert [n for n, _ in merge_modules(net)] == ["0.merge"] and _count(kw) == 1
    assert not any(isinstance(m, Addition) for m in net.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation
        scripted = torch.jit.script(net.eval())
    with torch.no_grad():
        torch.testing.assert_close(scripted(x.double()), net(x.double()))


class _Conv1dBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv1d(c, c, 3, padding=1)

    def forward(self, x):
        out = self.conv(x)
        out += x
        return out


class _ChannelsLastBlock(nn.Module):  # a Swin-style block on (B, H, W, C)
    def __init__(self, c):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(c), nn.Linear(c, c)

    def forward(self, x):
        return x + self.fc(self.norm(x))


def _axis(net: nn.Module) -> tuple[int | None, int]:
    """``(num_channels, channel_dim)`` of the one merge in ``net``."""
    ((_, m),) = merge_modules(net)
    return m.num_channels, m.channel_dim


def test_channel_axis_from_the_block_layers():
    """The channel axis was guessed from the rank alone: a Conv1d block's (B, C, L) got one
    surface per position (and failed on another length), a Swin block's (B, H, W, C) one per row."""
    conv1d = convert_merges(nn.Sequential(_Conv1dBlock(8)), example_input=torch.randn(2, 8, 50), blocks=[_Conv1dBlock])
    assert _axis(conv1d) == (8, 1)
    with torch.no_grad():
        x = torch.randn(2, 8, 60)  # another length
        torch.testing.assert_close(conv1d(x), conv1d[0].conv(x) + x)
    swin = convert_merges(
        nn.Sequential(_ChannelsLastBlock(6)), example_input=torch.randn(2, 5, 7, 6), blocks=[_ChannelsLastBlock]
    )
    assert _axis(swin) == (6, -1)
    with torch.no_grad():
        x = torch.randn(1, 9, 3, 6)  # another resolution
        torch.testing.assert_close(swin(x), x + swin[0].fc(swin[0].norm(x)))
    # explicit, as an argument or in merge_kwargs
    for how in ({"channel_dim": 2}, {"merge_kwargs": {"channel_dim": 2}}):
        net = convert_merges(
            nn.Sequential(_Conv1dBlock(8)), example_input=torch.randn(2, 8, 50), blocks=[_Conv1dBlock], **how
        )
        assert _axis(net) == (50, 2), how
    with pytest.raises(TypeError, match="disagree"):
        convert_merges(nn.Sequential(_Conv1dBlock(8)), example_input=torch.randn(2, 8, 5), blocks=[_Conv1dBlock],
                       channel_dim=1, merge_kwargs={"channel_dim": 2})  # fmt: skip
    with pytest.raises(TypeError, match="num_channels"):
        convert_merges(
            nn.Sequential(_Conv1dBlock(8)), example_input=torch.randn(2, 8, 5), merge_kwargs={"num_channels": 8}
        )
    with pytest.raises(ConversionError, match="channel_dim=3 is not an axis"):
        convert_merges(
            nn.Sequential(_Conv1dBlock(8)), example_input=torch.randn(2, 8, 5), blocks=[_Conv1dBlock], channel_dim=3
        )

    # layers that name both axes' sizes (a 64 -> 256 -> 64 bottleneck on length 256), all of them
    # channel-first: axis 1. Regression: this was a guess, and the same tie with the sizes equal
    # (a Conv1d block on (2, 16, 16), a Swin block at 384 x 384 on (1, 96, 96, 96)) took the rank's
    # default without a warning: axis -1 for the Conv1d block, axis 1 (H) for the Swin block
    class _Bottleneck1d(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv1d(64, 256, 1), nn.Conv1d(256, 64, 1)

        def forward(self, x):
            return self.b(self.a(x)) + x

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net = convert_merges(
            nn.Sequential(_Bottleneck1d()), example_input=torch.randn(2, 64, 256), blocks=[_Bottleneck1d]
        )
        assert _axis(net) == (64, 1)
        square = convert_merges(
            nn.Sequential(_Conv1dBlock(16)), example_input=torch.randn(2, 16, 16), blocks=[_Conv1dBlock]
        )
        assert _axis(square) == (16, 1)
        cube = convert_merges(
            nn.Sequential(_ChannelsLastBlock(6)), example_input=torch.randn(1, 6, 6, 6), blocks=[_ChannelsLastBlock]
        )
        assert _axis(cube) == (6, -1)
    with torch.no_grad():
        x = torch.randn(1, 9, 3, 6)  # another resolution
        torch.testing.assert_close(cube(x), x + cube[0].fc(cube[0].norm(x)))

    # layers of both layouts that name both axes: a guess, with a warning
    class _Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv1d(64, 64, 1), nn.Linear(256, 256)

        def forward(self, x):
            return self.fc(self.conv(x)) + x

    with pytest.warns(UserWarning, match="do not tell which axis"):
        convert_merges(nn.Sequential(_Mixed()), example_input=torch.randn(2, 64, 256), blocks=[_Mixed])
    net = convert_merges(nn.Sequential(_Mixed()), example_input=torch.randn(2, 64, 256), blocks=[_Mixed], channel_dim=1)
    assert _axis(net) == (64, 1)
    # layers that do not tell: the rank's default, with a warning
    blind = _block(lambda s, x: torch.tanh(x) + x, "Blind")
    with pytest.warns(UserWarning, match="do not tell which axis"):
        net = convert_merges(nn.Sequential(blind), example_input=torch.randn(2, 4, 5), blocks=["Blind"])
    assert _axis(net) == (5, -1)


def test_conversion_errors_leave_the_model_unchanged():
    x = torch.randn(2, 3, 4, 4)

    def control_flow(s, x):
        y = s.conv(x)
        return y + x if bool(y.sum() > 0) else y

    net = nn.Sequential(_block(lambda s, x: s.conv(x) + x), _block(control_flow))
    before = [type(m) for m in net]
    with pytest.raises(ConversionError, match=r"cannot trace the residual block BasicBlock 1"):
        convert_merges(net, example_input=x)
    assert [type(m) for m in net] == before and _count(net) == 0
    assert not any(isinstance(m, Addition) for m in net.modules())

    def read_after_inplace(s, x):
        y = s.conv(x)
        y.add_(x)
        return s.conv(y) * y  # both reads of y see the sum: they read the merge's output

    assert _count(_same_outputs(nn.Sequential(_block(read_after_inplace)), x)) == 1
    with pytest.raises(ConversionError, match="different shapes"):
        convert_merges(nn.Sequential(_block(lambda s, x: s.conv(x) + x.mean(1, keepdim=True))), example_input=x)
    with pytest.raises(ConversionError, match="forward pass with example_input failed"):
        convert_merges(nn.Sequential(_block(lambda s, x: s.conv(x) + x)), example_input=torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match="mode must be 'channel' or 'layer'"):
        convert_merges(nn.Sequential(), mode="pixel")
    # Regression: these errors named convert_activations and its activations, or were raw
    with pytest.raises(ConversionError, match="^convert_merges: the model is a TorchScript .* residual additions"):
        convert_merges(torch.jit.script(nn.Sequential(nn.Conv2d(3, 3, 1))), example_input=x)
    for exclude in (3, [3], 2.5):
        with pytest.raises(TypeError, match=f"convert_merges: exclude must be a pattern .* {re.escape(repr(exclude))}"):
            convert_merges(nn.Sequential(), exclude=exclude)
    with pytest.raises(TypeError, match="convert_activations: exclude must be a pattern .* 3"):
        pwlu.convert_activations(nn.Sequential(nn.ReLU()), exclude=3, example_input=torch.randn(2, 3))
    with pytest.raises(TypeError, match="init function <lambda> must return a floating-point tensor .* bool"):
        PWLU2D(2, init=lambda a, b: a > b)


# ----------------------------------------------------------------------------- export and compile


def _converted_small() -> nn.Module:
    torch.manual_seed(0)
    model = convert_merges(build_model("resnet", lambda c, **k: nn.ReLU()), example_input=torch.zeros(2, 1, 28, 28))
    for i, (_, m) in enumerate(merge_modules(model)):
        _randomise(m, seed=10 + i, scale=0.1)
    return model.eval()


def test_torchscript_trace_and_torch_export():
    model = _converted_small()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, (x,))
            merge = torch.jit.script(model.layers[0].merge)
        torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-5)
        a, b = _mixed_inputs((2, 16, 3, 3), seed=3)
        torch.testing.assert_close(merge(a, b), model.layers[0].merge(a, b), rtol=1e-6, atol=1e-5)
        program = torch.export.export(model, (x,))
        torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)


def test_tracing_warns_nothing():
    """The export form keeps N in tensor arithmetic: under tracing N is a traced size, and
    float(N) gave ten TracerWarnings per PWLU2D (80 for a converted ResNet-18)."""
    m = _randomise(PWLU2D(4, num_intervals=4), seed=21).eval()
    x, y = _mixed_inputs((2, 4, 3, 3), seed=22)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(m, (x, y))
    assert [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)] == []
    with torch.no_grad():
        torch.testing.assert_close(traced(x, y), m(x, y), rtol=1e-6, atol=1e-6)


def test_onnx_standard_ops_and_onnxruntime(tmp_path):
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from pwlu.export import export_onnx

    model = _converted_small()
    x = torch.randn(2, 1, 28, 28)
    path = tmp_path / "merges.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, x, path)
    graph = onnx.load(str(path)).graph
    assert {n.domain for n in graph.node} <= {""}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x2 = torch.randn(5, 1, 28, 28)
    (got,) = session.run(None, {session.get_inputs()[0].name: x2.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x2), rtol=1e-4, atol=1e-4)


def test_torch_compile_forward_and_backward():
    m = _randomise(PWLU2D(4, num_intervals=4), seed=12)
    x, y = _mixed_inputs((2, 4, 3, 3), seed=13)
    compiled = torch.compile(m, backend="aot_eager")
    xs = [t.clone().requires_grad_(True) for t in (x, y)]
    z = compiled(*xs)
    z.square().sum().backward()
    gv = m.values.grad.clone()
    m.zero_grad()
    xe = [t.clone().requires_grad_(True) for t in (x, y)]
    ze = m(*xe)
    ze.square().sum().backward()
    torch.testing.assert_close(z, ze)
    torch.testing.assert_close(gv, m.values.grad)
    torch.testing.assert_close(xs[0].grad, xe[0].grad)
    torch.testing.assert_close(xs[1].grad, xe[1].grad)
    # and against the reference, not only the eager kernels (which the compiled graph calls)
    params = [getattr(m, n).detach().clone().requires_grad_(True) for n in NAMES]
    xr = [t.clone().requires_grad_(True) for t in (x, y)]
    zr = pwlu.pwlu2d_reference(*xr, *params)
    zr.square().sum().backward()
    torch.testing.assert_close(z, zr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gv, params[0].grad, rtol=1e-4, atol=1e-4)
    for got, want in zip(xs, xr):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- DDP

WORLD = 2


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 3))
        merge = PWLU2D(3, num_intervals=4, channel_dim=-1)
        ddp = nn.parallel.DistributedDataParallel(model)
        realigner = pwlu.BoundaryRealigner(merge, warmup_steps=2)
        opt = torch.optim.SGD([*ddp.parameters(), *merge.parameters()], lr=0.05)
        inputs = []
        for step in range(2):
            g = torch.Generator().manual_seed(10 * rank + step)
            x = torch.randn(4 + 4 * rank, 3, generator=g) * (1 + rank) + rank
            a = ddp(x)
            inputs.append((a.detach().clone(), x.clone()))
            merge(a, x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            realigner.step()
        out = {n: b.clone() for n, b in merge.named_buffers()}
        out.update({n: p.detach().clone() for n, p in merge.named_parameters()})
        out["inputs"] = inputs
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo")
def test_ddp_statistics_of_both_inputs_are_merged_across_ranks(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    for key in ("x_left_bound", "y_right_bound", "values", "x_running_mean", "y_running_std"):
        assert torch.equal(r0[key], r1[key]), key
    # the union of both ranks' batches, step by step (Eq. 5, momentum 0.1)
    for k, axis in ((0, "x"), (1, "y")):
        batches = [torch.cat([r0["inputs"][s][k], r1["inputs"][s][k]]) for s in range(2)]
        mean, std = _expected_running([b.unsqueeze(-1) for b in batches], 0.1)
        torch.testing.assert_close(r0[f"{axis}_left_bound"].double(), mean - 3 * std, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- CLI


def test_cli_merges_pwlu2d(tmp_path, capsys):
    from pwlu.app.cli import main

    out = tmp_path / "run"
    assert main(["train", "--dataset", "synthetic", "--batch-size", "64", "--no-progress", "--epochs", "2",
                 "--warmup-epochs", "1", "--model", "resnet", "--activation", "relu", "--merges", "pwlu2d",
                 "--merge-intervals", "4", "--out", str(out)]) == 0  # fmt: skip
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    values = [k for k in ckpt["model"] if k.endswith("merge.values")]
    assert len(values) == 3 and ckpt["model"][values[0]].shape[-2:] == (5, 5)
    assert int(ckpt["model"][values[0].replace("values", "num_batches_tracked")]) > 0  # phase I collected
    assert main(["train", "--dataset", "synthetic", "--merges", "mul", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--merges must be 'add' or 'pwlu2d'" in err[0]


# ----------------------------------------------------------------------------- README

ROOT = Path(__file__).resolve().parents[1]


def _readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    assert "\n## 2-D PWLU\n" in text, "README.md has no '2-D PWLU' section"
    section = text.split("\n## 2-D PWLU\n", 1)[1].split("\n## ", 1)[0]
    assert text.index("\n## 2-D PWLU\n") < text.index("\n## Baselines\n"), "the section belongs before Baselines"
    return section


def test_readme_pwlu2d_snippet_runs():
    pytest.importorskip("torchvision")
    snippet = _readme_section().split("```python\n", 1)[1].split("```", 1)[0]
    assert "pwlu.PWLU2D(" in snippet and "pwlu.convert_merges(" in snippet
    exec(compile(snippet, "README.md", "exec"), {})


def test_experiment_results_are_generated_from_the_committed_data(tmp_path):
    """RESULTS.md is what summarize.py makes from the committed runs (metrics.json), the measured
    step cost (cost.json) and the surface table (departures.json): regenerated here, it must be
    the committed file; and the README's cost range is cost.json's."""
    import json
    import subprocess
    import sys

    merges = ROOT / "experiments" / "merges"
    out = tmp_path / "RESULTS.md"
    subprocess.run(  # --no-measure: local checkpoints (after a run.sh) must not change the committed files
        [sys.executable, str(merges / "summarize.py"), "--out", str(out), "--no-measure"],
        check=True,
        capture_output=True,
    )
    assert out.read_text() == (merges / "RESULTS.md").read_text()
    ratios = [r["ratio_to_add"] for r in json.loads((merges / "cost.json").read_text())["rows"] if r["merge"] != "add"]
    assert f"A training step costs {min(ratios):.2f}–{max(ratios):.2f}× that of" in _readme_section()


def test_readme_results_rows_are_those_of_the_experiment():
    """The README's results rows are rows of experiments/merges/RESULTS.md, as generated."""
    rows = [
        line for line in _readme_section().splitlines() if line.startswith("| resnet") or line.startswith("| mobilenet")
    ]
    assert len(rows) == 8, rows
    generated = (ROOT / "experiments" / "merges" / "RESULTS.md").read_text().splitlines()
    assert all(row in generated for row in rows), [row for row in rows if row not in generated]
