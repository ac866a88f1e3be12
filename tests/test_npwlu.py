"""The N-PWLU module (SPEC section 9) and everything a PWLU works with: realignment, the
phase-I freeze, fix_init, boundary IOU, optimizer groups, conversion, the CLI, plots, export,
autocast, DDP, double backward and jvp.

The ops layer (``pwlu.npwlu`` against ``pwlu.npwlu_reference`` and a loop) is tested in
``test_npwlu_ops.py``; here the expected values come from :func:`_loop`, an element-by-element
evaluation of SPEC section 9 written independently of the library.
"""

from __future__ import annotations

import copy
import math
import time
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
from pwlu.app.cli import main

NAMES = ("points", "width_logits", "left_bound", "right_bound", "left_slope", "right_slope")


def _params(m: pwlu.NPWLU) -> list[torch.Tensor]:
    return [getattr(m, n) for n in NAMES]


def _loop(x: torch.Tensor, m: pwlu.NPWLU) -> torch.Tensor:
    """SPEC section 9 element by element, in float64 (channel axis 1 when channel-wise)."""
    x64 = x.detach().double()
    out = torch.empty_like(x64)
    n = m.num_intervals
    for index in torch.cartesian_prod(*[torch.arange(s) for s in x.shape]).reshape(-1, x.dim()).tolist():
        c = index[m.channel_dim % x.dim()] if m.channel_wise else None
        ys, theta, bl, br, kl, kr = (p.detach().double() if c is None else p.detach().double()[c] for p in _params(m))
        bl, br, kl, kr = (float(v) for v in (bl, br, kl, kr))
        omega = [math.exp(v) for v in theta.tolist()]
        omega = [w / sum(omega) for w in omega]
        b = [bl + (br - bl) * sum(omega[:j]) for j in range(n)] + [br]
        v = float(x64[tuple(index)])
        if v < bl:
            y = float(ys[0]) + (v - bl) * kl
        elif v >= br:
            y = float(ys[n]) + (v - br) * kr
        else:
            j = max(i for i in range(n) if b[i] <= v)
            t = (v - b[j]) / (b[j + 1] - b[j])
            y = (1 - t) * float(ys[j]) + t * float(ys[j + 1])
        out[tuple(index)] = y
    return out


def _randomise(m: pwlu.NPWLU, seed: int = 0, theta_scale: float = 1.0) -> pwlu.NPWLU:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.width_logits.copy_(theta_scale * torch.randn(m.width_logits.shape, generator=g))
        m.points.add_(0.3 * torch.randn(m.points.shape, generator=g))
        m.left_slope.copy_(0.2 * torch.randn(m.left_slope.shape, generator=g))
        m.right_slope.add_(0.2 * torch.randn(m.right_slope.shape, generator=g))
        m.left_bound.add_(0.3 * torch.rand(m.left_bound.shape, generator=g))
    return m


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ----------------------------------------------------------------------------- the module


@pytest.mark.parametrize("channels", [None, 3])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_relu_init_is_exact(channels, n):
    m = pwlu.NPWLU(channels, num_intervals=n)
    assert set(dict(m.named_parameters())) == set(NAMES)
    assert m.width_logits.shape == ((n,) if channels is None else (channels, n))
    assert torch.equal(m.width_logits, torch.zeros_like(m.width_logits))
    grid = torch.cat([torch.linspace(-5, 5, 97), torch.linspace(-3, 3, n + 1)])  # inside, outside, on breakpoints
    x = grid.reshape(1, 1, -1).expand(2, channels or 1, -1).contiguous()
    for training in (True, False):
        y = m.train(training)(x)
        torch.testing.assert_close(y, torch.relu(x), rtol=0, atol=1e-6)
    # N-PWLU with theta = 0 is the uniform PWLU with the same parameters
    p = pwlu.PWLU(channels, num_intervals=n)
    p.load_state_dict({k: v for k, v in m.state_dict().items() if k != "width_logits"})
    torch.testing.assert_close(m(x), p(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("channel_dim", [1, -1])
def test_every_form_matches_the_loop_after_parameter_edits(channel_dim):
    torch.manual_seed(0)
    m = _randomise(pwlu.NPWLU(3, num_intervals=4, channel_dim=channel_dim))
    shape = (2, 3, 5) if channel_dim == 1 else (2, 5, 3)
    x = torch.randn(shape) * 3
    # exactly on two learned breakpoints and on both boundaries
    b = m.breakpoints().float()
    flat = x.movedim(channel_dim, 0)
    flat[:, 0, 0], flat[:, 0, 1], flat[:, 1, 0] = b[:, 1], b[:, 3], b[:, 0]
    flat[:, 1, 1] = b[:, 4]
    for round_ in range(2):
        expected = _loop(x, m).float()
        forms = {
            "train": m.train()(x),
            "eval": m.eval()(x),
            "no_grad eval": torch.no_grad()(m.eval())(x),
            "folded": m._forward_folded(x),
            "script": _quiet(torch.jit.script, m)(x),
            "trace": _quiet(torch.jit.trace, m, (x,), check_trace=False)(x),
            "reference": pwlu.npwlu_reference(x, *_params(m), channel_dim=channel_dim),
        }
        slopes, intercepts, breakpoints = m.inference_tables()
        k = (x.movedim(channel_dim, -1).unsqueeze(-1) >= breakpoints).sum(-1)  # the region, SPEC section 5
        a, c = slopes.gather(-1, k.reshape(-1, 3).T).T, intercepts.gather(-1, k.reshape(-1, 3).T).T
        forms["tables"] = (a * x.movedim(channel_dim, -1).reshape(-1, 3) + c).reshape(k.shape).movedim(-1, channel_dim)
        for name, y in forms.items():
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=2e-5, msg=lambda s, n=name: f"{n}: {s}")
        _randomise(m, seed=round_ + 1, theta_scale=2.0)  # edit in place: nothing may be stale


def test_breakpoints_and_repr():
    m = pwlu.NPWLU(2, num_intervals=3, bound=2.0)
    torch.testing.assert_close(m.breakpoints(), torch.tensor([[-2.0, -2 / 3, 2 / 3, 2.0]] * 2, dtype=torch.float64))
    with torch.no_grad():
        m.width_logits.copy_(torch.log(torch.tensor([[1.0, 2.0, 1.0], [2.0, 1.0, 1.0]])))
    torch.testing.assert_close(
        m.breakpoints(), torch.tensor([[-2.0, -1.0, 1.0, 2.0], [-2.0, 0.0, 1.0, 2.0]], dtype=torch.float64)
    )
    text = repr(m)
    assert "NPWLU(" in text and "num_intervals=3" in text and "widths=[0.25, 0.5]" in text
    lw = pwlu.NPWLU()
    assert lw.num_intervals == 4 and lw.width_logits.shape == (4,) and "mode=layer" in repr(lw)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, None])
def test_bad_num_intervals_is_named(bad):
    with pytest.raises(ValueError, match=f"NPWLU: num_intervals must be an int >= 1, but got {bad!r}"):
        pwlu.NPWLU(4, num_intervals=bad)


def test_bad_state_dict_shapes_are_named():
    m = pwlu.NPWLU(4, num_intervals=4)
    state = m.state_dict()
    state["width_logits"] = torch.zeros(4, 5)
    with pytest.raises(RuntimeError, match=r"width_logits.*torch.Size\(\[4, 5\]\).*torch.Size\(\[4, 4\]\)"):
        m.load_state_dict(state)
    state = m.state_dict()
    del state["width_logits"]  # a PWLU checkpoint is not an N-PWLU one
    with pytest.raises(RuntimeError, match="width_logits"):
        m.load_state_dict(state)
    # and a wrong width_logits given to the functional form is named too
    with pytest.raises(ValueError, match="width_logits"):
        pwlu.npwlu(torch.randn(2, 4, 3), m.points, torch.zeros(4, 3), m.left_bound, m.right_bound, m.left_slope,
                   m.right_slope)  # fmt: skip


def test_state_dict_roundtrip_deepcopy_and_meta_device():
    m = _randomise(pwlu.NPWLU(3, num_intervals=5))
    fresh = pwlu.NPWLU(3, num_intervals=5)
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 4) * 3
    assert torch.equal(fresh(x), m(x)) and torch.equal(copy.deepcopy(m)(x), m(x))
    with torch.device("meta"):
        meta = pwlu.NPWLU(3, num_intervals=5)
    assert meta.width_logits.is_meta and "device=meta" in repr(meta)
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    assert torch.equal(meta(x), pwlu.NPWLU(3, num_intervals=5)(x))
    assert torch.equal(meta.width_logits, torch.zeros(3, 5))


def test_init_callable_at_the_learned_breakpoints():
    m = _randomise(pwlu.NPWLU(2, num_intervals=6), theta_scale=1.5)
    m.init_from_function(torch.tanh, -2.5, 2.5)  # keeps theta: tanh at the non-uniform breakpoints
    b = m.breakpoints()
    torch.testing.assert_close(m.points.double(), torch.tanh(b), rtol=0, atol=1e-6)
    assert b[:, 0].eq(-2.5).all() and b[:, -1].eq(2.5).all()
    torch.testing.assert_close(
        m.left_slope.double(),
        1 - torch.tanh(torch.tensor(-2.5, dtype=torch.float64)) ** 2 + torch.zeros(2, dtype=torch.float64),
    )
    silu = pwlu.NPWLU(2, num_intervals=4, init=F.silu)
    torch.testing.assert_close(silu.points, F.silu(torch.linspace(-3, 3, 5)).expand(2, -1))
    with pytest.raises(ValueError, match="unknown init 'cube'"):
        pwlu.NPWLU(2, init="cube")


# ----------------------------------------------------------------------------- gradients


def test_gradcheck_double_backward_and_jvp_through_the_module():
    torch.manual_seed(0)
    m = _randomise(pwlu.NPWLU(2, num_intervals=3)).double()
    x = (torch.randn(2, 2, 3, dtype=torch.float64) * 2.5).requires_grad_()
    params = tuple(_params(m))

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(NAMES, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)
    # double backward through x, the width logits and a boundary (all seven is 5x slower, same code)
    g = lambda x, theta, left: f(x, params[0], theta, left, *params[3:])  # noqa: E731
    assert torch.autograd.gradgradcheck(g, (x, params[1], params[2]), eps=1e-6, atol=1e-4)
    tangents = tuple(torch.randn_like(t) for t in (x, *params))
    y, dy = torch.func.jvp(f, (x.detach(), *[p.detach() for p in params]), tangents)
    eps = 1e-6
    plus = f(*[(t + eps * d).detach() for t, d in zip((x, *params), tangents)])
    minus = f(*[(t - eps * d).detach() for t, d in zip((x, *params), tangents)])
    torch.testing.assert_close(dy, (plus - minus) / (2 * eps), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(y, f(x, *params))


def test_autocast_bf16_training_with_realignment():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), pwlu.NPWLU(8), nn.Conv2d(8, 8, 3),
                          pwlu.NPWLU(None, num_intervals=6), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))  # fmt: skip
    acts = [m for m in model.modules() if isinstance(m, pwlu.NPWLU)]
    optimizer = torch.optim.SGD(pwlu.parameter_groups(model, 1e-4), lr=0.05, momentum=0.9)
    realigner = pwlu.BoundaryRealigner(model, warmup_steps=2)
    x, y = torch.randn(8, 3, 10, 10) * 2 + 0.5, torch.randint(0, 4, (8,))
    for step in range(5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            assert logits.dtype == torch.bfloat16
            loss = F.cross_entropy(logits, y)
        assert torch.isfinite(loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step >= 2:
            for a in acts:
                assert a.width_logits.grad is not None and torch.isfinite(a.width_logits.grad).all()
                assert a.width_logits.grad.abs().sum() > 0
        optimizer.step()
        realigner.step()
    assert all(not torch.equal(a.width_logits, torch.zeros_like(a.width_logits)) for a in acts)


# ----------------------------------------------------------------------------- realignment


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), pwlu.NPWLU(6, num_intervals=4, channel_dim=-1), nn.Linear(6, 3),
                         pwlu.NPWLU(None, num_intervals=5), nn.Linear(3, 1))  # fmt: skip


def test_phase_one_freezes_width_logits_then_the_reset_sets_them_to_zero():
    model = _net()
    for m in (model[1], model[3]):
        _randomise(m)
    opt = torch.optim.SGD(pwlu.parameter_groups(model, 1e-2, pwlu_weight_decay=1e-2), lr=0.1, momentum=0.9)
    realigner = pwlu.BoundaryRealigner(model, warmup_steps=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        loss = model(torch.randn(16, 4, generator=g) * 2 + 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert torch.equal(model[1].width_logits.grad, torch.zeros(6, 4))  # zeroed as computed
        opt.step()
        for name, p in model.named_parameters():
            if name.startswith(("1.", "3.")):  # every N-PWLU parameter, width_logits included, bit-identical
                assert torch.equal(p, before[name]), f"step {step}: {name} changed in phase I"
                assert "momentum_buffer" not in opt.state.get(p, {}), name
        assert not torch.equal(model[0].weight, before["0.weight"])
        realigner.step()
    # the Eq. 6 reset: theta = 0 and ReLU at the (uniform again) breakpoints of mean ± 3 std
    for m in (model[1], model[3]):
        assert torch.equal(m.width_logits, torch.zeros_like(m.width_logits))
        torch.testing.assert_close(m.left_bound, m.running_mean - 3 * m.running_std)
        n = m.num_intervals
        uniform = m.left_bound.double().unsqueeze(-1) + torch.arange(n + 1) / n * (m.right_bound - m.left_bound).double().unsqueeze(-1)  # fmt: skip
        torch.testing.assert_close(m.breakpoints(), uniform, rtol=0, atol=1e-6)
        torch.testing.assert_close(m.points, torch.relu(uniform).float(), rtol=0, atol=1e-6)
        assert m.left_slope.eq(0).all() and m.right_slope.eq(1).all()
    # phase II: the widths learn
    loss = model(torch.randn(16, 4, generator=g) * 2 + 1).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert not torch.equal(model[1].width_logits, torch.zeros(6, 4))


def _collected(m: pwlu.NPWLU, mean: float, std: float) -> pwlu.NPWLU:
    with torch.no_grad():
        m.running_mean.fill_(mean)
        m.running_std.fill_(std)
        m.num_batches_tracked.fill_(5)
    return m


def test_realign_preserve_function_keeps_theta_and_the_function():
    m = _randomise(pwlu.NPWLU(3, num_intervals=4), theta_scale=1.5)
    # the same range: the refit at the same non-uniform breakpoints is exact
    with torch.no_grad():
        m.left_bound.fill_(-3.0)
        m.right_bound.fill_(3.0)
    theta = m.width_logits.detach().clone()
    x = torch.linspace(-6, 6, 301).reshape(-1, 1).expand(-1, 3).contiguous()
    before = m(x).detach()
    assert pwlu.realign_boundaries(_collected(m, 0.0, 1.0), preserve_function=True) == [""]
    assert torch.equal(m.width_logits, theta)
    torch.testing.assert_close(m(x), before, rtol=0, atol=2e-5)
    # a shifted, wider range and a linear shape (representable on any breakpoints): exact too
    with torch.no_grad():
        m.points.copy_(0.5 * m.breakpoints().float() + 0.25)
        m.left_slope.fill_(0.5)
        m.right_slope.fill_(0.5)
    before = m(x).detach()
    pwlu.realign_boundaries(_collected(m, 0.7, 1.6), preserve_function=True)
    assert torch.equal(m.width_logits, theta)
    torch.testing.assert_close(m.left_bound, torch.full((3,), 0.7 - 4.8), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m(x), before, rtol=0, atol=2e-5)
    # the new breakpoints sit at the same fractions of the new range
    fractions = (m.breakpoints() - m.breakpoints()[:, :1]) / (m.breakpoints()[:, -1:] - m.breakpoints()[:, :1])
    torch.testing.assert_close(fractions, torch.cat([torch.zeros(3, 1, dtype=torch.float64),
                                                     torch.cumsum(torch.softmax(theta.double(), -1), -1)], -1))  # fmt: skip
    # a curved shape and a slightly moved range: the new breakpoints sit at the old fractions, so
    # kinks between them are smoothed; the refit is much closer than moving the range alone
    m = _randomise(pwlu.NPWLU(3, num_intervals=4), seed=3, theta_scale=1.0)
    old = (m.left_bound.min().item(), m.right_bound.max().item())
    inside = torch.linspace(*old, 201).reshape(-1, 1).expand(-1, 3).contiguous()
    before = m(inside).detach()
    span = (before.max(0).values - before.min(0).values).clamp_min(1e-6)
    moved = copy.deepcopy(m)
    with torch.no_grad():
        moved.left_bound.fill_(-3.15)
        moved.right_bound.fill_(3.15)
    naive = ((moved(inside).detach() - before).abs().max(0).values / span).max().item()
    pwlu.realign_boundaries(_collected(m, 0.0, 1.05), preserve_function=True)
    err = ((m(inside).detach() - before).abs().max(0).values / span).max().item()
    assert err < 0.15 and err < naive, (err, naive)
    # and the default reset sets theta back to zero
    pwlu.realign_boundaries(_collected(m, 0.2, 1.2))
    assert torch.equal(m.width_logits, torch.zeros(3, 4))


def test_fix_init_boundary_iou_parameter_groups():
    model = _net()
    for m in (model[1], model[3]):
        _randomise(m)
    pwlu.fix_init(model, 6.0)
    x = torch.linspace(-9, 9, 50).reshape(-1, 1)
    for m in (model[1], model[3]):
        assert torch.equal(m.width_logits, torch.zeros_like(m.width_logits)) and not m._collecting
        assert m.left_bound.eq(-6).all() and m.right_bound.eq(6).all()
        # Eq. 6: ReLU sampled at the N + 1 uniform breakpoints of [-6, 6], K_L = 0, K_R = 1. That is
        # ReLU itself only when 0 is a breakpoint (N = 4 here); with N = 5 the kink at 0 falls inside
        # [-1.2, 1.2] and is interpolated there, exactly as for a uniform PWLU.
        knots = torch.linspace(-6, 6, m.num_intervals + 1, dtype=torch.float64)
        inside = torch.from_numpy(np.interp(x.double().numpy(), knots.numpy(), torch.relu(knots).numpy()))
        expected = torch.where(x >= 6, x.double(), inside).float()
        width = 6 if m.channel_wise else 1
        torch.testing.assert_close(m(x.expand(-1, width)), expected.expand(-1, width), rtol=0, atol=1e-6)
        if m.num_intervals % 2 == 0:
            torch.testing.assert_close(m(x.expand(-1, width)), torch.relu(x).expand(-1, width), rtol=0, atol=1e-6)
    ious = pwlu.boundary_iou(model, [torch.randn(64, 4) for _ in range(3)])
    assert set(ious) == {"1", "3"} and ious["1"].shape == (6,) and ious["3"].shape == (1,)
    assert all(((v >= 0) & (v <= 1)).all() for v in ious.values())
    groups = pwlu.parameter_groups(model, weight_decay=1e-4)
    act_ids = {id(p) for m in (model[1], model[3]) for p in _params(m)}
    assert {id(p) for p in groups[1]["params"]} == act_ids and groups[1]["weight_decay"] == 0.0
    assert not act_ids & {id(p) for p in groups[0]["params"]}


def test_convert_activations_to_npwlu():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 5, 3), nn.SiLU(), nn.Flatten(), nn.Linear(5 * 12 * 12, 7),
                          nn.ReLU(), nn.Linear(7, 2))  # fmt: skip
    out = pwlu.convert_activations(model, activation="npwlu", num_intervals=4, example_input=torch.randn(1, 3, 16, 16))
    acts = [m for m in out.modules() if isinstance(m, pwlu.NPWLU)]
    assert [(a.num_channels, a.num_intervals, a.channel_dim) for a in acts] == [
        (8, 4, 1),
        (5, 4, 1),
        (7, 4, -1),
    ]  # -1 after nn.Linear
    assert not any(isinstance(m, (nn.ReLU, nn.SiLU)) for m in out.modules())
    layer = pwlu.convert_activations(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), activation="npwlu", mode="layer",
                                     example_input=torch.randn(1, 3, 8, 8), activation_kwargs={"init": "silu"})  # fmt: skip
    assert isinstance(layer[1], pwlu.NPWLU) and layer[1].num_channels is None and layer[1].num_intervals == 16
    assert "npwlu" in pwlu.ACTIVATIONS


# ----------------------------------------------------------------------------- CLI, plots, export


@pytest.fixture(scope="module")
def npwlu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("npwlu_run")
    code = main(["train", "--dataset", "synthetic", "--model", "cnn", "--activation", "npwlu", "--intervals", "4",
                 "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "64", "--no-progress", "--out", str(out)])  # fmt: skip
    assert code == 0
    return out


def test_cli_train_plot_export(npwlu_run, tmp_path, capsys):
    ckpt = torch.load(npwlu_run / "checkpoint.pt", weights_only=False)
    assert ckpt["config"]["activation"] == "npwlu" and ckpt["config"]["intervals"] == 4
    thetas = [v for k, v in ckpt["model"].items() if k.endswith("width_logits")]
    assert thetas and all(t.shape[-1] == 4 for t in thetas)
    assert any(not torch.equal(t, torch.zeros_like(t)) for t in thetas), "the widths never trained"
    assert ckpt["realigner"]["warmup_steps"] > 0  # realignment ran for N-PWLU as for PWLU
    assert main(["plot", str(npwlu_run / "checkpoint.pt"), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "shapes.png").stat().st_size > 0
    capsys.readouterr()
    out = tmp_path / "model.pt"
    assert main(["export", str(npwlu_run / "checkpoint.pt"), "--format", "torchscript", "--out", str(out)]) == 0
    err = float(capsys.readouterr().out.rsplit("max relative error", 1)[1].split()[0])
    assert err <= 1e-5


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = pwlu.NPWLU(6, num_intervals=4)
        self.proj = nn.Linear(6, 5)
        self.act2 = pwlu.NPWLU(5, num_intervals=3, channel_dim=-1, init="silu")
        self.act3 = pwlu.NPWLU(None, num_intervals=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.conv(x))
        h = self.act2(self.proj(h.flatten(2).transpose(1, 2)))
        return self.act3(h).mean(1)


def _small() -> nn.Module:
    torch.manual_seed(0)
    model = Small()
    for i, m in enumerate(model.modules()):
        if isinstance(m, pwlu.NPWLU):
            _randomise(m, seed=i)
    return model.eval()


def test_onnx_export_standard_ops_and_onnxruntime(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from pwlu.export import ONNX_OPSET, export_onnx, max_relative_error

    model = _small()
    x = torch.randn(2, 3, 6, 6) * 2
    with torch.no_grad():
        expected = model(x)
    for dynamo in (True, False):
        path = tmp_path / f"m{dynamo}.onnx"
        if dynamo:
            _quiet(export_onnx, model, x, path)
        else:
            with torch.no_grad():
                _quiet(torch.onnx.export, model, (x,), str(path), opset_version=ONNX_OPSET, dynamo=False)
        graph = onnx.load(str(path))
        onnx.checker.check_model(graph)
        assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"} and not graph.functions
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert max_relative_error(torch.from_numpy(y), expected) <= 1e-5, dynamo


def test_torchscript_torch_export_and_compile_fullgraph(tmp_path):
    model = _small()
    x = torch.randn(2, 3, 6, 6) * 2
    with torch.no_grad():
        expected = model(x)
        for how in ("script", "trace"):
            jitted = _quiet(torch.jit.script, model) if how == "script" else _quiet(torch.jit.trace, model, (x,))
            jitted.save(str(tmp_path / f"{how}.pt"))
            loaded = _quiet(torch.jit.load, str(tmp_path / f"{how}.pt"))
            torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)
    program = torch.export.export(model, (x,))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    with torch.no_grad():
        torch.testing.assert_close(
            torch.export.load(str(tmp_path / "m.pt2")).module()(x), expected, rtol=1e-5, atol=1e-6
        )
    # torch.compile, no graph break, eval and a training step (gradients of all six parameters)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)
    model.train()
    eager = copy.deepcopy(model)
    compiled(x).square().sum().backward()
    eager(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda s, n=name: f"d{n}: {s}")


# ----------------------------------------------------------------------------- DDP

WORLD = 2
WARMUP = 2


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _net()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        realigner = pwlu.BoundaryRealigner(ddp, warmup_steps=WARMUP)
        result = {}
        for step in range(WARMUP + 3):
            g = torch.Generator().manual_seed(100 * rank + step)
            x = torch.randn(6 + 4 * rank, 4, generator=g) * (1.0 + rank) + 2.0 * rank  # different data per rank
            loss = ddp(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            realigner.step()
            if step == WARMUP - 1:
                result["theta_at_reset"] = model[1].width_logits.detach().clone()
        result["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_ddp_two_ranks(tmp_path):
    ctx = mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP workers did not finish within 180 s")
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    assert torch.equal(a["theta_at_reset"], torch.zeros(6, 4))
    for key, value in a["state"].items():  # statistics merged, parameters trained identically
        assert torch.equal(value, b["state"][key]), key
    assert not torch.equal(a["state"]["1.width_logits"], torch.zeros(6, 4))


# ----------------------------------------------------------------------------- README


def _readme_section() -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "## Non-uniform PWLU" in text, "README.md has no 'Non-uniform PWLU' section"
    return text.split("## Non-uniform PWLU", 1)[1].split("\n## ", 1)[0]


def test_readme_npwlu_snippet_runs():
    section = _readme_section()
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "pwlu.NPWLU(" in snippet and "pwlu.npwlu(" in snippet
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(snippet, "README.md", "exec"), {})


def test_readme_npwlu_results_table_is_the_experiments():
    """The README's results rows are rows of experiments/npwlu/RESULTS.md, as generated."""
    results = (Path(__file__).resolve().parents[1] / "experiments" / "npwlu" / "RESULTS.md").read_text()
    rows = [
        line for line in _readme_section().splitlines() if line.startswith("| ") and "PWLU N=" in line.split("|")[2]
    ]
    assert len(rows) == 6, rows
    generated = set(results.splitlines())
    assert all(row in generated for row in rows), [row for row in rows if row not in generated]
